"""Connection-level limits of the HTTP port: a header timeout and a cap per client address.

Both act before aiohttp has a request, so no middleware could: a client that opens
connections and sends headers slowly (or never finishes them) holds sockets and memory
without ever reaching a handler.

- Header timeout: aiohttp closes a connection whose keep-alive timer fires while it waits
  for a request's headers; the timer starts when the connection opens and again after each
  response, and bytes trickling in do not reset it. Running it with
  ``keepalive_timeout = server.http_header_timeout`` (:func:`handler_options`) closes a
  connection that has not completed a request's headers that long after connecting or after
  its last response (an idle keep-alive connection is closed as late). A request being
  handled (a long poll, a stream) is not idle and is never cut by it.
- Per-address cap: :class:`ConnectionCap` counts open connections per client IP through the
  ``web.Server`` connection hooks and answers one over ``server.http_max_connections_per_ip``
  with ``429`` and a JSON error, then closes it; counted in
  ``nexus_http_connections_refused_total``.
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

from aiohttp import web

from nexus_fast.telemetry import metrics

__all__ = ["ConnectionCap", "handler_options"]

_REFUSAL: Final = (
    b"HTTP/1.1 429 Too Many Requests\r\n"
    b"Content-Type: application/json\r\n"
    b"Connection: close\r\n"
    b"Retry-After: 1\r\n"
    b"Content-Length: %d\r\n\r\n%s"
)
_REFUSAL_BODY: Final = (
    b'{"error":"too many connections from this address","code":"RESOURCE_EXHAUSTED"}'
)


def _refuse(handler: Any, transport: asyncio.Transport) -> None:
    if not transport.is_closing():
        transport.write(_REFUSAL % (len(_REFUSAL_BODY), _REFUSAL_BODY))
    handler.force_close()  # closes the transport after the write above


def handler_options(header_timeout: float) -> dict[str, Any]:
    """``web.AppRunner`` keyword arguments for aiohttp's request handler (see the module)."""
    return {"keepalive_timeout": header_timeout}


class ConnectionCap:
    """Open connections per client IP on one ``web.Server``, refused past ``per_ip``."""

    def __init__(self, per_ip: int) -> None:
        self.per_ip = per_ip
        self.open: dict[str, int] = {}
        self._counted: dict[Any, str] = {}

    def install(self, server: web.Server) -> None:
        """Wrap ``server``'s connection hooks (aiohttp calls them for every connection)."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            made(handler, transport)
            peer = transport.get_extra_info("peername")
            ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            count = self.open.get(ip, 0)
            if count >= self.per_ip:
                metrics.HTTP_CONNECTIONS_REFUSED.labels(reason="per_ip").inc()
                # After aiohttp has started the connection's task (it must not find it gone).
                asyncio.get_running_loop().call_soon(_refuse, handler, transport)
                return
            self.open[ip] = count + 1
            self._counted[handler] = ip

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            ip = self._counted.pop(handler, None)
            if ip is not None:
                left = self.open[ip] - 1
                if left:
                    self.open[ip] = left
                else:
                    del self.open[ip]
            lost(handler, exc)

        # web.Server calls these through the instance: wrapping them there is enough.
        setattr(server, "connection_made", connection_made)  # noqa: B010
        setattr(server, "connection_lost", connection_lost)  # noqa: B010
