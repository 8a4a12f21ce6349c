"""The stored-event reader (``nexus_fast.eventlog``): both twins against protobuf and each other.

``event_head`` must read what ``pb.Event`` reads, and refuse the same malformed bytes in
both twins; ``collect_batch`` must produce, from a real LMDB cursor over ``buffers=True``
views, exactly the bytes of the envelope path (``batch_bytes`` of ``EventEnvelope``s), with
the same bounds, filters and stops. Then the bus's catch-up (``Subscription.read_stored``)
over a real LmdbStore.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Coroutine
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import lmdb
import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nexus_fast.codec.frames import EventEnvelope, batch_bytes, decode_event
from nexus_fast.config import EventsConfig
from nexus_fast.core.events import EventBus, EventIndexTooOld
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store import LmdbStore

from ..conftest import IMPLEMENTATIONS, _load_twin

T = TypeVar("T")
TOPICS = ("node", "command", "agent", "system")
TWINS = [_load_twin("eventlog", impl) for impl in IMPLEMENTATIONS]


def run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(coro, 60))


text = st.text(max_size=12)
events = st.builds(
    pb.Event,
    index=st.one_of(st.just(0), st.integers(0, 2**64 - 1)),
    time_ms=st.integers(-(2**63), 2**63 - 1),
    topic=st.one_of(st.sampled_from(TOPICS), text),
    type=text,
    key=st.one_of(st.sampled_from(["a", "b", "c"]), text),
    payload=st.binary(max_size=300),
    actor=text,
    details=st.dictionaries(text, text, max_size=2),
)


def _head_or_error(twin: ModuleType, body: bytes) -> object:
    try:
        return twin.event_head(body)
    except twin.MalformedEvent:
        return "malformed"


@given(events)
def test_event_head_reads_what_protobuf_reads(event: pb.Event) -> None:
    body = event.SerializeToString()
    parsed = pb.Event.FromString(body)
    want = (parsed.index != 0, parsed.time_ms)
    for twin in TWINS:
        has_index, time_ms, topic, event_type, key = twin.event_head(body)
        assert (has_index, time_ms) == want  # proto3 leaves index 0 out: absent
        assert (topic, event_type, key) == (parsed.topic, parsed.type, parsed.key)
        assert twin.event_head(memoryview(body)) == twin.event_head(body)


@given(st.binary(max_size=64), st.binary(max_size=8))
def test_event_head_twins_agree_on_any_bytes(junk: bytes, tail: bytes) -> None:
    valid = pb.Event(topic="node", key="k", time_ms=5).SerializeToString()
    for body in (junk, valid + junk, junk + valid, valid[:-1], valid + tail):
        results = {repr(_head_or_error(twin, body)) for twin in TWINS}
        assert len(results) == 1, body
        if results != {"'malformed'"}:
            # Whatever both accept, protobuf accepts too, with the same head.
            parsed = pb.Event.FromString(body)
            assert _head_or_error(TWINS[0], body)[2:] == (  # type: ignore[index]
                parsed.topic,
                parsed.type,
                parsed.key,
            )


def test_event_head_refuses_bad_strings_and_wire_types() -> None:
    cases = [
        b"\x1a\x02\xff\xfe",  # topic not UTF-8
        b"\x1a\x05node",  # length past the end
        b"\x10",  # truncated varint
        b"\x1d\x00\x00\x00\x00",  # topic with wire type 5
        b"\x0b",  # a group start
        b"\x00\x01",  # field 0
        b"\x10" + b"\xff" * 10 + b"\x01",  # an 11-byte varint
    ]
    for body in cases:
        for twin in TWINS:
            with pytest.raises(twin.MalformedEvent):
                twin.event_head(body)


def _env(path: Path, bodies: dict[int, bytes]) -> tuple[lmdb.Environment, Any]:
    env = lmdb.open(str(path), map_size=1 << 26, max_dbs=2)
    db = env.open_db(b"events")
    with env.begin(write=True, db=db) as txn:
        for index, body in sorted(bodies.items()):
            txn.put(struct.pack(">Q", index), body)
    return env, db


def _reference(
    bodies: dict[int, bytes],
    after: int,
    upto: int,
    max_events: int,
    max_bytes: int,
    scan_limit: int,
    topics: frozenset[str] | None,
    keys: frozenset[str] | None,
) -> tuple[bytes, int, int]:
    """The envelope path: what a subscriber reading through the ring would be sent."""
    chosen: list[EventEnvelope] = []
    size = 0
    examined = after
    index = after + 1
    scanned = 0
    while index in bodies and index <= upto and scanned < scan_limit and len(chosen) < max_events:
        envelope = decode_event(index, bodies[index])
        if (topics is None or envelope.topic in topics) and (keys is None or envelope.key in keys):
            cost = len(envelope.pb_field)
            if chosen and size + cost > max_bytes:
                break
            chosen.append(envelope)
            size += cost
        examined = index
        index += 1
        scanned += 1
    return batch_bytes(chosen), len(chosen), examined


stored = st.builds(
    pb.Event,
    time_ms=st.integers(0, 2**45),
    topic=st.sampled_from(TOPICS),
    type=st.sampled_from(["x.a", "x.b"]),
    key=st.sampled_from(["a", "b", "c", "é"]),
    payload=st.binary(max_size=200),
).map(lambda e: e.SerializeToString())
odd = st.sampled_from(
    [
        b"\x1a\x02\xff\xfe",  # malformed: framed as system.corrupt by the fallback
        pb.Event(index=7, topic="node", key="a").SerializeToString(),  # carries an index
    ]
)


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    bodies=st.lists(st.one_of(stored, stored, stored, odd), min_size=0, max_size=40),
    first=st.integers(1, 5),
    gap=st.one_of(st.none(), st.integers(0, 40)),
    after_offset=st.integers(-1, 42),
    max_events=st.integers(1, 50),
    max_bytes=st.sampled_from([1, 300, 2000, 1 << 20]),
    scan_limit=st.integers(1, 50),
    topics=st.one_of(st.none(), st.frozensets(st.sampled_from(TOPICS), min_size=1)),
    keys=st.one_of(st.none(), st.frozensets(st.sampled_from(["a", "b", "é"]), min_size=1)),
    upto_cut=st.integers(0, 5),
)
def test_collect_batch_equals_the_envelope_path(
    tmp_path_factory: pytest.TempPathFactory,
    bodies: list[bytes],
    first: int,
    gap: int | None,
    after_offset: int,
    max_events: int,
    max_bytes: int,
    scan_limit: int,
    topics: frozenset[str] | None,
    keys: frozenset[str] | None,
    upto_cut: int,
) -> None:
    log = {first + i: body for i, body in enumerate(bodies)}
    if gap is not None and first + gap in log and first + gap + 1 in log:
        del log[first + gap]  # never written by the store; the walk must stop there
    last = max(log, default=first - 1)
    after = max(first - 1 + after_offset, 0)
    upto = last - upto_cut
    env, db = _env(tmp_path_factory.mktemp("log"), log)
    try:
        want = _reference(log, after, upto, max_events, max_bytes, scan_limit, topics, keys)
        for twin in TWINS:
            with env.begin(db=db, buffers=True) as txn:
                got = twin.collect_batch(
                    txn.cursor(),
                    after,
                    upto,
                    max_events,
                    max_bytes,
                    scan_limit,
                    topics,
                    keys,
                    decode_event,
                )
            assert type(got[0]) is bytes
            assert got == want, twin.__name__
            batch = pb.EventBatch.FromString(got[0])
            assert len(batch.events) == got[1]
    finally:
        env.close()


def test_read_stored_catches_up_from_the_log_older_than_the_ring(tmp_path: Path) -> None:
    async def body() -> None:
        store = LmdbStore(tmp_path, map_size=1 << 24)
        await store.open()
        bus = EventBus(store, EventsConfig(), 16)
        store.on_commit = bus.publish_committed
        try:
            for i in range(10):
                bodies = [
                    pb.Event(
                        time_ms=1 + i, topic=TOPICS[j % 4], type="t.x", key=f"k{j % 3}"
                    ).SerializeToString()
                    for j in range(30)
                ]
                await store.commit((), bodies)
            last = bus.last_index
            assert last == 300 and bus.ring.first_index == last - 15
            everything = bus.subscribe(after_index=0)
            command_k1 = bus.subscribe(topics=["command"], keys=["k1"], after_index=0)
            for sub in (everything, command_k1):
                got = b""
                while (stored := sub.read_stored(100, 1 << 20)) is not None:
                    got += stored[0]
                assert sub.cursor == last  # read to the newest, in batches of <= 100
                got += batch_bytes(sub.read(1000))
                assert sub.lag == 0 and sub.read_stored(100, 1 << 20) is None
                want = [
                    decode_event(i, b)
                    for i, b in store.events_since(0, 1000)
                    if sub.matches(decode_event(i, b))
                ]
                assert got == batch_bytes(want)
            recent = bus.subscribe(after_index=bus.ring.first_index - 1)
            assert recent.read_stored(100, 1 << 20) is None  # the ring serves it
            assert [e.index for e in recent.read(100)] == list(range(285, 301))
            await store.prune_events(50)
            late = bus.subscribe(after_index=60)
            await store.prune_events(100)
            with pytest.raises(EventIndexTooOld):
                late.read_stored(100, 1 << 20)
        finally:
            await store.close()

    run(body())
