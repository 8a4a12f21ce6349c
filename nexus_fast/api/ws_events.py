"""The WebSocket event protocol: subscribe / unsubscribe / submit on ``/v1/events``.

:class:`EventStreamProtocol` is the ``on_message`` hook of
:class:`~nexus_fast.api.ws_server.WebSocketServer`, which owns framing, limits, ``ping``
and back-pressure. Each subscription is one task reading the event bus at its own cursor
and sending ``events`` frames built from the events' cached JSON (encode once, fan out
bytes); caught up, it parks and the bus sends each publish to it in the publish itself.
It sends only while the socket is writable: when picows pauses writing the task
waits, and if the subscription then falls more than ``events.subscriber_buffer`` events
behind, the connection is closed with 4008 and ``slow consumer; resume after index N``.
The protocol is documented in docs/events.md.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import re
from collections.abc import Awaitable, Callable
from typing import Any, Final

import orjson
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import json_format

from nexus_fast import errors
from nexus_fast.api.status import row
from nexus_fast.api.ws_server import (
    ERROR_BAD_REQUEST,
    ERROR_UNKNOWN_OP,
    FRAME_HEADROOM,
    Connection,
)
from nexus_fast.codec.frames import EventEnvelope
from nexus_fast.codec.json import submit_result_to_dict
from nexus_fast.core.acting import ANONYMOUS
from nexus_fast.core.events import EventBus, Subscription
from nexus_fast.errors import NexusError
from nexus_fast.logs import get_logger
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.security import auditing
from nexus_fast.security.audit import OUTCOME_OK
from nexus_fast.security.principal import Principal
from nexus_fast.security.ws_auth import PRINCIPAL_KEY
from nexus_fast.telemetry import metrics
from nexus_fast.telemetry.trace_context import TraceContext, from_headers, incoming

__all__ = [
    "MAX_FRAME_BYTES",
    "MAX_FRAME_EVENTS",
    "EventStreamProtocol",
    "SubmitCommands",
]

log = get_logger("ws.events")

# (specs, actor, trace): actor is the submitting principal's name, put on the commands'
# events; trace the submission's W3C trace context (None: none).
SubmitCommands = Callable[
    [list[pb.CommandSpec], str, TraceContext | None], Awaitable[pb.SubmitCommandsResponse]
]
"""``submit_commands(specs) -> SubmitCommandsResponse``; raises NexusError subclasses."""

MAX_FRAME_EVENTS: Final = 500
"""Most events in one ``events`` frame."""
MAX_FRAME_BYTES: Final = 512 * 1024
"""Soft cap on one ``events`` frame (under the 1 MiB default of common client libraries)."""
MAX_INFLIGHT_SUBMITS: Final = 8
"""Submits one connection may have pending at once."""

_STATE_KEY: Final = "events"
_EVENTS_PREFIX: Final = b'{"type":"events","subscription":'
_FRAME: Final = bytearray()  # bytearray().join: one copy into a buffer picows frames in place
_HEADROOM: Final = bytes(FRAME_HEADROOM)


class _ConnectionState:
    """The protocol's per-connection state: subscriptions, their tasks, pending submits."""

    __slots__ = ("ids", "submits", "subs", "tasks")

    def __init__(self) -> None:
        self.ids = itertools.count(1)
        self.subs: dict[str, Subscription] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.submits: set[asyncio.Task[None]] = set()

    def resume_after(self) -> int | None:
        """The smallest cursor over the subscriptions: safe to resume all of them after."""
        return min((sub.cursor for sub in self.subs.values()), default=None)


def _reply(conn: Connection, request: dict[str, Any], frame: dict[str, Any]) -> None:
    if "id" in request:
        frame["id"] = request["id"]
    conn.send_bytes_text(orjson.dumps(frame))


def _error(conn: Connection, request: dict[str, Any], code: str, message: str) -> None:
    _reply(conn, request, {"type": "error", "code": code, "message": message})


def _fail(
    conn: Connection, request: dict[str, Any] | None, exc: NexusError, sid: str | None = None
) -> bool:
    """Report a core error as the one table says: an ``error`` frame, a ``reset`` frame,
    or closing the connection. Returns True if the connection is being closed."""
    found = row(exc)
    auditing.finish(found.grpc.name)  # ends an audited op (submit); elsewhere a no-op
    if found.ws_frame == "close" and found.ws_close is not None:
        reason = conn.slow_consumer_reason() if isinstance(exc, errors.SlowConsumer) else str(exc)
        conn.close(found.ws_close, reason)
        return True
    if found.ws_frame == "reset" and isinstance(exc, errors.EventIndexTooOld):
        frame = _reset_frame(sid, exc)
    else:
        frame = {"type": "error", "code": found.code, "message": str(exc)}
    if request is None:
        conn.send_bytes_text(orjson.dumps(frame))
    else:
        _reply(conn, request, frame)
    return False


_URLSAFE_TO_STANDARD: Final = str.maketrans("-_", "+/")
_BASE64_CHARS: Final = re.compile(r"[A-Za-z0-9+/\-_]*")


def strict_b64decode(value: object) -> bytes:
    """Decode a proto3 JSON ``bytes`` value, refusing anything that is not base64.

    proto3 JSON accepts the standard and the URL-safe alphabet, padded or not (as
    ``json_format`` does), but ``json_format`` also drops characters outside the alphabet
    (``"!!!"`` became ``b''``). Here every character must belong to one alphabet, padding
    (if any) must be exact, and re-encoding must give the input back (no stray bits).
    """
    if not isinstance(value, str):
        raise ValueError("must be a base64 string")
    body = value.rstrip("=")
    if not _BASE64_CHARS.fullmatch(body):
        raise ValueError("is not valid base64 (characters outside the alphabet)")
    padding = len(value) - len(body)
    missing = -len(body) % 4
    if missing == 3:
        raise ValueError("is not valid base64 (truncated: length is 1 more than a multiple of 4)")
    if padding and padding != missing:
        raise ValueError("is not valid base64 (wrong padding)")
    if ("-" in body or "_" in body) and ("+" in body or "/" in body):
        raise ValueError("is not valid base64 (mixes the standard and URL-safe alphabets)")
    standard = body.translate(_URLSAFE_TO_STANDARD)
    try:
        data = base64.b64decode(standard + "=" * missing, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("is not valid base64 (characters outside the alphabet)") from None
    if base64.b64encode(data).decode("ascii").rstrip("=") != standard:
        raise ValueError("is not valid base64 (non-canonical: stray bits in the last character)")
    return data


def _check_bytes_fields(item: object, message: Any, path: str) -> None:
    """Raise InvalidArgument naming the first ``bytes`` field that is not strict base64.

    Walks the JSON object along the message descriptor (nested and repeated messages
    too); everything else is left to ``json_format``, which names its own errors.
    """
    if not isinstance(item, dict):
        return
    for field in message.fields:
        key = field.json_name if field.json_name in item else field.name
        if key not in item:
            continue
        value = item[key]
        where = f"{path}.{key}"
        repeated = field.is_repeated
        values = value if repeated and isinstance(value, list) else [value]
        for i, one in enumerate(values):
            at = f"{where}[{i}]" if repeated else where
            if field.type == pb_descriptor.FieldDescriptor.TYPE_BYTES and one is not None:
                try:
                    strict_b64decode(one)
                except ValueError as exc:
                    raise errors.InvalidArgument(at, str(exc)) from None
            elif field.message_type is not None and not field.message_type.GetOptions().map_entry:
                _check_bytes_fields(one, field.message_type, at)


_DECIMAL: Final = re.compile(r"[0-9]{1,20}")


def json_uint(value: object, name: str) -> int | None:
    """A uint64 from JSON: a number, or a decimal string as canonical proto3 JSON writes
    64-bit integers (``"42"``); ``None`` stays ``None``. Raises TypeError otherwise."""
    if value is None:
        return None
    if isinstance(value, str) and _DECIMAL.fullmatch(value):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**64:
        raise TypeError(
            f"'{name}' must be a non-negative integer (a JSON number or a decimal string) or null"
        )
    return value


def _string_list(value: object, name: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"'{name}' must be a list of strings")
    return value


class EventStreamProtocol:
    """``on_message`` hook implementing the event ops on top of the framing layer.

    ``submit_commands`` is the commands core's batch submit (``None``: ``submit`` answers
    an ``unavailable`` error frame). ``max_subscriptions`` bounds subscriptions per
    connection.
    """

    def __init__(
        self,
        bus: EventBus,
        *,
        max_subscriptions: int,
        submit_commands: SubmitCommands | None = None,
    ) -> None:
        self.bus = bus
        self.max_subscriptions = max_subscriptions
        self.submit_commands = submit_commands
        self._delivered = metrics.EVENTS_DELIVERED.labels(transport="websocket")

    def __call__(self, conn: Connection, message: dict[str, Any]) -> None:
        """Dispatch one client op (``ping`` is answered by the framing layer)."""
        op = message["op"]
        if op == "subscribe":
            self._subscribe(conn, message)
        elif op == "unsubscribe":
            self._unsubscribe(conn, message)
        elif op == "submit":
            self._submit(conn, message)
        else:
            _error(conn, message, ERROR_UNKNOWN_OP, f"unknown op {op!r}")

    # ------------------------------------------------------------ ops

    def _state(self, conn: Connection) -> _ConnectionState:
        state = conn.state.get(_STATE_KEY)
        if not isinstance(state, _ConnectionState):
            state = _ConnectionState()
            conn.state[_STATE_KEY] = state
            conn.resume_hint = state.resume_after
            conn.add_close_callback(self._closed)
        return state

    def _subscribe(self, conn: Connection, message: dict[str, Any]) -> None:
        try:
            topics = _string_list(message.get("topics"), "topics")
            keys = _string_list(message.get("keys"), "keys")
            after = json_uint(message.get("after_index"), "after_index")
        except TypeError as exc:
            _error(conn, message, ERROR_BAD_REQUEST, str(exc))
            return
        state = self._state(conn)
        try:
            if len(state.subs) >= self.max_subscriptions:
                raise errors.ResourceExhausted(
                    f"at most {self.max_subscriptions} subscriptions per connection"
                )
            sub = self.bus.subscribe(topics, keys, after, transport="websocket")
        except NexusError as exc:
            _fail(conn, message, exc)
            return
        sid = f"s{next(state.ids)}"
        state.subs[sid] = sub
        _reply(
            conn,
            message,
            {
                "type": "subscribed",
                "subscription": sid,
                "after_index": sub.cursor,
                "last_index": self.bus.last_index,
            },
        )
        state.tasks[sid] = asyncio.get_running_loop().create_task(
            self._pump(conn, state, sid, sub), name=f"ws-sub-{conn.id}-{sid}"
        )

    def _unsubscribe(self, conn: Connection, message: dict[str, Any]) -> None:
        sid = message.get("subscription")
        if not isinstance(sid, str):
            _error(conn, message, ERROR_BAD_REQUEST, "'subscription' must be a string")
            return
        state = self._state(conn)
        sub = state.subs.pop(sid, None)
        if sub is None:
            _fail(conn, message, errors.NotFound(f"no subscription {sid!r}"))
            return
        task = state.tasks.pop(sid, None)
        if task is not None:
            task.cancel()
        sub.close()
        _reply(conn, message, {"type": "unsubscribed", "subscription": sid, "index": sub.cursor})

    def _submit(self, conn: Connection, message: dict[str, Any]) -> None:
        raw = message.get("commands")
        if not isinstance(raw, list) or not raw or not all(isinstance(c, dict) for c in raw):
            _error(
                conn, message, ERROR_BAD_REQUEST, "'commands' must be a non-empty list of objects"
            )
            return
        submit = self.submit_commands
        state = self._state(conn)
        specs: list[pb.CommandSpec] = []
        try:
            if submit is None:
                raise errors.Unavailable("command submission is not available")
            if len(state.submits) >= MAX_INFLIGHT_SUBMITS:
                raise errors.ResourceExhausted(
                    f"at most {MAX_INFLIGHT_SUBMITS} submits in flight per connection"
                )
            for i, item in enumerate(raw):
                _check_bytes_fields(item, pb.CommandSpec.DESCRIPTOR, f"commands[{i}]")
                try:
                    specs.append(json_format.ParseDict(item, pb.CommandSpec()))
                except json_format.ParseError as exc:
                    raise errors.InvalidArgument(f"commands[{i}]", str(exc)) from None
        except NexusError as exc:
            _fail(conn, message, exc)
            return
        task = asyncio.get_running_loop().create_task(
            self._run_submit(conn, message, specs, submit)
        )
        state.submits.add(task)
        task.add_done_callback(state.submits.discard)

    async def _run_submit(
        self,
        conn: Connection,
        message: dict[str, Any],
        specs: list[pb.CommandSpec],
        submit: SubmitCommands,
    ) -> None:
        try:
            principal = conn.state.get(PRINCIPAL_KEY)
            actor = principal.name if isinstance(principal, Principal) else ANONYMOUS
            # W3C trace context: the submit op's own, else the upgrade request's headers.
            traceparent = message.get("traceparent")
            trace = (
                incoming(traceparent, message.get("tracestate"))
                if isinstance(traceparent, str)
                else from_headers(conn.headers)
            )
            response = await submit(specs, actor, trace)
        except NexusError as exc:
            _fail(conn, message, exc)
            return
        except Exception:
            log.exception("websocket submit failed", extra={"client": conn.id})
            _fail(conn, message, NexusError("internal error"))
            return
        auditing.finish(OUTCOME_OK)  # normally recorded with the commit already
        # The builder of the events' payloads: same enum names, every field present.
        results = [submit_result_to_dict(r) for r in response.results]
        _reply(conn, message, {"type": "submitted", "results": results, "index": response.index})

    # ------------------------------------------------------------ delivery

    async def _pump(
        self, conn: Connection, state: _ConnectionState, sid: str, sub: Subscription
    ) -> None:
        """Send one subscription's events for as long as it lives.

        Catching up, it reads and sends batch after batch. Caught up, it parks the
        subscription (:meth:`~nexus_fast.core.events.Subscription.park`): the bus then
        sends each publish through ``send`` right away, and this task only wakes again
        to catch up, to wait for a paused socket, or to send an idle bookmark.
        """
        prefix = _EVENTS_PREFIX + orjson.dumps(sid) + b',"events":['
        interval = self.bus.config.bookmark_interval
        delivered = self._delivered

        def send(events: list[EventEnvelope]) -> bool:
            for start, end, body in sub.json_frames(events, MAX_FRAME_BYTES):
                if not conn.writable:
                    # Sent only what the socket took; the rest is read again once it drains.
                    sub.cursor = events[start].index - 1
                    return False
                try:
                    conn.send_text_frame(_FRAME.join((_HEADROOM, prefix, body, b"]}")))
                except BaseException:
                    sub.cursor = events[start].index - 1  # not sent: never skipped
                    raise
                delivered.inc(end - start)
            return True

        try:
            while True:
                if not conn.writable:
                    if not conn.is_open:
                        return
                    # Paused by picows: read nothing more until the socket drains; cut off
                    # if the subscription falls too far behind meanwhile.
                    await sub.guarded(conn.wait_writable())
                    continue
                events = sub.read(MAX_FRAME_EVENTS)
                if events:
                    sub.sent_now()
                    send(events)
                    if sub.lag > 0:
                        await asyncio.sleep(0)  # one batch per turn: fair to the other tasks
                    continue
                if sub.lag > 0:
                    await asyncio.sleep(0)  # nothing matched in this stretch; keep scanning
                    continue
                idle = sub.idle()
                if idle >= interval:
                    conn.send_bytes_text(
                        b'{"type":"bookmark","subscription":%s,"index":%d}'
                        % (orjson.dumps(sid), sub.cursor)
                    )
                    sub.sent_now()
                    continue
                await sub.park(send, MAX_FRAME_EVENTS, interval - idle)
        except errors.Unavailable:
            pass  # the bus closed: the server is stopping and closes the connection
        except NexusError as exc:  # slow consumer (closes), index too old (reset frame)
            if isinstance(exc, errors.SlowConsumer):
                log.info(
                    "closing slow websocket subscriber",
                    extra={"client": conn.id, "subscription": sid, "lag": exc.lag},
                )
            if not _fail(conn, None, exc, sid):
                state.subs.pop(sid, None)  # the subscription ended; the connection stays
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("websocket subscription failed", extra={"client": conn.id})
            conn.close(1011, "internal error")
        finally:
            state.tasks.pop(sid, None)
            sub.close()

    def _closed(self, conn: Connection) -> None:
        state = conn.state.get(_STATE_KEY)
        if not isinstance(state, _ConnectionState):
            return
        for task in list(state.tasks.values()):
            task.cancel()
        for task in list(state.submits):
            task.cancel()
        for sub in state.subs.values():
            sub.close()


def _reset_frame(sid: str | None, exc: errors.EventIndexTooOld) -> dict[str, Any]:
    frame: dict[str, Any] = {
        "type": "reset",
        "after_index": exc.after_index,
        "oldest_index": exc.oldest_index,
        "message": str(exc),
    }
    if sid is not None:
        frame["subscription"] = sid
    return frame
