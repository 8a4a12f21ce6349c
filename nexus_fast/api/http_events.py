"""The event bus on the HTTP port: server-sent events and a JSON page of recent events.

The dashboard follows the fabric on its own origin (CSP ``connect-src 'self'``), so the
bus is served here too, not only on the WebSocket port:

``GET /api/v1/events/stream?topics=node,command&keys=K&after_index=N``
    A ``text/event-stream``. The first message is ``hello`` (``id`` = the cursor, data
    ``{"after_index", "last_index", "oldest_index"}``); then each ``events`` message
    carries a JSON array of events (the bus's cached JSON, joined: encode once) with
    ``id`` = the last index in it; idle streams get a ``bookmark`` every
    ``events.bookmark_interval`` (its ``id`` moves a filtered client's resume point on).
    Resume: ``Last-Event-ID`` (what ``EventSource`` sends by itself on reconnect) wins
    over ``after_index``; every event after it is delivered, in order, once.
    A stream that cannot start is an HTTP error from the one table (400 bad filter,
    410 ``out_of_range`` when the index is older than retention, 429 too many streams,
    503 stopping). One that must end sends a last message and closes: ``reset`` (the log
    no longer holds what comes next: re-list), or ``error`` with ``code``
    ``resource_exhausted`` and ``resume_after_index`` when the client fell more than
    ``events.subscriber_buffer`` events behind (cut off; the others are not slowed), or
    ``unavailable`` when the server stops.

``GET /api/v1/events?after_index=N&limit=M&topics=...&keys=...``
    One bounded read: up to ``limit`` matching events after ``after_index`` and
    ``next_after_index`` to page on (it also passes events the filter skipped).

Per client the server holds a cursor and what the socket buffers (its high-water mark
plus one message): the events themselves stay in the shared ring.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Final

import orjson
from aiohttp import web
from multidict import MultiMapping

from nexus_fast import errors
from nexus_fast.api.status import error_code
from nexus_fast.core.events import EventBus, Subscription
from nexus_fast.errors import NexusError
from nexus_fast.logs import get_logger
from nexus_fast.telemetry import metrics

__all__ = [
    "DEFAULT_PAGE_EVENTS",
    "MAX_MESSAGE_BYTES",
    "MAX_MESSAGE_EVENTS",
    "MAX_PAGE_EVENTS",
    "MAX_STREAMS",
    "HttpEvents",
]

log = get_logger("http.events")

MAX_STREAMS: Final = 256
"""Event streams open at once on the HTTP port (each is one subscription)."""
MAX_MESSAGE_EVENTS: Final = 500
"""Most events in one ``events`` message."""
MAX_MESSAGE_BYTES: Final = 512 * 1024
"""Soft cap on one ``events`` message (one event larger than that goes alone)."""
DEFAULT_PAGE_EVENTS: Final = 100
MAX_PAGE_EVENTS: Final = 1000
_TRANSPORT: Final = "http"
# Seconds a cut-off client gets to take its last message before the socket is aborted.
_FAREWELL_TIMEOUT: Final = 1.0
_STREAM_PARAMS: Final = frozenset({"topics", "keys", "after_index"})
_PAGE_PARAMS: Final = frozenset({"topics", "keys", "after_index", "limit"})
_EVENTS_HEAD: Final = b"event: events\nid: %d\ndata: ["


def _list_param(query: MultiMapping[str], name: str) -> list[str]:
    """``?name=a,b`` and ``?name=a&name=b`` alike; empty items are refused."""
    out: list[str] = []
    for value in query.getall(name, []):
        for raw in value.split(","):
            item = raw.strip()
            if not item:
                raise errors.InvalidArgument(name, "must not be empty")
            if item not in out:
                out.append(item)
    return out


def _int_param(value: str | None, name: str, lo: int, hi: int | None = None) -> int | None:
    if value is None:
        return None
    try:
        number = int(value.strip())
    except ValueError:
        raise errors.InvalidArgument(name, f"must be an integer, got {value[:40]!r}") from None
    if number < lo or (hi is not None and number > hi):
        bound = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise errors.InvalidArgument(name, f"must be {bound}")
    return number


def _check_params(query: MultiMapping[str], allowed: frozenset[str]) -> None:
    for name in query:
        if name not in allowed:
            raise errors.InvalidArgument(
                name,
                f"unknown query parameter (expected one of: {', '.join(sorted(allowed))})",
            )
    for name in ("after_index", "limit"):
        if len(query.getall(name, [])) > 1:
            raise errors.InvalidArgument(name, "may be given only once")


def _filter_params(
    query: MultiMapping[str], allowed: frozenset[str]
) -> tuple[list[str], list[str], int | None]:
    """The checked ``topics``, ``keys`` and ``after_index`` (None: not given) of a request."""
    _check_params(query, allowed)
    topics = _list_param(query, "topics")
    keys = _list_param(query, "keys")
    return topics, keys, _int_param(query.get("after_index"), "after_index", 0)


def _sse(event: str, index: int | None, data: object) -> bytes:
    """One server-sent event; ``index`` (the resume point) goes in its ``id`` field."""
    head = b"event: %s\n" % event.encode()
    if index is not None:
        head += b"id: %d\n" % index
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


class HttpEvents:
    """The ``/api/v1/events`` routes over one :class:`EventBus`.

    Errors before a stream starts are raised as core errors: the HTTP middleware answers
    them through the one table (``nexus_fast.api.status``).
    """

    def __init__(self, bus: EventBus, *, max_streams: int = MAX_STREAMS) -> None:
        self.bus = bus
        self.max_streams = max_streams
        self._streams: set[asyncio.Task[object]] = set()
        self._delivered = metrics.EVENTS_DELIVERED.labels(transport=_TRANSPORT)

    @property
    def active_streams(self) -> int:
        """Event streams being served right now."""
        return len(self._streams)

    # ------------------------------------------------------------ JSON page

    async def page(self, request: web.Request) -> web.Response:
        """``GET /api/v1/events``: one bounded read of the log after ``after_index``."""
        query = request.query
        topics, keys, after = _filter_params(query, _PAGE_PARAMS)
        limit = _int_param(query.get("limit"), "limit", 1, MAX_PAGE_EVENTS) or DEFAULT_PAGE_EVENTS
        bus = self.bus
        sub = bus.subscribe(topics, keys, 0 if after is None else after, transport=_TRANSPORT)
        try:
            events = sub.read(limit)
            cursor = sub.cursor
        finally:
            sub.close()
        body = b'{"events":[%s],"next_after_index":%d,"last_index":%d,"oldest_index":%d}' % (
            b",".join([e.json for e in events]),
            cursor,
            bus.last_index,
            bus.oldest_index(),
        )
        return web.Response(body=body, content_type="application/json")

    # ------------------------------------------------------------ stream

    async def stream(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/v1/events/stream``: server-sent events until the client leaves."""
        query = request.query
        topics, keys, after = _filter_params(query, _STREAM_PARAMS)
        last_event_id = request.headers.get("Last-Event-ID")
        if last_event_id:  # EventSource's own resume point wins over the URL it was opened with
            after = _int_param(last_event_id, "Last-Event-ID", 0)
        if len(self._streams) >= self.max_streams:
            raise errors.ResourceExhausted(
                f"at most {self.max_streams} event streams on the HTTP port", retry_after=2.0
            )
        bus = self.bus
        sub = bus.subscribe(topics, keys, after, transport=_TRANSPORT)
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-cache",
                # Proxies (nginx) must pass each message on at once.
                "X-Accel-Buffering": "no",
            }
        )
        try:
            await response.prepare(request)
            hello = {
                "after_index": sub.cursor,
                "last_index": bus.last_index,
                "oldest_index": bus.oldest_index(),
            }
            await response.write(b"retry: 1000\n" + _sse("hello", sub.cursor, hello))
            await self._pump(request, sub, response)
        except ConnectionError:
            pass  # the client left: nothing more to say
        finally:
            self._streams.discard(task)
            sub.close()
        return response

    async def _pump(
        self, request: web.Request, sub: Subscription, response: web.StreamResponse
    ) -> None:
        interval = self.bus.config.bookmark_interval
        delivered = self._delivered
        try:
            while True:
                batch = await sub.next_batch(MAX_MESSAGE_EVENTS, interval)
                if isinstance(batch, int):
                    await sub.guarded(
                        response.write(b"event: bookmark\nid: %d\ndata: %d\n\n" % (batch, batch))
                    )
                    continue
                for start, end, body in sub.json_frames(batch, MAX_MESSAGE_BYTES):
                    head = _EVENTS_HEAD % batch[end - 1].index
                    # A write only waits when the socket's buffer is over its high-water
                    # mark; each publish meanwhile checks the lag bound (guarded).
                    await sub.guarded(response.write(b"".join((head, body, b"]\n\n"))))
                    delivered.inc(end - start)
        except errors.SlowConsumer as exc:
            log.info(
                "closing slow http event stream", extra={"lag": exc.lag, "after": exc.last_index}
            )
            farewell = {
                "code": error_code(exc),
                "message": str(exc),
                "resume_after_index": exc.last_index,
            }
            await self._last_word(response, _sse("error", exc.last_index, farewell))
            # The socket is stuck: do not wait for it to drain.
            transport = request.transport
            if transport is not None:
                transport.abort()
        except errors.EventIndexTooOld as exc:
            reset = {
                "after_index": exc.after_index,
                "oldest_index": exc.oldest_index,
                "message": str(exc),
            }
            # No id: the client's resume point stays where it was, so a client that
            # reconnects blindly meets the 410, never a silent gap.
            await self._last_word(response, _sse("reset", None, reset))
        except NexusError as exc:  # Unavailable: the bus closed, the server is stopping
            error = {"code": error_code(exc), "message": str(exc)}
            await self._last_word(response, _sse("error", sub.cursor, error))

    @staticmethod
    async def _last_word(response: web.StreamResponse, data: bytes) -> None:
        with contextlib.suppress(ConnectionError, TimeoutError):
            async with asyncio.timeout(_FAREWELL_TIMEOUT):
                await response.write(data)

    async def close(self, app: web.Application | None = None) -> None:
        """End every stream (``on_shutdown``): aiohttp would wait for them otherwise."""
        for task in list(self._streams):
            task.cancel()
