"""WebSocket adapter: the live event stream endpoint, served by picows.

One path (``/v1/events``) on its own port. Every text frame is a JSON object with an
``"op"``; this module answers ``ping`` itself and hands every other op to the
``on_message`` hook, so the event protocol (subscribe, resume, submit) can grow without
touching the framing, limits and back-pressure handled here.

Everything runs on the event loop thread: picows calls the listener synchronously from
``data_received``, so no locks are needed and nothing here may block.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Callable, MutableMapping
from http import HTTPStatus
from ssl import SSLContext
from typing import Any, Final
from urllib.parse import parse_qsl

import orjson
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from nexus_fast.api import bad_input
from nexus_fast.telemetry import metrics

__all__ = [
    "CLOSE_GOING_AWAY",
    "CLOSE_INTERNAL_ERROR",
    "CLOSE_INVALID_TEXT",
    "CLOSE_MESSAGE_TOO_BIG",
    "CLOSE_NORMAL",
    "CLOSE_PROTOCOL_ERROR",
    "CLOSE_SLOW_CONSUMER",
    "CLOSE_UNSUPPORTED_DATA",
    "DEFAULT_MAX_SEND_BUFFER",
    "ERROR_BAD_REQUEST",
    "ERROR_UNKNOWN_OP",
    "REJECT_AUTH_ERROR",
    "REJECT_FORBIDDEN",
    "REJECT_NOT_FOUND",
    "REJECT_SHUTTING_DOWN",
    "REJECT_TOO_MANY_CONNECTIONS",
    "REJECT_UNAUTHORIZED",
    "WS_PATH",
    "Admit",
    "Authenticate",
    "Connection",
    "OnConnect",
    "OnMessage",
    "WebSocketServer",
]

logger = logging.getLogger("nexus.websocket")

WS_PATH: Final = "/v1/events"

# --- Close codes (sent in the CLOSE frame; the README documents them) -------------------
# Normal close: the peer asked to close and we echo its close.
CLOSE_NORMAL: Final = 1000
# The server is shutting down; reconnect (and resume from the last index) later.
CLOSE_GOING_AWAY: Final = 1001
# Broken framing (RSV bits set with no extension negotiated, a CONTINUATION with no
# message started); the stream is unusable.
CLOSE_PROTOCOL_ERROR: Final = 1002
# Binary frames: the protocol is JSON text only, so a binary frame is a client bug.
CLOSE_UNSUPPORTED_DATA: Final = 1003
# A text frame that is not UTF-8 violates RFC 6455 and cannot be parsed as JSON.
CLOSE_INVALID_TEXT: Final = 1007
# A frame or a reassembled message exceeded max_message_size; bounded memory per client.
CLOSE_MESSAGE_TOO_BIG: Final = 1009
# A handler raised; the connection state is unknown, so the connection is dropped.
CLOSE_INTERNAL_ERROR: Final = 1011
# The client read too slowly: its outbound buffer filled while the socket was paused, or a
# subscription fell events.subscriber_buffer behind; reason "slow consumer; resume after
# index N" when the protocol layer set ``Connection.resume_hint``.
CLOSE_SLOW_CONSUMER: Final = 4008  # the error table's row for SlowConsumer (api/status.py)
FRAME_HEADROOM: Final = 14  # room for the longest WebSocket frame header (picows)

# --- Error codes in ``{"type": "error", "code": ...}`` frames (connection stays open) ---
# Malformed JSON, not an object, or a missing/non-string "op".
ERROR_BAD_REQUEST: Final = "bad_request"
# An "op" nobody handles (no on_message hook for it).
ERROR_UNKNOWN_OP: Final = "unknown_op"

# --- Upgrade refusals: JSON ``error.code`` and the WEBSOCKET_REJECTED ``reason`` label ---
# The request path is not WS_PATH (HTTP 404).
REJECT_NOT_FOUND: Final = "not_found"
# max_connections are open already (HTTP 503); retry later or elsewhere.
REJECT_TOO_MANY_CONNECTIONS: Final = "too_many_connections"
# stop() has begun; no new connections (HTTP 503).
REJECT_SHUTTING_DOWN: Final = "shutting_down"
# The authenticate hook refused the credentials (HTTP 401).
REJECT_UNAUTHORIZED: Final = "unauthorized"
# The authenticate hook itself raised (HTTP 500); logged, never shown to the client.
REJECT_AUTH_ERROR: Final = "auth_error"
# The admit hook refused the request (HTTP 403, e.g. a foreign Origin).
REJECT_FORBIDDEN: Final = "forbidden"

# Bytes one connection may queue while its socket is paused before it is cut off.
DEFAULT_MAX_SEND_BUFFER: Final = 4 * 1024 * 1024
# How long a closing connection may take to answer our CLOSE before the socket is aborted.
_CLOSE_TIMEOUT: Final = 5.0
# A client that does not finish the HTTP upgrade in this time is dropped (slowloris guard).
_HANDSHAKE_TIMEOUT: Final = 5.0
# Idle seconds before a protocol PING, and seconds to wait for its PONG (dead-peer check).
_AUTO_PING_IDLE: Final = 20.0
_AUTO_PING_REPLY: Final = 20.0

Authenticate = Callable[[dict[str, str], dict[str, str]], "str | None"]
"""``authenticate(headers, query) -> error or None``; header names are lower-case."""

Admit = Callable[[dict[str, str], dict[str, str]], "tuple[int, str] | MutableMapping[str, object]"]
"""``admit(headers, query)``: ``(401 or 403, message)`` refuses the upgrade; a mapping is
copied into the new connection's ``state`` (e.g. its principal)."""

OnMessage = Callable[["Connection", dict[str, Any]], None]
"""``on_message(connection, message)`` for every op other than ``ping``."""

OnConnect = Callable[["Connection"], None]
"""``on_connect(connection)`` once the upgrade completed (it may close the connection,
e.g. over a per-principal cap; close callbacks it adds run however the connection ends)."""


class _PeerErrorLogAdapter(logging.LoggerAdapter[logging.Logger]):
    """Logger handed to picows, with levels fit for a server facing untrusted peers.

    picows logs every connect/disconnect at INFO (DEBUG here: connections are counted in
    metrics) and a client's oversize or malformed frame with ``error`` (INFO here: a remote
    peer must not be able to fill the error log). ``exception`` (a bug) keeps its level.
    """

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        """Per-connection chatter goes to DEBUG."""
        self.debug(msg, *args, **kwargs)

    def error(self, msg: object, *args: object, **kwargs: Any) -> None:
        """Peer-caused protocol errors go to INFO."""
        if kwargs.get("exc_info"):
            super().error(msg, *args, **kwargs)
        else:
            self.log(logging.INFO, msg, *args, **kwargs)


def _error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


def _refuse(status: HTTPStatus, reason: str, message: str) -> WSUpgradeResponseWithListener:
    """Build an HTTP error response to an upgrade request, with a JSON body."""
    metrics.WEBSOCKET_REJECTED.labels(reason=reason).inc()
    headers = [("Content-Type", "application/json"), ("Server", "nexus-fast")]
    if status == HTTPStatus.UNAUTHORIZED:
        headers.append(("WWW-Authenticate", 'Bearer realm="nexus"'))
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        headers.append(("Retry-After", "1"))
    response = WSUpgradeResponse.create_error_response(
        status, _error_body(reason, message), headers
    )
    return WSUpgradeResponseWithListener(response, None)


class Connection(WSListener):
    """One WebSocket client: framing, limits, back-pressure and the ``ping`` op.

    Outbound messages go straight to the socket while it accepts writes; when asyncio
    pauses writing (socket buffer above its high-water mark) they queue here, up to
    ``max_send_buffer`` bytes. Past that the client is cut off with
    :data:`CLOSE_SLOW_CONSUMER`, so one slow reader never grows memory without bound.
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        server: WebSocketServer,
        headers: dict[str, str],
        query: dict[str, str],
    ) -> None:
        super().__init__()
        self.id: int = next(self._ids)
        self.headers = headers
        """Upgrade request headers, names lower-cased."""
        self.query = query
        """Upgrade request query parameters (first value of each)."""
        self.state: MutableMapping[str, object] = {}
        """Free slot for the protocol layer (subscriptions, identity, last index)."""
        self.last_activity: float = time.monotonic()
        self.messages_sent = 0
        self.messages_received = 0
        self.message_size = 0
        """Bytes of the text message being handled (for byte budgets)."""
        self.remote: str = ""
        self._server = server
        self._transport: WSTransport | None = None
        self._paused = False
        self._pending: collections.deque[bytes] = collections.deque()
        self._pending_bytes = 0
        self._closing = False
        self._fragments: bytearray | None = None
        self._abort_handle: asyncio.TimerHandle | None = None
        self._close_callbacks: list[Callable[[Connection], None]] = []
        self._disconnected: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writable: asyncio.Future[None] | None = None
        self.resume_hint: Callable[[], int | None] | None = None
        """Index a cut-off client should resume after (put in the slow-consumer reason)."""

    # --- public API -----------------------------------------------------------------

    @property
    def is_open(self) -> bool:
        """True until a close has started (ours or the peer's)."""
        return self._transport is not None and not self._closing

    @property
    def writable(self) -> bool:
        """True while open and the socket accepts writes without queueing here."""
        return self._transport is not None and not self._closing and not self._paused

    async def wait_writable(self) -> None:
        """Wait until the socket drains (``resume_writing``) or the connection is gone."""
        if not self._paused or self._closing or self._transport is None:
            return
        if self._writable is None:
            self._writable = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._writable)

    def send_json(self, obj: object) -> bool:
        """Encode ``obj`` with orjson and send it as one text frame; see send_bytes_text."""
        return self.send_bytes_text(orjson.dumps(obj))

    def send_bytes_text(self, data: bytes) -> bool:
        """Send already-encoded UTF-8 JSON as one text frame (encode once, fan out bytes).

        Returns False if the connection is closing, or if the buffer bound was exceeded,
        in which case the connection is closed with :data:`CLOSE_SLOW_CONSUMER`.
        """
        transport = self._transport
        if transport is None or self._closing:
            return False
        if self._paused:
            if self._pending_bytes + len(data) > self._server.max_send_buffer:
                logger.info(
                    "closing slow websocket client %s (%s): %d bytes queued",
                    self.id,
                    self.remote,
                    self._pending_bytes,
                )
                self.close(CLOSE_SLOW_CONSUMER, self.slow_consumer_reason())
                return False
            self._pending.append(data)
            self._pending_bytes += len(data)
            return True
        transport.send(WSMsgType.TEXT, data)
        self._count_sent()
        return True

    def send_text_frame(self, frame: bytearray) -> bool:
        """Like :meth:`send_bytes_text` for a payload built after :data:`FRAME_HEADROOM`
        spare bytes: picows writes the frame header into them instead of copying the
        payload into its own buffer (a large fan-out frame is copied once per subscriber
        either way; this saves the second copy)."""
        transport = self._transport
        if transport is None or self._closing:
            return False
        if self._paused:
            return self.send_bytes_text(bytes(memoryview(frame)[FRAME_HEADROOM:]))
        transport.send_reuse_external_bytearray(WSMsgType.TEXT, frame, FRAME_HEADROOM)
        self._count_sent()
        return True

    def slow_consumer_reason(self) -> str:
        """Close reason for :data:`CLOSE_SLOW_CONSUMER`, with the index to resume after."""
        hint = self.resume_hint() if self.resume_hint is not None else None
        return "slow consumer" if hint is None else f"slow consumer; resume after index {hint}"

    def close(
        self, code: int = CLOSE_NORMAL, reason: str = "", *, timeout: float | None = None
    ) -> None:
        """Send a CLOSE frame and drop the socket once the peer answers (or ``timeout``).

        Queued outbound messages are discarded. Safe to call more than once.
        """
        transport = self._transport
        if transport is None or self._closing:
            return
        self._closing = True
        self._pending.clear()
        self._pending_bytes = 0
        self._fragments = None
        self._wake_writable()
        # picows types the code as its enum; private-range codes (4000-4999) pass as int.
        transport.send_close(code, reason.encode())  # type: ignore[arg-type]
        wait = _CLOSE_TIMEOUT if timeout is None else timeout
        self._abort_handle = asyncio.get_running_loop().call_later(wait, self.abort)

    def abort(self) -> None:
        """Drop the socket now, without waiting for the closing handshake."""
        if self._transport is not None and not self._transport.is_disconnected:
            self._transport.disconnect(graceful=False)

    def peer_certificate(self) -> dict[str, Any] | None:
        """The client certificate the TLS handshake verified (``getpeercert()``), if any."""
        if self._transport is None:
            return None
        cert = self._transport.underlying_transport.get_extra_info("peercert")
        return cert if isinstance(cert, dict) and cert else None

    def add_close_callback(self, callback: Callable[[Connection], None]) -> None:
        """Call ``callback(connection)`` once the connection is gone (e.g. unsubscribe)."""
        self._close_callbacks.append(callback)

    async def wait_closed(self) -> None:
        """Wait until the socket is disconnected."""
        await asyncio.shield(self._disconnected)

    # --- picows callbacks -------------------------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        """Register the connection with the server and count it."""
        self._transport = transport
        peer = transport.underlying_transport.get_extra_info("peername")
        self.remote = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)
        self._server._connection_opened(self)
        logger.debug("websocket client %s connected from %s", self.id, self.remote)
        on_connect = self._server.on_connect
        if on_connect is not None:
            on_connect(self)

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        """Unregister, cancel timers and run close callbacks."""
        if self._abort_handle is not None:
            self._abort_handle.cancel()
            self._abort_handle = None
        self._closing = True
        self._pending.clear()
        self._pending_bytes = 0
        self._server._connection_closed(self)
        self._wake_writable()
        callbacks, self._close_callbacks = self._close_callbacks, []
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                logger.exception("websocket close callback failed for client %s", self.id)
        if not self._disconnected.done():
            self._disconnected.set_result(None)
        logger.debug("websocket client %s disconnected", self.id)

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        """Dispatch one frame; a handler exception closes only this connection (1011)."""
        self.last_activity = time.monotonic()
        try:
            self._on_frame(transport, frame)
        except Exception:
            logger.exception(
                "websocket handler failed; closing client %s (%s)", self.id, self.remote
            )
            self.close(CLOSE_INTERNAL_ERROR, "internal error")

    def pause_writing(self) -> None:
        """The socket buffer crossed its high-water mark: queue here from now on."""
        self._paused = True

    def resume_writing(self) -> None:
        """The socket drained: flush what queued, until it pauses again or empties."""
        self._paused = False
        transport = self._transport
        if transport is None:
            return
        pending = self._pending
        while pending and not self._paused and not self._closing:
            data = pending.popleft()
            self._pending_bytes -= len(data)
            transport.send(WSMsgType.TEXT, data)
            self._count_sent()
        if not self._paused:
            self._wake_writable()

    # --- internals ----------------------------------------------------------------------

    def _wake_writable(self) -> None:
        waiter, self._writable = self._writable, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _count_sent(self) -> None:
        self.messages_sent += 1
        metrics.WEBSOCKET_MESSAGES_SENT.inc()

    def _on_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            # RFC 6455 5.2: RSV bits are for negotiated extensions, and we negotiate none.
            self._protocol_error(CLOSE_PROTOCOL_ERROR, "rsv_bits", "RSV bits set")
            return
        msg_type = frame.msg_type
        if msg_type == WSMsgType.TEXT:
            if self._fragments is not None:
                self._protocol_error(
                    CLOSE_PROTOCOL_ERROR,
                    "unfinished_message",
                    "new message before the previous one ended",
                )
            elif frame.fin:
                self._on_text(frame.get_payload_as_memoryview())
            else:
                self._fragments = bytearray(frame.get_payload_as_memoryview())
        elif msg_type == WSMsgType.CONTINUATION:
            fragments = self._fragments
            if fragments is None:
                if not self._closing:
                    self._protocol_error(
                        CLOSE_PROTOCOL_ERROR,
                        "orphan_continuation",
                        "continuation frame without a message",
                    )
                return
            if len(fragments) + frame.payload_size > self._server.max_message_size:
                self.close(CLOSE_MESSAGE_TOO_BIG, "message too big")
                return
            fragments += frame.get_payload_as_memoryview()
            if frame.fin:
                self._fragments = None
                self._on_text(memoryview(fragments))
        elif msg_type == WSMsgType.CLOSE:
            self._on_close_frame(transport, frame)
        elif msg_type == WSMsgType.BINARY:
            self.messages_received += 1
            metrics.WEBSOCKET_MESSAGES_RECEIVED.inc()
            self.close(CLOSE_UNSUPPORTED_DATA, "binary frames not supported")
        # PING is answered by picows (enable_auto_pong); PONG only refreshes last_activity.

    def _on_close_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if transport.is_close_frame_sent:
            # The peer answered our CLOSE: the handshake is complete.
            transport.disconnect()
            return
        code = frame.get_close_code()
        # An empty CLOSE carries no code; 1000 is the polite answer.
        echo = WSCloseCode.OK if code == WSCloseCode.NO_INFO else code
        self._closing = True
        self._pending.clear()
        self._pending_bytes = 0
        transport.send_close(echo, frame.get_close_message())
        transport.disconnect()

    def _on_text(self, payload: memoryview) -> None:
        if self._closing:
            return
        self.messages_received += 1
        metrics.WEBSOCKET_MESSAGES_RECEIVED.inc()
        self.message_size = len(payload)
        try:
            message = orjson.loads(payload)
        except orjson.JSONDecodeError as exc:
            # orjson also rejects bad UTF-8; tell the two apart only on this slow path.
            try:
                bytes(payload).decode("utf-8")
            except UnicodeDecodeError:
                self._protocol_error(
                    CLOSE_INVALID_TEXT, "invalid_utf8", "invalid UTF-8 in text frame"
                )
                return
            self._send_error(ERROR_BAD_REQUEST, f"malformed JSON: {exc}")
            return
        if not isinstance(message, dict):
            self._send_error(ERROR_BAD_REQUEST, "message must be a JSON object")
            return
        op = message.get("op")
        if not isinstance(op, str) or not op:
            self._send_error(ERROR_BAD_REQUEST, "message needs a string 'op'", message)
            return
        if op == "ping":
            self.send_json(
                {"type": "pong", "id": message.get("id"), "ts": time.time_ns() // 1_000_000}
            )
            return
        on_message = self._server.on_message
        if on_message is None:
            self._send_error(ERROR_UNKNOWN_OP, f"unknown op {op!r}", message)
            return
        on_message(self, message)

    def _protocol_error(self, code: int, reason: str, message: str) -> None:
        """Close for a frame that breaks RFC 6455; counted, logged once per peer a minute."""
        if self._closing:
            return
        bad_input.report("websocket", reason, self.remote, f"{message} (closing with {code})")
        self.close(code, message)

    def _send_error(self, code: str, message: str, request: dict[str, Any] | None = None) -> None:
        frame: dict[str, object] = {"type": "error", "code": code, "message": message}
        if request is not None and "id" in request:
            frame["id"] = request["id"]
        self.send_json(frame)


class WebSocketServer:
    """picows server for :data:`WS_PATH`, with connection limits and graceful stop.

    ``authenticate(headers, query)`` returns None to accept or an error string to refuse the
    upgrade with HTTP 401 (the token may be in ``authorization: Bearer ...`` or ``?token=``;
    the hook decides). ``on_message(connection, message)`` receives every JSON object whose
    ``op`` is not ``ping``; if it is None such ops get an ``unknown_op`` error frame.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        max_connections: int,
        max_message_size: int,
        ssl_context: SSLContext | None = None,
        authenticate: Authenticate | None = None,
        admit: Admit | None = None,
        on_message: OnMessage | None = None,
        on_connect: OnConnect | None = None,
        max_send_buffer: int = DEFAULT_MAX_SEND_BUFFER,
    ) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be >= 1")
        if max_message_size < 1:
            raise ValueError("max_message_size must be >= 1")
        self.host = host
        self.max_connections = max_connections
        self.max_message_size = max_message_size
        self.max_send_buffer = max_send_buffer
        self.authenticate = authenticate
        self.admit = admit
        self.on_message = on_message
        self.on_connect = on_connect
        self._requested_port = port
        self._ssl_context = ssl_context
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[Connection] = set()
        self._accepting = False

    @property
    def active_connections(self) -> int:
        """Open (upgraded, not yet disconnected) connections."""
        return len(self._connections)

    @property
    def connections(self) -> frozenset[Connection]:
        """A snapshot of the open connections (for fan-out and admin views)."""
        return frozenset(self._connections)

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0)."""
        if self._server is None:
            return self._requested_port
        sockets = getattr(self._server, "sockets", None) or ()
        for sock in sockets:
            return int(sock.getsockname()[1])
        return self._requested_port

    async def start(self) -> None:
        """Bind and start accepting; raises OSError with a clear message if the port is taken."""
        if self._server is not None:
            raise RuntimeError("WebSocketServer already started")
        try:
            self._server = await ws_create_server(
                self._listener_factory,
                self.host,
                self._requested_port,
                ssl=self._ssl_context,
                # Oversize frames are refused from the header, before their payload is read.
                max_frame_size=self.max_message_size,
                enable_auto_pong=True,
                enable_auto_ping=True,
                auto_ping_idle_timeout=_AUTO_PING_IDLE,
                auto_ping_reply_timeout=_AUTO_PING_REPLY,
                websocket_handshake_timeout=_HANDSHAKE_TIMEOUT,
                # We catch handler exceptions ourselves; this is the backstop.
                disconnect_on_exception=True,
                logger_name=_PeerErrorLogAdapter(logging.getLogger("nexus.websocket.picows"), {}),
                reuse_address=True,
            )
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"cannot listen for WebSocket on {self.host}:{self._requested_port}: "
                f"{exc.strerror or exc}",
            ) from exc
        self._accepting = True
        scheme = "wss" if self._ssl_context is not None else "ws"
        logger.info("websocket listening on %s://%s:%d%s", scheme, self.host, self.port, WS_PATH)

    async def stop(self, deadline: float) -> None:
        """Stop accepting, close every connection with 1001, abort what remains after
        ``deadline`` seconds."""
        self._accepting = False
        server = self._server
        if server is not None:
            server.close()
        connections = list(self._connections)
        for conn in connections:
            # The abort timer is a backstop; the wait below is what enforces the deadline.
            conn.close(CLOSE_GOING_AWAY, "server shutting down", timeout=max(deadline, 0.0) + 1.0)
        if connections:
            waiters = [asyncio.ensure_future(conn.wait_closed()) for conn in connections]
            _, still_open = await asyncio.wait(waiters, timeout=max(deadline, 0.0))
            for waiter in still_open:
                waiter.cancel()
            for conn in list(self._connections):
                conn.abort()
            if still_open:
                logger.info(
                    "aborted %d websocket connections at the stop deadline", len(still_open)
                )
                # Give the aborts one loop turn to run on_ws_disconnected.
                await asyncio.sleep(0)
        if server is not None:
            try:
                await asyncio.wait_for(server.wait_closed(), timeout=1.0)
            except TimeoutError:
                logger.debug("websocket server wait_closed timed out")
            self._server = None

    # --- internals ------------------------------------------------------------------

    def _listener_factory(
        self, request: WSUpgradeRequest
    ) -> Connection | WSUpgradeResponseWithListener:
        """Route and admit one upgrade request (picows calls this before the 101)."""
        raw_path, _, raw_query = request.path.partition(b"?")
        path = raw_path.decode("latin-1")
        if path != WS_PATH:
            return _refuse(HTTPStatus.NOT_FOUND, REJECT_NOT_FOUND, f"no websocket at {path!r}")
        if not self._accepting:
            return _refuse(
                HTTPStatus.SERVICE_UNAVAILABLE, REJECT_SHUTTING_DOWN, "server is shutting down"
            )
        if len(self._connections) >= self.max_connections:
            return _refuse(
                HTTPStatus.SERVICE_UNAVAILABLE,
                REJECT_TOO_MANY_CONNECTIONS,
                f"connection limit reached ({self.max_connections})",
            )
        headers = {name.lower(): value for name, value in request.headers.items()}
        query = dict(parse_qsl(raw_query.decode("latin-1"), keep_blank_values=True))
        if self.authenticate is not None:
            try:
                error = self.authenticate(headers, query)
            except Exception:
                logger.exception("websocket authenticate hook failed")
                return _refuse(
                    HTTPStatus.INTERNAL_SERVER_ERROR, REJECT_AUTH_ERROR, "authentication failed"
                )
            if error is not None:
                return _refuse(HTTPStatus.UNAUTHORIZED, REJECT_UNAUTHORIZED, error)
        admitted: MutableMapping[str, object] = {}
        if self.admit is not None:
            verdict = self.admit(headers, query)
            if isinstance(verdict, tuple):
                status, message = verdict
                if status == HTTPStatus.UNAUTHORIZED:
                    return _refuse(HTTPStatus.UNAUTHORIZED, REJECT_UNAUTHORIZED, message)
                return _refuse(HTTPStatus.FORBIDDEN, REJECT_FORBIDDEN, message)
            admitted = verdict
        # Counted in on_ws_connected: picows calls it synchronously right after this
        # returns, so the limit check above cannot race with another upgrade.
        connection = Connection(self, headers, query)
        connection.state.update(admitted)
        return connection

    def _connection_opened(self, conn: Connection) -> None:
        self._connections.add(conn)
        metrics.WEBSOCKET_CONNECTIONS.inc()
        metrics.WEBSOCKET_CONNECTIONS_ACTIVE.inc()

    def _connection_closed(self, conn: Connection) -> None:
        if conn in self._connections:
            self._connections.discard(conn)
            metrics.WEBSOCKET_CONNECTIONS_ACTIVE.dec()
