"""``catchup``: a subscriber catching up from the durable event log, vs a bare py-lmdb scan.

Setup, in this process: an ``LmdbStore`` in a temporary directory filled with ``--events``
command transition events (real bodies, as the command log writes them: ~160 bytes each)
through the store's own group commits, then an ``EventBus`` over it with a ring of 4,096,
so nearly every event is older than the ring.

Measured, interleaved for ``--duration`` seconds (at least two rounds; best round of each):

* **ours**: ``bus.subscribe(after_index=0)`` then ``Subscription.read_stored(500, 1 MiB)``
  until caught up: the gRPC watcher's catch-up loop without the socket. Each call is one
  ``buffers=True`` read txn whose cursor the compiled walk (``nexus_fast._eventlog_c``)
  turns into one serialized ``EventBatch``: every stored body copied once, into the batch.
* **bare py-lmdb scan** (the baseline): one read txn, ``for key, value in txn.cursor()``
  over the same ``events`` database, counting bytes. What reading the records costs at all.

Once, on the first ``--pure-events`` events (they are slow): the walk in batches of 500
with each twin (``nexus_fast._eventlog_c`` and ``_eventlog_py``, called directly), and the path a catch-up took before the zero-copy
walk (``EventBus.read_after`` from the log: an ``EventEnvelope`` per event, then
``batch_bytes``). Ratios: ours / bare scan (target >= 0.8), compiled / pure (>= 3), ours /
envelope path.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from types import ModuleType

from nexus_fast import _eventlog_py
from nexus_fast.benchmark.common import Context
from nexus_fast.benchmark.report import Measurement, Ratio, cpu_figure, ratio
from nexus_fast.benchmark.scenarios.micro import load_twin
from nexus_fast.codec.frames import batch_bytes, decode_event
from nexus_fast.codec.protowire import CommandEvents
from nexus_fast.config import EventsConfig
from nexus_fast.core.events import EventBus
from nexus_fast.eventlog import IMPLEMENTATION
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store import LmdbStore
from nexus_fast.store.writer import EVENTS_DB

RING = 4096
BATCH_EVENTS = 500  # as grpc_events.MAX_BATCH_EVENTS
BATCH_BYTES = 1 << 20  # as grpc_events.MAX_BATCH_BYTES
FILL_CHUNK = 10_000
STATES = (pb.COMMAND_STATE_PLACED, pb.COMMAND_STATE_DISPATCHED, pb.COMMAND_STATE_ACKED)


def _bodies(count: int) -> Iterator[list[bytes]]:
    """Command transition events as the command log encodes them, FILL_CHUNK at a time."""
    encoder = CommandEvents()
    record = pb.CommandRecord(node_id="node-00042", attempt=1, created_ms=1, updated_ms=2)
    record.spec.kind = "echo"
    record.spec.payload = b"x" * 64
    record.spec.timeout_ms = 30_000
    time_field = encoder.time_field(1_764_000_000_000)
    for start in range(0, count, FILL_CHUNK):
        chunk = []
        for i in range(start, min(start + FILL_CHUNK, count)):
            record.id = f"19a8c0ffee12345678-{i // 4:08x}"
            record.state = STATES[i % 3]
            chunk.append(encoder.encode(record, record.SerializeToString(), time_field))
        yield chunk


def _catch_up(bus: EventBus, upto: int) -> tuple[int, int]:
    """Our catch-up from index 0 to ``upto``: (events, batch bytes)."""
    sub = bus.subscribe(after_index=0, transport="bench")
    events = size = 0
    try:
        while sub.cursor < upto:
            stored = sub.read_stored(BATCH_EVENTS, BATCH_BYTES)
            if stored is None:
                break  # the ring holds the rest
            events += stored[1]
            size += len(stored[0])
    finally:
        sub.close()
    return events, size


def _envelope_path(bus: EventBus, upto: int) -> tuple[int, int]:
    """The catch-up before the zero-copy walk: envelopes from the log, then batch_bytes."""
    after = events = size = 0
    while after < upto:
        batch = bus.read_after(after, BATCH_EVENTS)
        size += len(batch_bytes(batch))
        events += len(batch)
        after = batch[-1].index
    return events, size


def _bare_scan(store: LmdbStore) -> tuple[int, int]:
    """One read txn, every (key, value) of the events database as bytes."""
    env, db = store._handle(EVENTS_DB)
    events = size = 0
    with env.begin(db=db) as txn:
        for _, value in txn.cursor():
            events += 1
            size += len(value)
    return events, size


def _walk_log(store: LmdbStore, twin: ModuleType, upto: int) -> tuple[int, int]:
    """What ``LmdbStore.event_batch`` does, with a given twin: batches from 0 to ``upto``."""
    env, db = store._handle(EVENTS_DB)
    after = events = size = 0
    while after < upto:
        with env.begin(db=db, buffers=True) as txn:
            batch, count, after = twin.collect_batch(
                txn.cursor(),
                after,
                upto,
                BATCH_EVENTS,
                BATCH_BYTES,
                BATCH_EVENTS,
                None,
                None,
                decode_event,
            )
        events += count
        size += len(batch)
    return events, size


def _timed(fn: Callable[[], tuple[int, int]]) -> tuple[float, float, int, int]:
    wall, cpu = time.perf_counter(), time.process_time()
    events, size = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, events, size


def _per_cpu(timing: tuple[float, float, int, int]) -> float | None:
    _, cpu, events, _ = timing
    return events / cpu if cpu > 0 else None


def _measurement(name: str, best: tuple[float, float, int, int], rounds: int) -> Measurement:
    wall, cpu, events, size = best
    return Measurement(
        name=name,
        throughput=round(events / wall, 1) if wall > 0 else 0.0,
        unit="events/s",
        count=events,
        duration_s=round(wall, 4),
        client_cpu=cpu_figure(cpu, wall),
        extra={"bytes": size, "rounds": rounds, "us_per_event": round(1e6 * wall / events, 4)},
    )


async def run(ctx: Context) -> None:
    """Fill a log, then time our catch-up, the bare scan, the pure twin and the old path."""
    args = ctx.args
    total: int = args.events
    path = ctx.group.tempdir("nexus-bench-catchup-")
    store = LmdbStore(path, map_size=1 << 28, max_batch_ops=FILL_CHUNK + 10)
    await store.open()
    try:
        for chunk in _bodies(total):
            await store.commit((), chunk)
            if ctx.stopping():
                return
        bus = EventBus(store, EventsConfig(), RING)
        bus.load()
        last = bus.last_index
        best: dict[str, tuple[float, float, int, int]] = {}
        runs = {"ours": lambda: _catch_up(bus, last), "bare": lambda: _bare_scan(store)}
        rounds = 0
        started = time.monotonic()
        while rounds < 2 or time.monotonic() - started < args.duration:
            for name, fn in runs.items():
                timing = _timed(fn)
                if name not in best or timing[0] < best[name][0]:
                    best[name] = timing
                await asyncio.sleep(0)
            rounds += 1
            if ctx.stopping():
                break
        subset = min(args.pure_events, last)
        compiled_twin = load_twin("eventlog", "c")
        if compiled_twin is not None:
            compiled = _timed(lambda: _walk_log(store, compiled_twin, subset))
        pure = _timed(lambda: _walk_log(store, _eventlog_py, subset))
        ours_subset = _timed(lambda: _catch_up_to(bus, subset))
        envelopes = _timed(lambda: _envelope_path(bus, subset))
    finally:
        await store.close()
    report = ctx.report
    ours = _measurement(f"catch-up from the log ({IMPLEMENTATION} walk)", best["ours"], rounds)
    ours.extra["events_in_log"] = last
    report.results.append(ours)
    if compiled_twin is not None:
        report.results.append(_measurement(f"walk of {subset} events, compiled twin", compiled, 1))
    report.results.append(_measurement(f"walk of {subset} events, pure twin", pure, 1))
    report.results.append(_measurement(f"catch-up, {subset} events", ours_subset, 1))
    report.results.append(
        _measurement(f"catch-up, {subset} events, envelope per event", envelopes, 1)
    )
    bare = _measurement("bare py-lmdb cursor scan (bytes)", best["bare"], rounds)
    report.baseline.append(bare)
    report.ratios += [
        Ratio(
            "catch-up / bare scan",
            ratio(ours.throughput, bare.throughput),
            "events/s of Subscription.read_stored batches / a bare py-lmdb scan, same records",
            ">= 0.8",
        ),
        Ratio(
            "catch-up / bare scan, per CPU-second",
            ratio(_per_cpu(best["ours"]), _per_cpu(best["bare"])),
            "events per CPU-second of this process, same rounds (steadier on a busy machine)",
            ">= 0.8",
        ),
        Ratio(
            "compiled / pure twin",
            ratio(compiled[2] / compiled[0], pure[2] / pure[0]) if compiled_twin else None,
            f"walk of {subset} events in batches of 500, _eventlog_c / _eventlog_py",
            ">= 3",
        ),
        Ratio(
            "zero-copy / envelope per event",
            ratio(ours_subset[2] / ours_subset[0], envelopes[2] / envelopes[0]),
            f"catch-up of {subset} events, read_stored / read_after + batch_bytes",
        ),
    ]


def _catch_up_to(bus: EventBus, upto: int) -> tuple[int, int]:
    """Catch up from index 0 to ``upto`` only (the subset the slow paths are timed on)."""
    sub = bus.subscribe(after_index=0, transport="bench")
    events = size = 0
    try:
        while sub.cursor < upto:
            stored = sub.read_stored(min(BATCH_EVENTS, upto - sub.cursor), BATCH_BYTES)
            if stored is None:
                break
            events += stored[1]
            size += len(stored[0])
    finally:
        sub.close()
    return events, size
