"""WebSocket adapter for ``[security.limits]``: a connection cap and per-op budgets.

A connection takes one of its principal's WebSocket slots when the upgrade completes and
gives it back from a close callback, which runs however the connection ends (client
close, server close, abort, dead peer, shutdown). Over the cap the new connection is
closed with 4029 and a reason; the principal's other connections, and everyone else's,
are untouched. Each op then spends one unit of the request budget, and a ``submit`` the
bytes of its frame; an op over budget gets an error frame (code ``rate_limited``, with
``retry_after_ms``) and the connection stays open.
"""

from __future__ import annotations

from typing import Any

from nexus_fast.api.status import CLOSE_LIMIT_EXCEEDED, error_code
from nexus_fast.api.ws_server import Connection, OnMessage
from nexus_fast.core.acting import ANONYMOUS
from nexus_fast.errors import ResourceExhausted
from nexus_fast.logs import get_logger
from nexus_fast.security.limits import LimitExceeded, PrincipalLimits, retry_after_ms
from nexus_fast.security.principal import Principal
from nexus_fast.security.ws_auth import PRINCIPAL_KEY, send_error

__all__ = ["WsLimits"]

log = get_logger("security")

_MAX_REASON = 120  # a close frame carries at most 123 bytes of reason


def _principal_name(conn: Connection) -> str:
    principal = conn.state.get(PRINCIPAL_KEY)
    return principal.name if isinstance(principal, Principal) else ANONYMOUS


class WsLimits:
    """The ``on_connect`` hook (connection cap) and the per-op guard (request/byte budgets)."""

    def __init__(self, limits: PrincipalLimits) -> None:
        self._limits = limits

    def on_connect(self, conn: Connection) -> None:
        """Hold a connection slot until the connection is gone, or close it with 4029."""
        if not conn.is_open:
            return  # closed already (e.g. its certificate named no principal)
        try:
            slot = self._limits.ws_connection(_principal_name(conn))
        except LimitExceeded as exc:
            log.info("websocket connection refused", extra={"reason": str(exc)})
            reason = str(exc).encode()[:_MAX_REASON].decode(errors="ignore")
            conn.close(CLOSE_LIMIT_EXCEEDED, reason)
            return
        conn.add_close_callback(lambda _conn: slot.release())

    def guard(self, inner: OnMessage) -> OnMessage:
        """``on_message`` that charges each op to its principal before running ``inner``."""
        limits = self._limits

        def on_message(conn: Connection, message: dict[str, Any]) -> None:
            name = _principal_name(conn)
            try:
                limits.check_request(name)
                if message["op"] == "submit":
                    limits.check_bytes(name, conn.message_size)
            except ResourceExhausted as exc:
                send_error(
                    conn,
                    message,
                    error_code(exc),
                    str(exc),
                    retry_after_ms=retry_after_ms(exc.retry_after),
                )
                return
            inner(conn, message)

        return on_message
