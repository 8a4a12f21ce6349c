"""EventBus, Subscription and the WebSocket / gRPC event adapters, without sockets.

The bus runs over both EventRing twins (``ring_impl``), over a real LmdbStore where
durability matters and over a small in-memory log for the property test.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import orjson
import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from nexus_fast.api import grpc_events, ws_events
from nexus_fast.api.ws_server import CLOSE_SLOW_CONSUMER, FRAME_HEADROOM
from nexus_fast.codec import frames as codec_frames
from nexus_fast.codec import protowire as wire
from nexus_fast.codec.frames import EventEnvelope, batch_bytes, bookmark_bytes
from nexus_fast.config import EventsConfig
from nexus_fast.core import events as events_mod
from nexus_fast.core.events import (
    EventBus,
    EventIndexTooOld,
    SlowConsumer,
)
from nexus_fast.errors import InvalidArgument, ResourceExhausted, Unavailable
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store import LmdbStore
from nexus_fast.store.base import CommitResult

T = TypeVar("T")
TOPIC_LIST = ("node", "command", "agent", "system")


def run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(coro, 60))


@pytest.fixture(autouse=True)
def _ring_twin(ring_impl: ModuleType, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test here runs over both EventRing twins."""
    monkeypatch.setattr(events_mod, "EventRing", ring_impl.EventRing)
    monkeypatch.setattr(events_mod, "RingIndexTooOld", ring_impl.RingIndexTooOld)


def body(
    topic: str = "system", key: str = "", etype: str = "", payload: bytes = b"{}", t: int = 1
) -> bytes:
    return pb.Event(
        time_ms=t, topic=topic, type=etype or f"{topic}.test", key=key, payload=payload
    ).SerializeToString()


class MemoryLog:
    """The part of StateStore the bus reads, over a dict (for fast property tests)."""

    def __init__(self) -> None:
        self.events: dict[int, bytes] = {}
        self.last_event_index = 0
        self.on_commit: Callable[[list[tuple[int, bytes]]], None] | None = None

    def append(self, bodies: Sequence[bytes]) -> list[tuple[int, bytes]]:
        pairs = []
        for b in bodies:
            self.last_event_index += 1
            self.events[self.last_event_index] = b
            pairs.append((self.last_event_index, b))
        if self.on_commit is not None:
            self.on_commit(pairs)
        return pairs

    def events_since(self, after_index: int, limit: int) -> list[tuple[int, bytes]]:
        out = []
        i = after_index + 1
        first = self.first_event_index()
        i = max(i, first)
        while i <= self.last_event_index and len(out) < limit:
            out.append((i, self.events[i]))
            i += 1
        return out

    def first_event_index(self) -> int:
        return min(self.events, default=self.last_event_index + 1)

    def prune(self, keep_after: int) -> None:
        for i in [i for i in self.events if i <= keep_after]:
            del self.events[i]

    async def prune_events(self, keep_after_index: int) -> int:
        before = len(self.events)
        self.prune(keep_after_index)
        return before - len(self.events)

    def commit(
        self, ops: Sequence[Any], events: Sequence[bytes] = ()
    ) -> asyncio.Future[CommitResult]:
        fut: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        pairs = self.append(events)
        fut.set_result(CommitResult(pairs[0][0], pairs[-1][0]) if pairs else CommitResult(0, 0))
        return fut


def make_bus(log: Any, capacity: int = 8, **cfg: Any) -> EventBus:
    bus = EventBus(log, EventsConfig(**cfg), capacity)
    bus.load()
    log.on_commit = bus.publish_committed
    return bus


def drain(sub: events_mod.Subscription, chunk: int = 7) -> list[EventEnvelope]:
    out: list[EventEnvelope] = []
    while sub.lag > 0:
        out.extend(sub.read(chunk))
    return out


# ------------------------------------------------------------------ envelopes and encodings


def test_envelope_sets_index_and_encodes_once() -> None:
    node = pb.Node(id="n1", address="a:1", status=pb.NODE_STATUS_READY, eligible=True)
    env = EventEnvelope(42, body("node", "n1", "node.registered", node.SerializeToString(), t=5))
    ev = pb.Event.FromString(env.body)
    assert (ev.index, ev.topic, ev.type, ev.key, ev.time_ms) == (
        42,
        "node",
        "node.registered",
        "n1",
        5,
    )
    assert env.json is env.json  # cached: one encode per event
    assert env.pb_field is env.pb_field
    data = orjson.loads(env.json)
    assert data["index"] == 42 and data["topic"] == "node" and data["key"] == "n1"
    assert data["payload"]["id"] == "n1" and data["payload"]["status"] == "ready"


@pytest.mark.parametrize(
    ("topic", "payload", "check"),
    [
        ("system", b'{"pid": 7}', lambda p: p == {"pid": 7}),
        (
            "command",
            pb.CommandRecord(id="c1", state=pb.COMMAND_STATE_PLACED).SerializeToString(),
            lambda p: p["id"] == "c1" and p["state"] == "placed",
        ),
        ("agent", pb.Agent(id="a-0", name="a").SerializeToString(), lambda p: p["id"] == "a-0"),
        ("node", b"\xff\xff\xff", lambda p: p == base64.b64encode(b"\xff\xff\xff").decode()),
        ("system", b"not json", lambda p: p == base64.b64encode(b"not json").decode()),
    ],
)
def test_payload_json_by_topic(topic: str, payload: bytes, check: Callable[[Any], bool]) -> None:
    env = EventEnvelope(1, body(topic, "k", payload=payload))
    assert check(orjson.loads(env.json)["payload"])


def test_stored_index_is_overridden() -> None:
    raw = pb.Event(index=999, topic="system", type="x").SerializeToString()
    assert pb.Event.FromString(EventEnvelope(3, raw).body).index == 3


def test_batch_and_bookmark_bytes_are_valid_event_batches() -> None:
    envs = [EventEnvelope(i, body("node", f"n{i}", payload=b"")) for i in range(1, 300)]
    batch = pb.EventBatch.FromString(batch_bytes(envs))
    assert [e.index for e in batch.events] == list(range(1, 300))
    assert batch.bookmark_index == 0
    assert pb.EventBatch.FromString(bookmark_bytes(12345)).bookmark_index == 12345
    assert grpc_events.serialize_event_batch(b"abc") == b"abc"
    assert grpc_events.serialize_event_batch(pb.EventBatch(bookmark_index=3)) == bookmark_bytes(3)


# ------------------------------------------------------------------ subscriptions


def test_subscribe_validation() -> None:
    async def body_() -> None:
        log = MemoryLog()
        bus = make_bus(log)
        log.append([body() for _ in range(3)])
        with pytest.raises(InvalidArgument, match="unknown topic 'nodes'"):
            bus.subscribe(["nodes"])
        with pytest.raises(InvalidArgument, match="ahead of the newest event 3"):
            bus.subscribe(after_index=4)
        with pytest.raises(InvalidArgument):
            bus.subscribe(keys=[""])
        with pytest.raises(InvalidArgument):
            bus.subscribe(after_index=-1)
        assert bus.subscribe().cursor == 3  # live only
        assert bus.subscribe(after_index=0).cursor == 0
        log.prune(2)
        assert bus.subscribe(after_index=0).cursor == 2  # from the oldest kept
        assert bus.subscribe(after_index=2).cursor == 2
        with pytest.raises(EventIndexTooOld) as info:
            bus.subscribe(after_index=1)
        assert info.value.oldest_index == 3 and "oldest event kept is 3" in str(info.value)

    run(body_())


@given(
    capacity=st.sampled_from([1, 2, 8, 64]),
    batches=st.lists(
        st.lists(st.tuples(st.sampled_from(TOPIC_LIST), st.sampled_from("abc")), max_size=20),
        max_size=12,
    ),
    topics=st.lists(st.sampled_from(TOPIC_LIST), max_size=2, unique=True),
    keys=st.lists(st.sampled_from("abc"), max_size=2, unique=True),
    after=st.integers(0, 60),
    chunk=st.integers(1, 9),
)
def test_exactly_once_in_order_against_a_list_model(
    capacity: int,
    batches: list[list[tuple[str, str]]],
    topics: list[str],
    keys: list[str],
    after: int,
    chunk: int,
) -> None:
    """Interleave publishes and reads; what a subscriber gets equals a filtered list."""

    async def body_() -> None:
        log = MemoryLog()
        bus = make_bus(log, capacity=capacity)
        log.append([body(t, k) for t, k in batches[0]] if batches else [])
        start = min(after, bus.last_index)
        sub = bus.subscribe(topics, keys, start)
        got: list[EventEnvelope] = []
        for batch in batches[1:]:
            got.extend(sub.read(chunk))
            log.append([body(t, k) for t, k in batch])
        got.extend(drain(sub, chunk))
        model = [
            i
            for i, b in log.events.items()
            if i > start
            and (not topics or pb.Event.FromString(b).topic in topics)
            and (not keys or pb.Event.FromString(b).key in keys)
        ]
        assert [e.index for e in got] == model
        assert sub.cursor == bus.last_index

    run(body_())


def test_shared_reads_and_frames_match_the_uncached_path_and_are_bounded() -> None:
    """Subscriptions at one cursor with one filter share a scan and the joined frame
    bodies; the bytes equal the uncached join, other filters never share, and both
    caches stay within their bounds."""

    async def body_() -> None:
        log = MemoryLog()
        bus = make_bus(log, capacity=4096)
        subs = {
            name: [bus.subscribe(topics, keys, 0) for _ in range(3)]
            for name, topics, keys in (
                ("system", ["system"], []),
                ("node", ["node"], []),
                ("node-a", ["node"], ["a"]),
                ("all", [], []),
            )
        }
        got: dict[int, list[int]] = {id(s): [] for group in subs.values() for s in group}
        for round_ in range(3 * events_mod.SHARED_FRAMES):
            log.append(
                [
                    body("system" if i % 3 else "node", "ab"[i % 2], payload=b"%d" % round_)
                    for i in range(7)
                ]
            )
            frames_by_filter: dict[str, list[tuple[int, int, bytes]]] = {}
            for name, group in subs.items():
                for sub in group:
                    batch = sub.read(5)
                    frames = sub.json_frames(batch, 64)
                    # identical bytes to the uncached split and join
                    assert frames == codec_frames.json_frames(batch, 64)
                    assert b",".join(f[2] for f in frames) == b",".join(e.json for e in batch)
                    got[id(sub)].extend(e.index for e in batch)
                    if name in frames_by_filter:
                        assert frames is frames_by_filter[name]  # shared, not rebuilt
                    frames_by_filter[name] = frames
            # the node filters see different events: never the same cached frames
            assert frames_by_filter["node"] is not frames_by_filter["node-a"]
            assert len(bus._shared_reads) <= events_mod.SHARED_READS
            assert len(bus._shared_frames) <= events_mod.SHARED_FRAMES
            assert bus._shared_frames.nbytes <= events_mod.SHARED_FRAME_BYTES
        # every subscriber got exactly its filtered stream, in order
        for name, group in subs.items():
            sub = group[0]
            model = [i for i, b in log.events.items() if sub.matches(EventEnvelope(i, b))][
                : len(got[id(sub)])
            ]
            assert model and all(got[id(s)] == model for s in group), name

    run(body_())


def test_json_frames_split_like_the_frame_byte_cap() -> None:
    envs = [EventEnvelope(i, body(payload=b'{"p":"%s"}' % (b"x" * i))) for i in range(1, 40)]
    for cap in (1, 50, 200, 10**6):
        frames = codec_frames.json_frames(envs, cap)
        assert frames[0][0] == 0 and frames[-1][1] == len(envs)
        for (_, end, _), (start, _, _) in itertools.pairwise(frames):
            assert end == start
        for start, end, data in frames:
            assert data == b",".join(e.json for e in envs[start:end])
            assert end - start == 1 or len(data) + 1 <= cap
    assert codec_frames.json_frames([], 10) == []


def test_shared_cache_bounds() -> None:
    cache = events_mod._Shared(3, 10, len)
    for i in range(10):
        cache.put(i, b"x" * 4)
        assert len(cache) <= 3 and cache.nbytes <= 10
    assert cache.get(9) == b"xxxx" and cache.get(0) is None
    cache.put("big", b"x" * 11)  # larger than the byte bound: not kept
    assert cache.get("big") is None
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_reads_fall_back_to_the_log_and_detect_pruning_mid_stream() -> None:
    async def body_() -> None:
        log = MemoryLog()
        bus = make_bus(log, capacity=4)
        log.append([body() for _ in range(20)])
        sub = bus.subscribe(after_index=0)
        first = sub.read(5)  # from the log: the ring holds 17..20 only
        assert [e.index for e in first] == [1, 2, 3, 4, 5]
        log.prune(10)  # retention runs while the subscriber is behind
        with pytest.raises(EventIndexTooOld) as info:
            sub.read(5)
        assert info.value.oldest_index == 11 and info.value.after_index == 5

    run(body_())


def test_slow_consumer_is_cut_off_only_when_blocked_and_live() -> None:
    async def body_() -> None:
        log = MemoryLog()
        bus = make_bus(log, capacity=64, subscriber_buffer=5)
        log.append([body() for _ in range(10)])
        catching_up = bus.subscribe(after_index=0)
        live = bus.subscribe()
        assert live.live and not catching_up.live
        never: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        async def publisher() -> None:
            for _ in range(10):
                await asyncio.sleep(0.001)
                log.append([body()])

        task = asyncio.ensure_future(publisher())
        with pytest.raises(SlowConsumer) as info:
            await live.guarded(never)
        assert info.value.last_index == 10 and info.value.lag == 6
        assert "resume after index 10" in str(info.value)
        await task
        # Reading is never "slow", however far behind; a caught-up subscriber becomes live.
        drain(catching_up)
        assert catching_up.live
        # A send that completes is returned as is.
        assert await live.guarded(asyncio.sleep(0, result=7)) == 7

    run(body_())


def test_wait_times_out_for_bookmarks_and_wakes_on_publish() -> None:
    async def body_() -> None:
        log = MemoryLog()
        bus = make_bus(log)
        sub = bus.subscribe()
        assert await sub.wait(0.01) is False
        loop = asyncio.get_running_loop()
        loop.call_later(0.01, log.append, [body()])
        assert await sub.wait(5) is True
        assert [e.index for e in sub.read(10)] == [1]

    run(body_())


def recorder(sink: list[int]) -> Callable[[list[EventEnvelope]], bool]:
    """A pusher for Subscription.park that takes every event, noting its index in ``sink``."""

    def push(events: list[EventEnvelope]) -> bool:
        sink.extend(e.index for e in events)
        return True

    return push


def test_parked_subscription_gets_each_publish_inside_the_publish() -> None:
    """The fan-out fast path: no task runs between the publish and the send."""

    async def body_() -> None:
        log = MemoryLog()
        bus = make_bus(log, capacity=64)
        everything = bus.subscribe()
        commands_only = bus.subscribe(topics=["command"])
        sent: dict[str, list[int]] = {"all": [], "cmd": []}
        parks = [
            asyncio.ensure_future(everything.park(recorder(sent["all"]), 10, 5.0)),
            asyncio.ensure_future(commands_only.park(recorder(sent["cmd"]), 10, 5.0)),
        ]
        await asyncio.sleep(0)  # both parked
        log.append([body("system"), body("command", key="c1")])  # no await: all in publish
        assert sent == {"all": [1, 2], "cmd": [2]}
        log.append([body("system")])  # no match for the filtered one: it stays parked
        assert sent == {"all": [1, 2, 3], "cmd": [2]} and commands_only.cursor == 3
        # More than one read takes (max_events=10): the subscription's task must go on.
        log.append([body("system") for _ in range(12)])
        assert sent["all"] == list(range(1, 14)) and everything.lag == 2
        await asyncio.wait_for(parks[0], 1)
        assert not parks[1].done()
        assert everything.idle() < 1  # the pushes count as sends for the bookmark timer
        commands_only.close()  # closing unparks
        await asyncio.wait_for(parks[1], 1)

    run(body_())


def test_push_to_many_parked_subscriptions_yields_between_chunks() -> None:
    """A publish to thousands of parked subscribers does not hold the loop in one piece."""

    async def body_() -> None:
        log = MemoryLog()
        bus = make_bus(log, capacity=64)
        n = 2 * events_mod.PUSH_CHUNK + 88
        got: list[list[int]] = [[] for _ in range(n)]
        subs = [bus.subscribe() for _ in range(n)]
        parks = [
            asyncio.ensure_future(s.park(recorder(got[i]), 10, 5.0)) for i, s in enumerate(subs)
        ]
        await asyncio.sleep(0)
        log.append([body()])
        served = sum(1 for g in got if g)
        assert served == events_mod.PUSH_CHUNK  # the rest after the loop's next turns
        log.append([body()])  # published during the pass: everyone gets it, in order
        for _ in range(10):
            await asyncio.sleep(0)
        assert all(g == [1, 2] for g in got)
        assert not any(p.done() for p in parks)
        await bus.close()
        await asyncio.wait_for(asyncio.gather(*parks), 1)

    run(body_())


def test_parked_push_that_stops_early_unparks_with_the_cursor_it_set() -> None:
    async def body_() -> None:
        log = MemoryLog()
        bus = make_bus(log, capacity=64)
        sub = bus.subscribe()

        def push(events: list[EventEnvelope]) -> bool:
            sub.cursor = events[0].index  # took one event, then the socket paused
            return False

        parked = asyncio.ensure_future(sub.park(push, 10, 5.0))
        await asyncio.sleep(0)
        log.append([body(), body(), body()])
        await asyncio.wait_for(parked, 1)
        assert sub.cursor == 1 and [e.index for e in sub.read(10)] == [2, 3]
        # Parking with something to read returns at once; a timeout returns too.
        log.append([body()])
        await asyncio.wait_for(sub.park(push, 10, 5.0), 1)
        sub.read(10)
        await asyncio.wait_for(sub.park(push, 10, 0.01), 1)
        # A pusher that raises unparks; the error is the subscription task's to meet, and
        # the batch it did not send is read again, not skipped.
        raising = asyncio.ensure_future(sub.park(lambda events: 1 / 0 > 0, 10, 5.0))
        await asyncio.sleep(0)
        log.append([body()])
        await asyncio.wait_for(raising, 1)
        assert [e.index for e in sub.read(10)] == [5]
        # The bus closing unparks every parked subscription.
        again = asyncio.ensure_future(sub.park(push, 10, 5.0))
        sub.read(10)
        await asyncio.sleep(0)
        await bus.close()
        await asyncio.wait_for(again, 1)

    run(body_())


def test_close_drains_then_ends_subscriptions() -> None:
    async def body_() -> None:
        log = MemoryLog()
        bus = make_bus(log)
        sub = bus.subscribe()
        log.append([body("system", etype="system.stopping")])
        got: list[str] = []

        async def reader() -> None:
            while True:
                got.extend(e.type for e in sub.read(10))
                await sub.wait(1)

        task = asyncio.ensure_future(reader())
        await bus.close(drain_timeout=0.5)
        with pytest.raises(Unavailable):
            await task
        assert got == ["system.stopping"]
        with pytest.raises(Unavailable):
            bus.subscribe()

    run(body_())


# ------------------------------------------------------------------ durability (real LMDB)


def test_restart_reloads_the_ring_and_resumes_without_gap(tmp_path: Path) -> None:
    async def first_run() -> int:
        store = LmdbStore(tmp_path / "db", map_size=16 << 20)
        await store.open()
        bus = EventBus(store, EventsConfig(), 8)
        bus.load()
        store.on_commit = bus.publish_committed
        for i in range(30):
            await store.commit([], [body("node", f"n{i % 3}")])
        await bus.emit_system("system.stopping", {"pid": 1})
        last = bus.last_index
        await store.close()
        return last

    async def second_run(last: int) -> None:
        store = LmdbStore(tmp_path / "db", map_size=16 << 20)
        await store.open()
        try:
            bus = EventBus(store, EventsConfig(), 8)
            assert bus.load() == 8
            store.on_commit = bus.publish_committed
            assert bus.last_index == last == 31
            sub = bus.subscribe(["node"], ["n1"], after_index=10)
            await store.commit([], [body("node", "n1")])
            got = [e.index for e in drain(sub)]
            assert got == [i for i in range(11, 31) if (i - 1) % 3 == 1] + [32]
            sys_sub = bus.subscribe(["system"], after_index=0)
            (stopping,) = drain(sys_sub)
            assert orjson.loads(stopping.json)["payload"] == {"pid": 1}
        finally:
            await store.close()

    run(second_run(run(first_run())))


def test_late_hook_is_backfilled(tmp_path: Path) -> None:
    async def body_() -> None:
        store = LmdbStore(tmp_path / "db", map_size=16 << 20)
        await store.open()
        try:
            bus = EventBus(store, EventsConfig(), 16)
            bus.load()
            store.on_commit = bus.publish_committed
            await store.commit([], [body()])
            store.on_commit = None  # events committed while detached ...
            await store.commit([], [body(), body()])
            store.on_commit = bus.publish_committed
            await store.commit([], [body()])
            assert [e.index for e in bus.ring.since(0)] == [1, 2, 3, 4]  # ... are not lost
        finally:
            await store.close()

    run(body_())


def test_retention_by_count_and_by_age(tmp_path: Path) -> None:
    async def body_() -> None:
        store = LmdbStore(tmp_path / "db", map_size=16 << 20)
        await store.open()
        now = [1000.0]
        try:
            bus = EventBus(
                store, EventsConfig(retention_count=50, retention_age=200), 16, clock=lambda: now[0]
            )
            bus.load()
            store.on_commit = bus.publish_committed
            for i in range(80):
                await store.commit([], [body(t=(850 + i) * 1000)])  # times 850s .. 929s
            assert await bus.prune_once() == 30  # count: keep the newest 50
            assert store.first_event_index() == 31
            now[0] = 1160  # cutoff 960s: every event (times < 930s) is now too old
            assert await bus.prune_once() == 50
            assert store.first_event_index() == 81
            with pytest.raises(EventIndexTooOld) as info:
                bus.subscribe(after_index=5)
            assert info.value.oldest_index == 81
            assert bus.subscribe(after_index=0).cursor == 80
            assert await bus.prune_once() == 0
        finally:
            await store.close()

    run(body_())


# ------------------------------------------------------------------ WebSocket protocol layer


class FakeConnection:
    """What EventStreamProtocol uses of ws_server.Connection, recording frames."""

    _ids = 0

    def __init__(self) -> None:
        FakeConnection._ids += 1
        self.id = FakeConnection._ids
        self.state: dict[str, object] = {}
        self.frames: list[dict[str, Any]] = []
        self.writable = True
        self.is_open = True
        self.closed: tuple[int, str] | None = None
        self.resume_hint: Callable[[], int | None] | None = None
        self.headers: dict[str, str] = {}  # the upgrade request's (traceparent, if any)
        self._callbacks: list[Callable[[Any], None]] = []
        self._resume: asyncio.Future[None] | None = None

    def send_bytes_text(self, data: bytes) -> bool:
        self.frames.append(orjson.loads(data))
        return True

    def send_text_frame(self, frame: bytearray) -> bool:
        assert frame[:FRAME_HEADROOM] == bytes(FRAME_HEADROOM)  # room for picows' header
        return self.send_bytes_text(bytes(frame[FRAME_HEADROOM:]))

    def add_close_callback(self, cb: Callable[[Any], None]) -> None:
        self._callbacks.append(cb)

    async def wait_writable(self) -> None:
        if not self.writable:
            self._resume = asyncio.get_running_loop().create_future()
            await self._resume

    def slow_consumer_reason(self) -> str:
        hint = self.resume_hint() if self.resume_hint else None
        return f"slow consumer; resume after index {hint}"

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)
        self.is_open = self.writable = False
        for cb in self._callbacks:
            cb(self)

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        return [f for f in self.frames if f["type"] == kind]


async def settle(n: int = 20) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def protocol(
    bus: EventBus,
    submit: Callable[[list[pb.CommandSpec], str], Awaitable[pb.SubmitCommandsResponse]]
    | None = None,
) -> ws_events.EventStreamProtocol:
    return ws_events.EventStreamProtocol(bus, max_subscriptions=2, submit_commands=submit)


def test_ws_subscribe_delivers_batches_and_unsubscribe() -> None:
    async def body_() -> None:
        log = MemoryLog()
        bus = make_bus(log, capacity=1024)
        proto = protocol(bus)
        conn = FakeConnection()
        log.append([body("node", "n1"), body("system")])
        proto(conn, {"op": "subscribe", "topics": ["node"], "after_index": 0, "id": 9})  # type: ignore[arg-type]
        (sub,) = conn.of_type("subscribed")
        assert sub == {
            "type": "subscribed",
            "subscription": "s1",
            "after_index": 0,
            "last_index": 2,
            "id": 9,
        }
        log.append([body("node", "n2") for _ in range(700)])
        await settle()
        frames = conn.of_type("events")
        indices = [e["index"] for f in frames for e in f["events"]]
        assert indices == [1, *range(3, 703)]
        assert all(f["subscription"] == "s1" and len(f["events"]) <= 500 for f in frames)
        proto(conn, {"op": "unsubscribe", "subscription": "s1", "id": 10})  # type: ignore[arg-type]
        assert conn.frames[-1] == {
            "type": "unsubscribed",
            "subscription": "s1",
            "index": 702,
            "id": 10,
        }
        log.append([body("node", "n3")])
        await settle()
        assert [e["index"] for f in conn.of_type("events") for e in f["events"]][-1] == 702

    run(body_())


def test_ws_bad_requests_get_error_frames() -> None:
    async def body_() -> None:
        log = MemoryLog()
        bus = make_bus(log)
        proto = protocol(bus)
        conn = FakeConnection()
        cases: list[tuple[dict[str, Any], str]] = [
            ({"op": "subscribe", "topics": "node"}, "bad_request"),
            ({"op": "subscribe", "topics": ["nodes"]}, "invalid_argument"),
            ({"op": "subscribe", "after_index": "1.5"}, "bad_request"),
            ({"op": "subscribe", "after_index": -1}, "bad_request"),
            ({"op": "subscribe", "after_index": "99"}, "invalid_argument"),  # a uint64 string
            ({"op": "subscribe", "after_index": True}, "bad_request"),
            ({"op": "subscribe", "after_index": 99}, "invalid_argument"),
            ({"op": "unsubscribe", "subscription": 1}, "bad_request"),
            ({"op": "unsubscribe", "subscription": "s99"}, "not_found"),
            ({"op": "submit", "commands": []}, "bad_request"),
            ({"op": "submit", "commands": [{"kind": "x"}]}, "unavailable"),
            ({"op": "frobnicate"}, "unknown_op"),
        ]
        for request, code in cases:
            proto(conn, {**request, "id": code})  # type: ignore[arg-type]
            assert conn.frames[-1]["type"] == "error", request
            assert conn.frames[-1]["code"] == code and conn.frames[-1]["id"] == code, request
        proto(conn, {"op": "subscribe"})  # type: ignore[arg-type]
        proto(conn, {"op": "subscribe"})  # type: ignore[arg-type]
        proto(conn, {"op": "subscribe", "id": "third"})  # type: ignore[arg-type]
        assert conn.frames[-1]["code"] == "resource_exhausted"
        conn.close(1000, "")
        await settle()
        assert bus.subscription_count == 0

    run(body_())


def test_ws_reset_frame_for_a_too_old_index() -> None:
    async def body_() -> None:
        log = MemoryLog()
        bus = make_bus(log)
        log.append([body() for _ in range(10)])
        log.prune(6)
        conn = FakeConnection()
        protocol(bus)(conn, {"op": "subscribe", "after_index": 3, "id": "r"})  # type: ignore[arg-type]
        (reset,) = conn.frames
        assert reset["type"] == "reset" and reset["oldest_index"] == 7 and reset["after_index"] == 3
        assert reset["id"] == "r"

    run(body_())


def test_ws_submit_calls_the_hook_and_maps_errors() -> None:
    async def body_() -> None:
        log = MemoryLog()
        bus = make_bus(log)
        seen: list[list[pb.CommandSpec]] = []

        async def submit(
            specs: list[pb.CommandSpec], actor: str, trace: object = None
        ) -> pb.SubmitCommandsResponse:
            seen.append(specs)
            if specs[0].kind == "full":
                raise ResourceExhausted("queue full")
            return pb.SubmitCommandsResponse(
                results=[
                    pb.SubmitResult(id=s.idempotency_key, state=pb.COMMAND_STATE_PLACED)
                    for s in specs
                ],
                index=77,
            )

        proto = protocol(bus, submit)
        conn = FakeConnection()
        payload = base64.b64encode(b"hi").decode()
        proto(
            conn,
            {
                "op": "submit",
                "id": 1,
                "commands": [
                    {"idempotency_key": "k1", "kind": "echo", "payload": payload, "priority": 2}
                ],
            },
        )  # type: ignore[arg-type]
        await settle()
        assert seen[0][0].payload == b"hi" and seen[0][0].priority == 2
        assert conn.frames[-1] == {
            "type": "submitted",
            "results": [
                {"id": "k1", "state": "placed", "node_id": "", "reason": "", "duplicate": False}
            ],
            "index": 77,
            "id": 1,
        }
        proto(conn, {"op": "submit", "id": 2, "commands": [{"kind": "full"}]})  # type: ignore[arg-type]
        await settle()
        assert conn.frames[-1]["code"] == "resource_exhausted" and conn.frames[-1]["id"] == 2
        proto(conn, {"op": "submit", "id": 3, "commands": [{"kind": 5, "nope": 1}]})  # type: ignore[arg-type]
        assert conn.frames[-1]["code"] == "invalid_argument" and conn.frames[-1]["id"] == 3

    run(body_())


def test_ws_paused_subscriber_is_cut_off_with_its_index() -> None:
    async def body_() -> None:
        log = MemoryLog()
        bus = make_bus(log, capacity=256, subscriber_buffer=20)
        proto = protocol(bus)
        slow, fast = FakeConnection(), FakeConnection()
        proto(slow, {"op": "subscribe"})  # type: ignore[arg-type]
        proto(fast, {"op": "subscribe"})  # type: ignore[arg-type]
        log.append([body() for _ in range(5)])
        await settle()
        slow.writable = False  # picows paused writing: the client stopped reading
        for _ in range(30):
            log.append([body()])
            await settle(3)
        assert slow.closed == (CLOSE_SLOW_CONSUMER, "slow consumer; resume after index 5")
        assert [e["index"] for f in fast.of_type("events") for e in f["events"]] == list(
            range(1, 36)
        )
        assert bus.subscription_count == 1

    run(body_())


# ------------------------------------------------------------------ gRPC registration


def test_add_control_service_swaps_only_the_watch_serializer() -> None:
    calls: dict[str, Any] = {}

    class Recorder:
        def add_generic_rpc_handlers(self, handlers: Sequence[Any]) -> None:
            calls["generic"] = handlers

        def add_registered_method_handlers(self, name: str, handlers: dict[str, Any]) -> None:
            calls["registered"] = (name, handlers)

    grpc_events.add_control_service(pb.DESCRIPTOR and object.__new__(_Servicer), Recorder())
    name, handlers = calls["registered"]
    assert name == "nexus.fabric.v1.ControlService"
    assert handlers["WatchEvents"].response_serializer is grpc_events.serialize_event_batch
    assert handlers["ListNodes"].response_serializer is pb.ListNodesResponse.SerializeToString
    (generic,) = calls["generic"]

    class Details:
        method = "/nexus.fabric.v1.ControlService/WatchEvents"

    assert generic.service(Details()).response_serializer is grpc_events.serialize_event_batch


class _Servicer(grpc_events.pb_grpc.ControlServiceServicer):
    pass


@pytest.mark.parametrize("value", [1, 127, 128, 300, 16383, 16384, 2**35 + 7, 2**63 - 1])
def test_wire_varint_and_field_match_protobuf(value: int) -> None:
    # A varint field and a length-delimited field, each checked against protobuf's encoding
    # (protobuf leaves out a zero or empty field, so those are not compared).
    assert wire.varint(0) == b"\x00"
    assert b"\x08" + wire.varint(value) == pb.Event(index=value).SerializeToString()
    data = b"x" * (value % 20_000)
    assert wire.length_delimited(6, data) == pb.Event(payload=data).SerializeToString()
