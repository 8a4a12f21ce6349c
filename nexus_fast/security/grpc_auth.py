"""gRPC adapter: one server interceptor authenticates and authorises every call.

Authentication happens once per call, which for a stream is once per stream: the
interceptor wraps the method's behaviour, reads ``authorization: Bearer ...`` from the
call's metadata or the verified client certificate from ``context.auth_context()``, looks
the method up in :data:`~nexus_fast.security.permissions.GRPC_METHODS` and either aborts
(``UNAUTHENTICATED`` / ``PERMISSION_DENIED`` with the reason) or runs the handler with the
principal in a context variable (:func:`current_principal`).

With ``[security.limits]`` the same wrapper charges the principal's request bucket once
per unary call and once per stream opened (plus the request's bytes for the methods in
:data:`BYTE_METHODS`) and holds a stream slot for as long as a streaming call runs,
released in a ``finally`` however the stream ends. Over a limit the call is aborted with
``RESOURCE_EXHAUSTED`` and a ``retry-after-ms`` trailer. With authentication off,
:class:`LimitsInterceptor` does only that, for the one anonymous principal.
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import grpc
from google.protobuf.message import Message

from nexus_fast.api.status import grpc_trailers
from nexus_fast.core.acting import ANONYMOUS
from nexus_fast.errors import ResourceExhausted
from nexus_fast.logs import get_logger
from nexus_fast.security import auditing
from nexus_fast.security.grpc_wrap import WrappingInterceptor, metadata_value, wrap_handler
from nexus_fast.security.identity import (
    ROLE_NODE,
    Authenticator,
    PermissionDenied,
    Principal,
    Unauthenticated,
)
from nexus_fast.security.limits import PrincipalLimits, Slot
from nexus_fast.security.permissions import (
    GRPC_METHODS,
    NODE_SELF,
    PUBLIC,
    REPLICA_FORWARD,
    Rbac,
)

__all__ = [
    "BYTE_METHODS",
    "ON_BEHALF_HEADER",
    "ON_BEHALF_NODE_HEADER",
    "AuthInterceptor",
    "LimitsInterceptor",
    "check_node_id",
    "current_principal",
]

log = get_logger("security")

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "nexus_principal", default=None
)
# Unary NodeService calls whose request names the node acted for.
_NODE_ID_METHODS: Final = frozenset(
    {"/nexus.fabric.v1.NodeService/Register", "/nexus.fabric.v1.NodeService/Deregister"}
)


BYTE_METHODS: Final = frozenset(
    {
        "/nexus.fabric.v1.ControlService/SubmitCommands",
        "/nexus.fabric.v1.ControlService/DeployAgent",
    }
)
"""Methods whose request bytes are charged to the principal's byte bucket: what they send
is stored (payloads, agent specs)."""

ON_BEHALF_HEADER: Final = "nexus-on-behalf-of"
"""Metadata a follower replica adds to a call it forwards to the leader: ``role:name`` of
the principal that made it. Accepted only from a principal holding ``cluster.forward``
(the ``replica`` role); the call is then authorised and audited as that principal."""

ON_BEHALF_NODE_HEADER: Final = "nexus-on-behalf-node"
"""With ``nexus-on-behalf-of: node:<name>``: the node id the follower authenticated the node
as. A replica may speak for a node only on NodeService ``Register``/``Deregister`` and only
with this header, so the leader still holds the node to ``node.self`` (its own id only)."""

_Authorize = Callable[[Any, grpc.aio.ServicerContext], Awaitable[Principal | None]]


def current_principal() -> Principal | None:
    """The caller of the gRPC call being handled (None when authentication is off)."""
    return _principal.get()


async def check_node_id(context: grpc.aio.ServicerContext, node_id: str) -> None:
    """Abort with PERMISSION_DENIED unless the caller may act for ``node_id``.

    Node principals act only as themselves; other principals were already authorised by
    the method's permission. A no-op when authentication is off.
    """
    principal = _principal.get()
    if principal is not None and principal.node_id is not None and node_id != principal.node_id:
        log.warning(
            "node principal refused acting as another node",
            extra={"principal": principal.name, "node": principal.node_id, "asked": node_id},
        )
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"node {principal.node_id!r} may act only as itself, not as {node_id!r}",
        )


class AuthInterceptor(WrappingInterceptor):
    """Authenticate once per call, check the method's permission, expose the principal."""

    def __init__(
        self, authenticator: Authenticator, rbac: Rbac, limits: PrincipalLimits | None = None
    ) -> None:
        super().__init__()
        self._auth = authenticator
        self._rbac = rbac
        self._limits = limits

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        permission = GRPC_METHODS.get(method)
        if permission == PUBLIC:
            return handler
        return _wrap(handler, self._authorize(method, permission), self._limits, method)

    def _authorize(self, method: str, permission: str | None) -> _Authorize:
        auth, rbac = self._auth, self._rbac
        check_request = method in _NODE_ID_METHODS

        async def authorize(request: Any, context: grpc.aio.ServicerContext) -> Principal | None:
            try:
                pems = context.auth_context().get("x509_pem_cert") or ()
                principal = auth.authenticate(
                    metadata_value(context, "authorization"), pem=pems[0] if pems else None
                )
                behalf = metadata_value(context, ON_BEHALF_HEADER)
                if behalf is not None:
                    principal = _on_behalf(
                        rbac,
                        principal,
                        behalf,
                        node_id=metadata_value(context, ON_BEHALF_NODE_HEADER),
                        method=method,
                    )
                auditing.identify(principal)  # a refusal below is audited under this name
                if not rbac.allows(principal, permission):
                    raise PermissionDenied(
                        f"{principal.role} {principal.name!r} may not call {method}"
                        + (f" (needs {permission})" if permission else " (not in the table)")
                    )
                if (
                    check_request
                    and principal.node_id is not None
                    and permission == NODE_SELF
                    and request.node_id != principal.node_id
                ):
                    raise PermissionDenied(
                        f"node {principal.node_id!r} may act only as itself, "
                        f"not as {request.node_id!r}"
                    )
            except Unauthenticated as exc:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
                return None
            except PermissionDenied as exc:
                log.info("permission denied", extra={"method": method, "reason": str(exc)})
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
                return None
            _principal.set(principal)
            return principal

        return authorize


def _on_behalf(
    rbac: Rbac, replica: Principal, header: str, node_id: str | None = None, method: str = ""
) -> Principal:
    """The principal a forwarding replica names; PermissionDenied unless it may name one.

    A node principal (``node:<name>`` plus ``node_id``) is accepted only for the unary
    NodeService methods whose request names the node (:data:`_NODE_ID_METHODS`): the
    caller then checks the request's node id against it, as for a direct call.
    """
    if not rbac.allows(replica, REPLICA_FORWARD):
        raise PermissionDenied(
            f"{replica.role} {replica.name!r} may not act on behalf of another principal "
            f"(needs {REPLICA_FORWARD}: the replica role)"
        )
    role, _, name = header.partition(":")
    if not role or not name or len(header) > 512:
        raise PermissionDenied(f"malformed {ON_BEHALF_HEADER} header from {replica.name!r}")
    if role != ROLE_NODE:
        if node_id is not None:
            raise PermissionDenied(f"{ON_BEHALF_NODE_HEADER} without a node principal")
        return Principal(name, role, f"replica:{replica.name}")
    if method not in _NODE_ID_METHODS:
        raise PermissionDenied(
            f"replica {replica.name!r} may not act for node {name!r} on {method or 'this call'}"
        )
    if not node_id or len(node_id) > 256:
        raise PermissionDenied(
            f"replica {replica.name!r} named node {name!r} without its {ON_BEHALF_NODE_HEADER}"
        )
    return Principal(name, ROLE_NODE, f"replica:{replica.name}", node_id)


class LimitsInterceptor(WrappingInterceptor):
    """Per-principal limits without authentication: every caller is :data:`ANONYMOUS`.

    Installed only when ``security.auth_required = false`` and ``[security.limits]`` is
    enabled; public methods (health, reflection) are not charged.
    """

    def __init__(self, limits: PrincipalLimits) -> None:
        super().__init__()
        self._limits = limits

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if GRPC_METHODS.get(method) == PUBLIC:
            return handler
        return _wrap(handler, _anonymous, self._limits, method)


async def _anonymous(request: Any, context: grpc.aio.ServicerContext) -> Principal | None:
    return None


async def _refuse(context: grpc.aio.ServicerContext, exc: ResourceExhausted) -> None:
    """Abort with RESOURCE_EXHAUSTED and the ``retry-after-ms`` trailer (raises AbortError)."""
    log.info("limit reached", extra={"reason": str(exc)})
    context.set_trailing_metadata(grpc_trailers(exc))
    await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))


def _charger(
    limits: PrincipalLimits | None, method: str
) -> Callable[[Principal | None, Any, grpc.aio.ServicerContext], Awaitable[None]] | None:
    """Charge one unary call (and its bytes for :data:`BYTE_METHODS`), or None: no limits."""
    if limits is None:
        return None
    charge_bytes = method in BYTE_METHODS

    async def charge(
        principal: Principal | None, request: Any, context: grpc.aio.ServicerContext
    ) -> None:
        name = principal.name if principal is not None else ANONYMOUS
        try:
            limits.check_request(name)
            # An undecodable request arrives as an error object: nothing to charge.
            if charge_bytes and isinstance(request, Message):
                limits.check_bytes(name, request.ByteSize())
        except ResourceExhausted as exc:
            await _refuse(context, exc)

    return charge


async def _open_stream(
    limits: PrincipalLimits, principal: Principal | None, context: grpc.aio.ServicerContext
) -> Slot:
    """Charge one stream opened and take a stream slot, or abort the call."""
    name = principal.name if principal is not None else ANONYMOUS
    try:
        limits.check_request(name)
        return limits.stream(name)
    except ResourceExhausted as exc:
        await _refuse(context, exc)
        raise  # not reached: abort raises


def _wrap(
    handler: grpc.RpcMethodHandler,
    authorize: _Authorize,
    limits: PrincipalLimits | None = None,
    method: str = "",
) -> grpc.RpcMethodHandler:
    """The same handler (serializers untouched) with ``authorize`` and the limits run first."""

    def behavior(inner: Any, unary_request: bool, unary_response: bool) -> Any:
        if not (unary_request and unary_response):
            return _stream_behavior(inner, authorize, unary_request, limits)
        charge = _charger(limits, method)

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            principal = await authorize(request, context)
            if charge is not None:
                await charge(principal, request, context)
            return await inner(request, context)

        return unary_unary

    return wrap_handler(handler, behavior)


def _stream_behavior(
    inner: Any, authorize: _Authorize, unary_request: bool, limits: PrincipalLimits | None
) -> Any:
    """Wrap a streaming behaviour keeping its kind: async generator or coroutine.

    With limits, the stream holds a slot from its first line to its end, whatever ends it
    (completion, error, abort, the client cancelling): the ``finally`` releases it.
    """
    if inspect.isasyncgenfunction(inner):

        async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            principal = await authorize(request if unary_request else None, context)
            if limits is None:
                async for item in inner(request, context):
                    yield item
                return
            slot = await _open_stream(limits, principal, context)
            try:
                async for item in inner(request, context):
                    yield item
            finally:
                slot.release()

        return generator

    async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
        principal = await authorize(request if unary_request else None, context)
        if limits is None:
            return await inner(request, context)
        slot = await _open_stream(limits, principal, context)
        try:
            return await inner(request, context)
        finally:
            slot.release()

    return coroutine
