"""WebSocket adapter: admit the upgrade, then check every op against the table.

The upgrade is refused with 403 for a foreign ``Origin`` and 401 without a valid
credential: ``Authorization: Bearer ...``, ``?access_token=...`` (for browsers, which
cannot set headers on a WebSocket; the server never logs query strings) or, on WSS with
client certificates required, the certificate, read from the TLS session on the first op.
Cookies are never read. Each op then needs its permission (a viewer may subscribe but not
submit); a refused op gets a ``permission_denied`` error frame and the connection stays.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import orjson

from nexus_fast.api.ws_server import Connection, OnMessage
from nexus_fast.logs import get_logger
from nexus_fast.security import auditing
from nexus_fast.security.identity import Authenticator, Principal, Unauthenticated, bearer_token
from nexus_fast.security.origins import OriginPolicy
from nexus_fast.security.permissions import WS_OPS, Rbac

__all__ = [
    "CLOSE_UNAUTHENTICATED",
    "ERROR_PERMISSION_DENIED",
    "PRINCIPAL_KEY",
    "WsAuth",
    "send_error",
]

log = get_logger("security")

PRINCIPAL_KEY: Final = "principal"
"""``Connection.state`` key holding the connection's :class:`Principal`."""
ERROR_PERMISSION_DENIED: Final = "permission_denied"
CLOSE_UNAUTHENTICATED: Final = 4001
"""Close code when a WSS client certificate names no usable principal."""
_FROM_CERT: Final = "from-certificate"


def send_error(
    conn: Connection, request: dict[str, Any], code: str, message: str, **extra: object
) -> None:
    """Answer ``request`` with an ``error`` frame (its ``id`` echoed); the connection stays."""
    frame: dict[str, object] = {"type": "error", "code": code, "message": message, **extra}
    if "id" in request:
        frame["id"] = request["id"]
    conn.send_bytes_text(orjson.dumps(frame))


class WsAuth:
    """The ``admit`` hook of the upgrade and the per-op check around ``on_message``."""

    def __init__(
        self, authenticator: Authenticator, rbac: Rbac, origins: OriginPolicy, mtls: bool
    ) -> None:
        self._auth = authenticator
        self._rbac = rbac
        self._origins = origins
        self._mtls = mtls

    def admit(
        self, headers: Mapping[str, str], query: Mapping[str, str]
    ) -> tuple[int, str] | dict[str, object]:
        """``(status, message)`` to refuse the upgrade, or state for the new connection."""
        origin = headers.get("origin")
        if not self._origins.origin_allowed(origin):
            return 403, f"origin {origin!r} is not allowed"
        try:
            authorization = headers.get("authorization")
            if authorization:
                principal: object = self._auth.from_token(bearer_token(authorization))
            elif query.get("access_token"):
                principal = self._auth.from_token(query["access_token"])
            elif self._mtls:
                principal = _FROM_CERT  # the handshake verified one; read it on the first op
            else:
                raise Unauthenticated(
                    "no credentials: send Authorization: Bearer <token> or ?access_token="
                )
        except Unauthenticated as exc:
            return 401, str(exc)
        return {PRINCIPAL_KEY: principal}

    def on_connect(self, conn: Connection) -> None:
        """Name a certificate principal as soon as the connection is up (so limits count
        it from the start); a certificate naming none closes the connection with 4001."""
        if conn.state.get(PRINCIPAL_KEY) == _FROM_CERT:
            self._certificate_principal(conn)

    def guard(self, inner: OnMessage) -> OnMessage:
        """``on_message`` that runs ``inner`` only for ops the principal may use."""
        rbac = self._rbac

        def on_message(conn: Connection, message: dict[str, Any]) -> None:
            principal = conn.state.get(PRINCIPAL_KEY)
            if not isinstance(principal, Principal):
                principal = self._certificate_principal(conn)
                if principal is None:
                    return
            op = message["op"]
            permission = WS_OPS.get(op)
            if not rbac.allows(principal, permission):
                auditing.finish("PERMISSION_DENIED")
                send_error(
                    conn,
                    message,
                    ERROR_PERMISSION_DENIED,
                    f"{principal.role} {principal.name!r} may not use op {op!r}",
                )
                return
            inner(conn, message)

        return on_message

    def _certificate_principal(self, conn: Connection) -> Principal | None:
        try:
            principal = self._auth.from_peercert(conn.peer_certificate())
        except Unauthenticated as exc:
            conn.close(CLOSE_UNAUTHENTICATED, str(exc)[:120])
            return None
        conn.state[PRINCIPAL_KEY] = principal
        return principal
