"""``state``: the LMDB store in this process: durable commits/s by concurrency, and get/s.

Each commit is one request of one ``Put`` (200-byte value) plus one event body, awaited
until durable (fsynced) — what a state change costs. ``--levels`` lists the numbers of
commits in flight; group commit should turn more of them into fewer, larger transactions
(``requests_per_txn``). The baseline (``--baseline``) is bare py-lmdb with one synced write
transaction per put from one thread, and one read transaction per get: what the store
would cost without group commit.
"""

from __future__ import annotations

import asyncio
import random
import time

import lmdb

from nexus_fast.benchmark.common import Context
from nexus_fast.benchmark.histogram import LatencyHistogram
from nexus_fast.benchmark.report import Measurement, Ratio, cpu_figure, ratio
from nexus_fast.benchmark.runner import Progress, drive
from nexus_fast.store import LmdbStore, Put

VALUE = b"v" * 200
EVENT = b"e" * 120
GET_BATCH = 1000


def _key(i: int) -> bytes:
    return b"bench-%010d" % i


async def run(ctx: Context) -> None:
    """Commits/s at each concurrency level, then get/s; optionally the bare-lmdb baseline."""
    args = ctx.args
    levels: list[int] = args.levels
    phase = args.duration / (len(levels) + 1)
    path = ctx.group.tempdir("nexus-bench-state-")
    store = LmdbStore(path / "ours", map_size=1 << 30)
    await store.open()
    written = [0]
    try:
        for level in levels:
            if ctx.stopping():
                break
            ctx.report.results.append(await _commits(ctx, store, level, phase, written))
        if not ctx.stopping():
            ctx.report.results.append(await _gets(ctx, store, phase, written[0]))
    finally:
        await store.close()
    if not args.baseline or ctx.stopping():
        return
    loop = asyncio.get_running_loop()
    env = lmdb.open(str(path / "bare"), map_size=1 << 30, sync=True, metasync=True, max_dbs=4)
    try:
        puts, gets = await loop.run_in_executor(None, _bare, env, phase)
    finally:
        env.close()
    ctx.report.baseline.extend([puts, gets])
    best = max((m for m in ctx.report.results if m.unit == "commits/s"), key=lambda m: m.throughput)
    ctx.report.ratios.append(
        Ratio(
            "group commit / bare synced txn",
            ratio(best.throughput, puts.throughput),
            f"{best.name} / bare py-lmdb, one synced txn per put",
        )
    )
    ours_gets = ctx.report.results[-1]
    if ours_gets.unit == "gets/s":
        ctx.report.ratios.append(
            Ratio(
                "store get / bare lmdb get",
                ratio(ours_gets.throughput, gets.throughput),
                "LmdbStore.get/s / py-lmdb get in its own read txn per get",
            )
        )


async def _commits(
    ctx: Context, store: LmdbStore, level: int, phase: float, written: list[int]
) -> Measurement:
    hist = LatencyHistogram()
    done = [0]
    txn0 = store.txn_count

    async def op(intended: float) -> None:
        i = written[0]
        written[0] += 1
        await store.commit([Put("nodes", _key(i), VALUE)], (EVENT,))
        hist.record(time.perf_counter() - intended)
        done[0] += 1

    progress = Progress(
        lambda t: (
            f"state commits c={level}  t={t:4.1f}s  {done[0]:,} ({done[0] / max(t, 1e-9):,.0f}/s)"
        )
    )
    c0 = time.process_time()
    progress.start()
    try:
        result = await drive(op, duration=phase, concurrency=level, stop=ctx.stop)
    finally:
        await progress.stop()
    txns = store.txn_count - txn0
    m = Measurement(
        name=f"durable commits, {level} in flight",
        throughput=done[0] / result.elapsed,
        unit="commits/s",
        count=done[0],
        duration_s=round(result.elapsed, 3),
        errors=result.errors,
        server_cpu=None,
        client_cpu=cpu_figure(time.process_time() - c0, result.elapsed),
        extra={"txns": txns, "requests_per_txn": round(done[0] / txns, 2) if txns else 0},
    )
    m.add_latency("commit (durable)", hist)
    return m


async def _gets(ctx: Context, store: LmdbStore, phase: float, keys: int) -> Measurement:
    rng = random.Random(1)
    count = 0
    misses = 0
    c0 = time.process_time()
    t0 = time.perf_counter()
    end = t0 + phase
    get = store.get
    while time.perf_counter() < end and not ctx.stopping():
        for _ in range(GET_BATCH):
            if get("nodes", _key(rng.randrange(max(keys, 1)))) is None:
                misses += 1
        count += GET_BATCH
        await asyncio.sleep(0)  # reads run on the loop: let it breathe between batches
    elapsed = time.perf_counter() - t0
    return Measurement(
        name=f"store.get, {keys:,} keys",
        throughput=count / elapsed,
        unit="gets/s",
        count=count,
        duration_s=round(elapsed, 3),
        errors=misses,
        client_cpu=cpu_figure(time.process_time() - c0, elapsed),
    )


def _bare(env: lmdb.Environment, phase: float) -> tuple[Measurement, Measurement]:
    """Bare py-lmdb: one synced write txn per put, then one read txn per get."""
    db = env.open_db(b"nodes")
    hist = LatencyHistogram()
    n = 0
    t0 = time.perf_counter()
    end = t0 + phase
    while time.perf_counter() < end:
        t = time.perf_counter()
        with env.begin(write=True, db=db) as txn:
            txn.put(_key(n), VALUE)
        hist.record(time.perf_counter() - t)
        n += 1
    elapsed = time.perf_counter() - t0
    puts = Measurement(
        name="py-lmdb, one synced txn per put",
        throughput=n / elapsed,
        unit="commits/s",
        count=n,
        duration_s=round(elapsed, 3),
    )
    puts.add_latency("commit (durable)", hist)
    rng = random.Random(1)
    count = 0
    t0 = time.perf_counter()
    end = t0 + phase
    while time.perf_counter() < end:
        for _ in range(GET_BATCH):
            with env.begin(db=db) as txn:
                txn.get(_key(rng.randrange(max(n, 1))))
        count += GET_BATCH
    elapsed = time.perf_counter() - t0
    gets = Measurement(
        name="py-lmdb get, one read txn each",
        throughput=count / elapsed,
        unit="gets/s",
        count=count,
        duration_s=round(elapsed, 3),
    )
    return puts, gets
