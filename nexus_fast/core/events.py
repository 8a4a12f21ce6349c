"""The event bus: the durable event log, the in-memory ring and per-subscriber cursors.

Every committed state change carries an event (written by the store in the same txn);
the store hands each committed batch to :meth:`EventBus.publish_committed` on the loop.
Publishing decodes each body ONCE into an immutable
:class:`~nexus_fast.codec.frames.EventEnvelope` (the codec's), appends it
to the :class:`~nexus_fast.ring.EventRing` and wakes waiting subscribers through one
shared future: no per-subscriber copies, no per-subscriber work on the publish path.

Each :class:`Subscription` reads at its own cursor: from the ring while it still holds
the events, from the store's log (bounded chunks, short read txns) when older. Delivery
is every matching event with index > ``after_index``, in order, exactly once, or an
explicit :class:`EventIndexTooOld` when retention already dropped part of the range.

Wire encodings live in :mod:`nexus_fast.codec`: the envelope makes each one lazily, once
per event, and every subscriber shares it.

The core knows nothing of gRPC or WebSocket: adapters turn :class:`SlowConsumer` and
:class:`EventIndexTooOld` into their statuses and close codes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, Final, TypeVar

from nexus_fast.clock import now_ms
from nexus_fast.codec.frames import EventEnvelope, decode_event, json_frames
from nexus_fast.codec.json import system_payload
from nexus_fast.codec.protowire import event
from nexus_fast.config import EventsConfig
from nexus_fast.core.periodic import Periodic
from nexus_fast.errors import EventIndexTooOld, InvalidArgument, SlowConsumer, Unavailable
from nexus_fast.logs import get_logger
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.ring import EventRing, RingIndexTooOld
from nexus_fast.store.base import StateStore
from nexus_fast.telemetry import metrics

__all__ = [
    "MAX_KEYS",
    "STORE_CHUNK",
    "TOPICS",
    "EventBus",
    "EventIndexTooOld",
    "SlowConsumer",
    "Subscription",
]

log = get_logger("events")

T = TypeVar("T")

TOPICS: Final = frozenset({"node", "command", "agent", "system"})
"""Every topic an event may carry; subscribing to anything else is an InvalidArgument."""
MAX_KEYS: Final = 1024
"""Most keys one subscription may filter on (bounded per-subscription memory)."""
MAX_KEY_LEN: Final = 256
STORE_CHUNK: Final = 512
"""Events read from the durable log per read txn: short txns, the loop stays responsive."""
PUSH_CHUNK: Final = 256  # parked subscriptions served per loop callback of a publish
_PRUNE_SCAN_CHUNKS: Final = 64  # age pruning looks at most this many chunks per tick
_LOAD_CHUNK: Final = 4096
SHARED_READS: Final = 64
"""Filtered read results the bus keeps for subscriptions at the same cursor and filter."""
SHARED_FRAMES: Final = 64
SHARED_FRAME_BYTES: Final = 8 * 1024 * 1024
"""Bounds (entries, bytes) on the joined JSON frame bodies shared between subscriptions."""


class _Shared:
    """A small FIFO cache bounded by entries and by bytes (values weigh ``weight``)."""

    __slots__ = ("_data", "_max_bytes", "_max_entries", "_weight", "nbytes")

    def __init__(self, max_entries: int, max_bytes: int, weight: Callable[[Any], int]) -> None:
        self._data: dict[Any, Any] = {}
        self._max_entries = max_entries
        self._max_bytes = max_bytes
        self._weight = weight
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: Any) -> Any:
        return self._data.get(key)

    def put(self, key: Any, value: Any) -> None:
        weight = self._weight(value)
        if weight > self._max_bytes:
            return
        data = self._data
        old = data.pop(key, None)
        if old is not None:
            self.nbytes -= self._weight(old)
        while data and (len(data) >= self._max_entries or self.nbytes + weight > self._max_bytes):
            self.nbytes -= self._weight(data.pop(next(iter(data))))
        data[key] = value
        self.nbytes += weight

    def clear(self) -> None:
        self._data.clear()
        self.nbytes = 0


def _frames_weight(frames: list[tuple[int, int, bytes]]) -> int:
    return sum(len(body) for _, _, body in frames)


def _check_filters(
    topics: Sequence[str], keys: Sequence[str]
) -> tuple[frozenset[str] | None, frozenset[str] | None]:
    for topic in topics:
        if not isinstance(topic, str) or topic not in TOPICS:
            raise InvalidArgument(
                "topics", f"unknown topic {topic!r}; expected some of {', '.join(sorted(TOPICS))}"
            )
    if len(keys) > MAX_KEYS:
        raise InvalidArgument("keys", f"more than {MAX_KEYS} keys")
    for key in keys:
        if not isinstance(key, str) or not key or len(key) > MAX_KEY_LEN:
            raise InvalidArgument(
                "keys", f"each key must be a string of 1..{MAX_KEY_LEN} characters"
            )
    # An empty filter, or one naming every topic, matches everything: skip the test.
    topic_set = frozenset(topics) if topics and frozenset(topics) != TOPICS else None
    return topic_set, (frozenset(keys) if keys else None)


class Subscription:
    """A cursor over the event stream with a topic / key filter.

    ``cursor`` is the index up to which every event was examined (delivered when it
    matched); ``read()`` returns the next matching events and moves it on. Adapters send
    what ``read()`` returns, then call ``wait()`` for more. Runs on the loop only.
    """

    __slots__ = (
        "_bus",
        "_lag_metric",
        "_last_sent",
        "_parked",
        "_push_max",
        "_pusher",
        "closed",
        "cursor",
        "keys",
        "live",
        "topics",
        "transport",
    )

    def __init__(
        self,
        bus: EventBus,
        topics: frozenset[str] | None,
        keys: frozenset[str] | None,
        cursor: int,
        transport: str,
    ) -> None:
        self._bus = bus
        self.topics = topics
        self.keys = keys
        self.cursor = cursor
        self.transport = transport
        self.closed = False
        # Catching up from the log is not being slow; the lag bound applies once live.
        self.live = cursor >= bus.last_index
        self._lag_metric = metrics.EVENT_SUBSCRIBER_LAG.labels(transport=transport)
        self._last_sent = time.monotonic()
        # Set while parked (see park): the bus sends for this subscription in the publish.
        self._pusher: Callable[[list[EventEnvelope]], bool] | None = None
        self._push_max = 0
        self._parked: asyncio.Future[None] | None = None

    @property
    def lag(self) -> int:
        """Events published that this subscription has not examined yet."""
        return self._bus.last_index - self.cursor

    def matches(self, event: EventEnvelope) -> bool:
        """True when the event passes the topic and key filters."""
        topics = self.topics
        if topics is not None and event.topic not in topics:
            return False
        keys = self.keys
        return keys is None or event.key in keys

    def check_lag(self) -> None:
        """Raise :class:`SlowConsumer` when live and more than ``subscriber_buffer`` behind."""
        lag = self._bus.last_index - self.cursor
        if self.live and lag > self._bus.subscriber_buffer:
            metrics.EVENT_SLOW_CONSUMERS.labels(transport=self.transport).inc()
            raise SlowConsumer(self.cursor, lag)

    def read(self, max_events: int) -> list[EventEnvelope]:
        """Up to ``max_events`` matching events after the cursor, without waiting.

        Examines at most ``max(max_events, STORE_CHUNK)`` events; the result may be empty
        while ``lag > 0`` (nothing matched yet), so loop while ``lag``. Raises
        :class:`EventIndexTooOld`, or ``Unavailable`` once closed. The lag bound is not
        checked here: a consumer that is reading is not slow (see :meth:`guarded`).
        """
        bus = self._bus
        lag = bus.last_index - self.cursor
        if self.closed or (bus.closed and lag <= 0):
            # A closing bus lets subscriptions drain what was published, then ends them.
            raise Unavailable("event stream closed: server shutting down")
        if lag <= 0:
            self.live = True
            return []
        self._lag_metric.observe(lag)
        scanned = bus.read_after(self.cursor, max(max_events, STORE_CHUNK))
        if not scanned:
            return []
        if self.topics is None and self.keys is None and len(scanned) <= max_events:
            out = scanned
            self.cursor = scanned[-1].index
        else:
            # Subscriptions with the same filter at the same cursor (the common fan-out
            # case) share one scan: same published range, so the same result.
            key = (self.topics, self.keys, self.cursor, bus.last_index, max_events)
            shared = bus._shared_reads.get(key)
            if shared is None:
                matches = self.matches
                out = []
                cursor = self.cursor
                for event in scanned:
                    if matches(event):
                        if len(out) >= max_events:
                            break
                        out.append(event)
                    cursor = event.index
                bus._shared_reads.put(key, (out, cursor))
            else:
                out, cursor = shared
            self.cursor = cursor
        if self.cursor >= bus.last_index:
            self.live = True
        return out

    def read_stored(self, max_events: int, max_bytes: int) -> tuple[bytes, int] | None:
        """Catch up from the durable log: the next matching events as ONE serialized
        ``EventBatch`` (``(batch, events in it)``), or None when the ring holds what comes
        next (then use :meth:`read`, whose envelopes are shared with the live subscribers).

        The batch is read zero-copy in one short read txn (``StateStore.event_batch``): each
        stored body goes into it as it lies in the map, with no envelope or decode per
        event. At most ``max_events`` events and, past the first, ``max_bytes``; it may be
        empty while ``lag > 0`` (nothing matched in the stretch examined). Raises
        :class:`EventIndexTooOld` when retention dropped the next event, ``Unavailable``
        once closed.
        """
        bus = self._bus
        last = bus.last_index
        lag = last - self.cursor
        if self.closed or (bus.closed and lag <= 0):
            raise Unavailable("event stream closed: server shutting down")
        ring = bus.ring
        if lag <= 0 or (len(ring) and self.cursor >= ring.first_index - 1):
            return None
        self._lag_metric.observe(lag)
        store = bus._store
        batch, count, examined = store.event_batch(
            self.cursor,
            last,
            max_events,
            max_bytes,
            max(max_events, STORE_CHUNK),
            self.topics,
            self.keys,
            decode_event,
        )
        if examined == self.cursor:
            raise EventIndexTooOld(self.cursor, store.first_event_index())
        self.cursor = examined
        if examined >= last:
            self.live = True
        return batch, count

    def json_frames(
        self, events: Sequence[EventEnvelope], max_bytes: int
    ) -> list[tuple[int, int, bytes]]:
        """:func:`json_frames` of a batch :meth:`read` returned, shared through the bus.

        Every matching event between the batch's first and last index is in it, so the
        filter and those indexes identify its bytes: subscriptions reading the same range
        with the same filter join it once. Only for lists :meth:`read` returned, unmodified.
        """
        if not events:
            return []
        key = (self.topics, self.keys, events[0].index, events[-1].index, len(events), max_bytes)
        cache = self._bus._shared_frames
        frames: list[tuple[int, int, bytes]] | None = cache.get(key)
        if frames is None:
            frames = json_frames(events, max_bytes)
            cache.put(key, frames)
        return frames

    def sent_now(self) -> None:
        """Note that the transport just sent something (bookmarks count idle time from it)."""
        self._last_sent = time.monotonic()

    def idle(self) -> float:
        """Seconds since the transport last sent something."""
        return time.monotonic() - self._last_sent

    async def park(
        self, pusher: Callable[[list[EventEnvelope]], bool], max_events: int, timeout: float
    ) -> None:
        """Let the bus deliver while this subscription is caught up; return when it can't.

        The fan-out fast path. While parked, every publish is read for this subscription
        (at most ``max_events``, through the same shared scan and frame caches as
        :meth:`read`) and handed to ``pusher`` inside the publish: no task wakes up per
        subscriber and per publish. ``pusher(events)`` sends what the transport takes and
        returns False if it stopped early, having moved the cursor back to the first
        event it did not send (if it raises, the same; a cursor it left untouched is
        moved back to before the batch).

        Returns (unparked) when a publish leaves something unsent or unread, when
        anything in the push raised (the caller's next ``read`` meets it again and
        handles it), when the subscription or the bus closes, or after ``timeout``
        seconds (the caller's bookmark timer). Call only when ``lag == 0``.
        """
        if self.lag > 0 or self.closed or self._bus.closed:
            return
        loop = asyncio.get_running_loop()
        parked: asyncio.Future[None] = loop.create_future()
        self._pusher, self._push_max, self._parked = pusher, max_events, parked
        bus = self._bus
        bus._pushing[self] = None
        timer = loop.call_later(timeout, _unpark, parked)
        try:
            await parked
        finally:
            timer.cancel()
            bus._pushing.pop(self, None)
            self._pusher = self._parked = None

    def _push(self) -> bool:
        """The bus's side of :meth:`park`: deliver what was just published; False to unpark."""
        pusher = self._pusher
        if pusher is None:
            return False
        before = self.cursor
        events = self.read(self._push_max)
        if events:
            self._last_sent = time.monotonic()
            read_to = self.cursor
            try:
                if not pusher(events):
                    return False
            except BaseException:
                if self.cursor == read_to:  # the pusher sent nothing: nothing may be skipped
                    self.cursor = before
                raise
        return self.lag <= 0

    async def wait(self, timeout: float | None) -> bool:
        """Wait until events after the cursor are published; False on timeout."""
        return await self._bus.wait_after(self.cursor, timeout)

    async def next_batch(
        self, max_events: int, bookmark_interval: float
    ) -> list[EventEnvelope] | int:
        """What a transport sends next: matching events, or, after ``bookmark_interval``
        with nothing to send, the index to bookmark (it also moves a filtered client's
        resume point past the events it does not want)."""
        while True:
            events = self.read(max_events)
            if events:
                self._last_sent = time.monotonic()
                return events
            if self.lag > 0:
                await asyncio.sleep(0)  # nothing matched in this stretch; keep scanning
                continue
            idle = time.monotonic() - self._last_sent
            if idle >= bookmark_interval:
                self._last_sent = time.monotonic()
                return self.cursor
            await self.wait(bookmark_interval - idle)

    async def guarded(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable`` (a send blocked by the consumer), checking the lag bound.

        Each publish while it is pending re-checks the lag; past the bound it is cancelled
        and :class:`SlowConsumer` raised, so a stuck consumer is cut off promptly. Only
        for awaitables that are safe to cancel (e.g. waiting for a socket to drain).
        """
        task = asyncio.ensure_future(awaitable)
        try:
            while True:
                published = self._bus.published_future()
                done, _ = await asyncio.wait((task, published), return_when=asyncio.FIRST_COMPLETED)
                if task in done:
                    return task.result()
                if self.closed:
                    raise Unavailable("event stream closed")
                self.check_lag()
        finally:
            if not task.done():
                task.cancel()

    def close(self) -> None:
        """Detach from the bus (idempotent)."""
        if not self.closed:
            self.closed = True
            self._bus._subscription_closed(self)
            if self._parked is not None:
                _unpark(self._parked)


def _unpark(parked: asyncio.Future[None]) -> None:
    if not parked.done():
        parked.set_result(None)


class EventBus:
    """The event log, the ring of recent events, subscriptions and the retention pruner.

    Wire it up right after ``store.open()`` and before anything commits::

        bus = EventBus(store, config.events, config.performance.event_buffer_size)
        bus.load()
        store.on_commit = bus.publish_committed
        bus.start_pruner(interval)
    """

    def __init__(
        self,
        store: StateStore,
        config: EventsConfig,
        ring_capacity: int,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self.config = config
        self.subscriber_buffer = config.subscriber_buffer
        self._ring: EventRing[EventEnvelope] = EventRing(ring_capacity)
        self._last_index = 0
        self._published: asyncio.Future[None] | None = None
        # Parked subscriptions (Subscription.park), in parking order: delivered in publish,
        # PUSH_CHUNK at a time (see _push).
        self._pushing: dict[Subscription, None] = {}
        self._push_pass: list[Subscription] | None = None
        self._push_at = 0
        self._push_again = False
        self._closed = False
        self._clock = clock
        self._pruner = Periodic("event-pruner", self.prune_once, log)
        self._subscriptions: set[Subscription] = set()
        self._type_counters: dict[str, Any] = {}
        # Work shared by subscriptions reading the same range (see Subscription.read and
        # Subscription.json_frames); bounded, and only ever holding published events.
        self._shared_reads = _Shared(SHARED_READS, 1 << 62, lambda _: 0)
        self._shared_frames = _Shared(SHARED_FRAMES, SHARED_FRAME_BYTES, _frames_weight)

    # ------------------------------------------------------------ lifecycle

    @property
    def last_index(self) -> int:
        """Index of the newest published event (0 before any)."""
        return self._last_index

    @property
    def closed(self) -> bool:
        """True after :meth:`close`: subscriptions end, publishing continues for the log."""
        return self._closed

    @property
    def ring(self) -> EventRing[EventEnvelope]:
        """The ring of recent envelopes (read-only use)."""
        return self._ring

    @property
    def subscription_count(self) -> int:
        """Open subscriptions across every transport."""
        return len(self._subscriptions)

    def load(self) -> int:
        """Fill the ring with the newest events of the log; returns how many were loaded."""
        store = self._store
        last = store.last_event_index
        first = max(store.first_event_index(), last - self._ring.capacity + 1, 1)
        self._last_index = last
        loaded = 0
        after = first - 1
        while after < last:
            pairs = store.events_since(after, min(_LOAD_CHUNK, last - after))
            if not pairs:
                break
            for index, body in pairs:
                self._append(index, body)
                loaded += 1
            after = pairs[-1][0]
        return loaded

    def start_pruner(self, interval: float) -> None:
        """Run retention (count and age) every ``interval`` seconds in the background."""
        self._pruner.start(interval)

    async def close(self, drain_timeout: float = 0.0) -> None:
        """Stop the pruner and end every subscription (they raise ``Unavailable``).

        Subscriptions first get up to ``drain_timeout`` seconds to deliver what was
        published (e.g. ``system.stopping``); the rest are closed at once.
        """
        self._closed = True
        self._wake()
        for sub in list(self._pushing):  # parked ones drain and end through their tasks
            if sub._parked is not None:
                _unpark(sub._parked)
        self._pushing.clear()
        self._push_pass = None
        deadline = time.monotonic() + drain_timeout
        while self._subscriptions and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        for sub in list(self._subscriptions):
            sub.close()
        self._wake()
        await self._pruner.stop()

    # ------------------------------------------------------------ publishing

    def publish_committed(self, pairs: list[tuple[int, bytes]]) -> None:
        """Store commit hook: the (index, body) pairs of one committed batch, in order."""
        if not pairs:
            return
        ring = self._ring
        expected = self._last_index + 1
        if pairs[0][0] > expected and len(ring):
            # Events committed before the hook was attached: fetch them so the ring stays
            # contiguous and no subscriber sees a gap.
            self._backfill(expected - 1, pairs[0][0] - 1)
        if pairs[0][0] <= self._last_index and len(ring):
            pairs = [p for p in pairs if p[0] > self._last_index]  # already backfilled
        counts: dict[str, int] = {}
        for index, body in pairs:
            event_type = self._append(index, body)
            counts[event_type] = counts.get(event_type, 0) + 1
        self._count(counts)
        self._wake()
        if self._pushing:
            self._push()

    def _push(self) -> None:
        """Deliver the publish to every parked subscription; unpark those that need their task.

        One pass over the parked subscriptions, ``PUSH_CHUNK`` of them per loop callback, so
        a publish to thousands of subscribers does not hold the loop in one piece. A publish
        during a pass asks for one more pass after it: the subscriptions already served in
        this one have not seen it yet.
        """
        if self._push_pass is not None:
            self._push_again = True
            return
        self._push_pass, self._push_at, self._push_again = list(self._pushing), 0, False
        self._push_step()

    def _push_step(self) -> None:
        batch = self._push_pass
        if batch is None:  # the bus closed meanwhile
            return
        start = self._push_at
        end = min(start + PUSH_CHUNK, len(batch))
        pushing = self._pushing
        for sub in batch[start:end]:
            if sub not in pushing:  # unparked or closed since the pass began
                continue
            try:
                keep = sub._push()
            except Exception:  # the subscription's task meets it again in read() and handles it
                keep = False
            if not keep:
                pushing.pop(sub, None)
                if sub._parked is not None:
                    _unpark(sub._parked)
        if end < len(batch):
            self._push_at = end
            asyncio.get_running_loop().call_soon(self._push_step)
            return
        self._push_pass = None
        if self._push_again and pushing:
            self._push()

    def _count(self, counts: dict[str, int]) -> None:
        # One increment per type per batch: a labelled counter costs ~1 us per call.
        for event_type, n in counts.items():
            counter = self._type_counters.get(event_type)
            if counter is None:
                counter = self._type_counters[event_type] = metrics.EVENTS_PUBLISHED.labels(
                    type=event_type
                )
            counter.inc(n)

    def _append(self, index: int, body: bytes) -> str:
        envelope = decode_event(index, body)
        ring = self._ring
        if len(ring) and index != ring.last_index + 1:
            # Unexpected hole (e.g. the log was pruned under a stale ring): start over.
            log.warning("event ring reset", extra={"index": index, "ring_last": ring.last_index})
            self._ring = ring = EventRing(ring.capacity)
        ring.append(index, envelope)
        self._last_index = index
        return envelope.type

    def _backfill(self, after: int, up_to: int) -> None:
        gap = up_to - after
        if gap > self._ring.capacity:
            after = up_to - self._ring.capacity
            self._ring = EventRing(self._ring.capacity)
        while after < up_to:
            pairs = self._store.events_since(after, min(_LOAD_CHUNK, up_to - after))
            if not pairs:
                break
            for index, body in pairs:
                if index > up_to:
                    break
                self._append(index, body)
            after = pairs[-1][0]

    def _wake(self) -> None:
        fut = self._published
        if fut is not None:
            self._published = None
            if not fut.done():
                fut.set_result(None)

    def published_future(self) -> asyncio.Future[None]:
        """A future resolved at the next publish (shared by every waiter; do not cancel)."""
        fut = self._published
        if fut is None:
            fut = self._published = asyncio.get_running_loop().create_future()
        return fut

    async def wait_after(self, index: int, timeout: float | None) -> bool:
        """Wait until an event with index > ``index`` is published; False on timeout."""
        if self._last_index > index or self._closed:
            return True
        fut = self.published_future()
        try:
            # shield: a timeout must not cancel the future the other waiters share.
            async with asyncio.timeout(timeout):
                await asyncio.shield(fut)
        except TimeoutError:
            return self._last_index > index
        return True

    def emit(self, topic: str, event_type: str, key: str, payload: bytes) -> asyncio.Future[Any]:
        """Commit an event that carries no state change (system events); resolves once durable."""
        return self._store.commit((), (event(topic, event_type, key, payload, now_ms()),))

    def emit_system(self, event_type: str, data: Mapping[str, object]) -> asyncio.Future[Any]:
        """A ``system`` event whose payload is ``data`` as UTF-8 JSON."""
        return self.emit("system", event_type, "", system_payload(data))

    # ------------------------------------------------------------ reading

    def oldest_index(self) -> int:
        """Oldest index kept in the durable log (``last_index + 1`` when it is empty)."""
        return self._store.first_event_index()

    def read_after(self, after: int, limit: int) -> list[EventEnvelope]:
        """Up to ``limit`` published events with index > ``after``, contiguous, in order.

        From the ring when it holds them, else from the durable log. Raises
        :class:`EventIndexTooOld` when the log no longer holds ``after + 1``.
        """
        last = self._last_index
        if after >= last or limit <= 0:
            return []
        ring = self._ring
        if len(ring) and after >= ring.first_index - 1:
            try:
                return ring.since_limited(after, limit)
            except RingIndexTooOld:
                pass
        # Older than the ring: one short read txn, capped at what was published.
        pairs = self._store.events_since(after, min(limit, STORE_CHUNK, last - after))
        if not pairs or pairs[0][0] != after + 1:
            raise EventIndexTooOld(after, self._store.first_event_index())
        return [EventEnvelope(index, body) for index, body in pairs]

    def subscribe(
        self,
        topics: Sequence[str] = (),
        keys: Sequence[str] = (),
        after_index: int | None = None,
        *,
        transport: str = "internal",
    ) -> Subscription:
        """Open a subscription; events with index > ``after_index`` will be delivered.

        ``after_index=None``: only events published from now; ``0``: from the oldest kept.
        Raises ``InvalidArgument`` (unknown topic, bad key, index ahead of the log),
        :class:`EventIndexTooOld`, or ``Unavailable`` once the bus is closed.
        """
        if self._closed:
            raise Unavailable("event stream closed: server shutting down")
        topic_set, key_set = _check_filters(topics, keys)
        if after_index is None:
            cursor = self._last_index
        else:
            if isinstance(after_index, bool) or not isinstance(after_index, int) or after_index < 0:
                raise InvalidArgument("after_index", "must be an integer >= 0")
            if after_index > self._last_index:
                raise InvalidArgument(
                    "after_index",
                    f"{after_index} is ahead of the newest event {self._last_index} "
                    "(a different or restored database?)",
                )
            oldest = self._store.first_event_index()
            if after_index == 0:
                cursor = oldest - 1
            elif after_index < oldest - 1:
                raise EventIndexTooOld(after_index, oldest)
            else:
                cursor = after_index
        sub = Subscription(self, topic_set, key_set, cursor, transport)
        self._subscriptions.add(sub)
        metrics.EVENT_SUBSCRIPTIONS_ACTIVE.labels(transport=transport).inc()
        return sub

    def _subscription_closed(self, sub: Subscription) -> None:
        self._pushing.pop(sub, None)
        if sub in self._subscriptions:
            self._subscriptions.discard(sub)
            metrics.EVENT_SUBSCRIPTIONS_ACTIVE.labels(transport=sub.transport).dec()

    # ------------------------------------------------------------ retention

    async def prune_once(self) -> int:
        """Apply retention by count and by age once; returns how many events were deleted."""
        store = self._store
        last = self._last_index
        keep_after = last - self.config.retention_count  # count bound
        cutoff_ms = int((self._clock() - self.config.retention_age) * 1000)
        first = store.first_event_index()
        # Age bound: walk from the oldest while events are older than the cutoff.
        after = max(first - 1, keep_after)
        for _ in range(_PRUNE_SCAN_CHUNKS):
            if after >= last:
                break
            pairs = store.events_since(after, STORE_CHUNK)
            if not pairs:
                break
            young = False
            for index, body in pairs:
                if pb.Event.FromString(body).time_ms >= cutoff_ms:
                    young = True
                    break
                after = index
            if young:
                break
            await asyncio.sleep(0)  # bounded chunks; let the loop breathe between them
        keep_after = max(keep_after, after)
        if keep_after < first:
            return 0
        deleted = await store.prune_events(keep_after)
        self._shared_reads.clear()  # a read now older than the log raises EventIndexTooOld
        if deleted:
            metrics.EVENTS_PRUNED.inc(deleted)
            log.debug("events pruned", extra={"deleted": deleted, "keep_after": keep_after})
        return deleted

    def stat(self) -> dict[str, object]:
        """Figures for ``/health/detailed``."""
        return {
            "last_index": self._last_index,
            "ring_first_index": self._ring.first_index,
            "ring_size": len(self._ring),
            "ring_capacity": self._ring.capacity,
            "subscriptions": len(self._subscriptions),
        }
