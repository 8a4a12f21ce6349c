"""HTTP adapter: aiohttp middleware for Host, Origin, authentication and the route table.

Credentials: ``Authorization: Bearer ...`` or the client certificate of an HTTPS
connection (``security.http_tls``). Never cookies. Answers in the HTTP port's JSON error
shape: 401 ``unauthenticated`` (with ``WWW-Authenticate``), 403 ``permission_denied`` or
``forbidden_origin`` / ``forbidden_host``. Public routes (probes) need no credential.

With ``[security.limits]`` every authorised request spends one unit of its principal's
request budget; over it the request is answered 429 ``rate_limited`` with ``Retry-After``
(raised as :class:`~nexus_fast.security.limits.RateLimited` into the HTTP port's error
middleware, which answers every core error from the one table). :func:`limits_middleware`
does only that when authentication is off, for the one anonymous principal.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Final

import orjson
from aiohttp import web

from nexus_fast.core.acting import ANONYMOUS
from nexus_fast.security.identity import Authenticator, Unauthenticated
from nexus_fast.security.limits import PrincipalLimits
from nexus_fast.security.origins import OriginPolicy
from nexus_fast.security.permissions import HTTP_ROUTES, PUBLIC, Rbac

__all__ = ["PRINCIPAL_KEY", "http_middleware", "limits_middleware"]

PRINCIPAL_KEY: Final = "nexus_principal"
"""``request[PRINCIPAL_KEY]`` is the caller's Principal on authorised requests."""

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_Middleware = Callable[[web.Request, _Handler], Awaitable[web.StreamResponse]]


def _refuse(status: int, code: str, message: str) -> web.Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    response = web.Response(body=body, status=status, content_type="application/json")
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="nexus"'
    return response


def http_middleware(
    authenticator: Authenticator,
    rbac: Rbac,
    origins: OriginPolicy,
    limits: PrincipalLimits | None = None,
) -> _Middleware:
    """The middleware; install it inside the error/metrics middleware."""

    @web.middleware
    async def authorize(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if not origins.host_allowed(request.headers.get("Host")):
            return _refuse(403, "forbidden_host", "host not allowed")
        origin = request.headers.get("Origin")
        if not origins.origin_allowed(origin):
            return _refuse(403, "forbidden_origin", f"origin {origin!r} is not allowed")
        resource = request.match_info.route.resource
        template = resource.canonical if resource is not None else None
        permission = HTTP_ROUTES.get(template) if template is not None else None
        if permission == PUBLIC:
            return await handler(request)
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        try:
            principal = authenticator.authenticate(
                request.headers.get("Authorization"), peercert=peercert
            )
        except Unauthenticated as exc:
            return _refuse(401, "unauthenticated", str(exc))
        if limits is not None:
            limits.check_request(principal.name)  # RateLimited -> 429 in the error middleware
        if template is None:
            return await handler(request)  # no such route: 404/405 once authenticated
        if not rbac.allows(principal, permission):
            return _refuse(
                403,
                "permission_denied",
                f"{principal.role} {principal.name!r} may not read {template}",
            )
        request[PRINCIPAL_KEY] = principal
        return await handler(request)

    return authorize


def _route_permission(request: web.Request) -> str | None:
    resource = request.match_info.route.resource
    return HTTP_ROUTES.get(resource.canonical) if resource is not None else None


def limits_middleware(limits: PrincipalLimits) -> _Middleware:
    """Charge every non-public request to :data:`ANONYMOUS` (authentication off)."""

    @web.middleware
    async def charge(request: web.Request, handler: _Handler) -> web.StreamResponse:
        if _route_permission(request) != PUBLIC:
            limits.check_request(ANONYMOUS)
        return await handler(request)

    return charge
