"""``etcd``: the cost of one replicated-log commit in real etcd, vs the embedded LMDB commit.

Each commit is the transaction the replicated log writes for one group commit
(docs/cluster.md): compare ``{prefix}/leader`` create_revision == term (the fence) and
``{prefix}/log/{seq:020d}`` version == 0, then put ``--value-bytes`` at that key. It runs
on :class:`~nexus_fast.cluster.etcd_procs.EtcdCluster` members started here (``--members``,
e.g. ``1,3``), with ``--levels`` commits in flight, each awaited until etcd answers (quorum
reached, fsynced by etcd). The CPU that the etcd processes and this process spend per
commit comes from /proc.

``--baseline``: in the same run, interleaved with the etcd phases level by level, one
``LmdbStore.commit`` of the same bytes (synced: the embedded default's durable commit) and
a bare etcd Range of one key (the gRPC round trip floor of the same client).
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nexus_fast.benchmark.common import Context
from nexus_fast.benchmark.histogram import LatencyHistogram
from nexus_fast.benchmark.procs import BenchError, proc_cpu_seconds
from nexus_fast.benchmark.report import Measurement, Ratio, cpu_figure, ratio
from nexus_fast.benchmark.runner import Progress, drive

PREFIX = b"/nexus-bench"
LEADER_KEY = PREFIX + b"/leader"
START_TIMEOUT = 30.0
MAX_VALUE_BYTES = 4 << 20  # EtcdCluster allows 8 MiB requests; [cluster] entries are <= 1.5 MiB


def log_key(seq: int) -> bytes:
    """The replicated log's key of entry ``seq`` (``{prefix}/log/{seq:020d}``)."""
    return PREFIX + b"/log/%020d" % seq


def parse_members(text: str) -> list[int]:
    """``"1,3"`` -> ``[1, 3]``: etcd cluster sizes to measure (each 1..5, no repeats)."""
    import argparse

    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,3, got {text!r}") from None
    if not sizes or any(not 1 <= s <= 5 for s in sizes) or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(
            f"expected distinct sizes within 1..5 like 1,3, got {text!r}"
        )
    return sizes


def member_pids(cluster: Any) -> list[int]:
    """The pids of an EtcdCluster's running members."""
    return [pid for i in range(cluster.members) if (pid := cluster.pid(i)) is not None]


def per_commit_us(cpu_seconds: float | None, count: int) -> float | None:
    """CPU microseconds per commit (None when unknown or nothing committed)."""
    if cpu_seconds is None or count <= 0:
        return None
    return round(cpu_seconds * 1e6 / count, 1)


@dataclass
class System:
    """One thing measured at each level: a name, its commit, the pids whose CPU it costs."""

    name: str
    kind: str  # "etcd txn", "lmdb commit", "etcd range"
    commit: Callable[[], Awaitable[None]]
    pids: Callable[[], list[int]] = field(default_factory=lambda: list)
    members: int = 0

    def cpu(self) -> float | None:
        """CPU seconds of its processes so far (None when it has none or /proc fails)."""
        pids = self.pids()
        if not pids:
            return None
        total = 0.0
        for pid in pids:
            seconds = proc_cpu_seconds(pid)
            if seconds is None:
                return None
            total += seconds
        return total


class FencedLog:
    """The replicated log's write path in miniature: a leader key, then fenced puts."""

    def __init__(self, client: Any, value: bytes) -> None:
        self.client = client
        self.value = value
        self.term = 0
        self.seq = 0
        self.refused = 0

    async def elect(self, ttl: float) -> None:
        """Take ``{prefix}/leader`` with a lease (put if absent); term = its create_revision."""
        from nexus_fast.cluster.etcd import cmp_create_revision, op_put, op_range

        lease = await self.client.lease_grant(ttl)
        result = await self.client.txn(
            [cmp_create_revision(LEADER_KEY, "==", 0)],
            [op_put(LEADER_KEY, b'{"name":"nexus-bench"}', lease), op_range(LEADER_KEY)],
        )
        if not result.succeeded or not result.ranges or not result.ranges[0]:
            raise BenchError("etcd: could not take the bench's leader key")
        self.term = result.ranges[0][0].create_revision

    async def commit(self) -> None:
        """One entry: the fenced txn of the replicated log."""
        from nexus_fast.cluster.etcd import cmp_create_revision, cmp_version, op_put

        self.seq += 1
        key = log_key(self.seq)
        result = await self.client.txn(
            [cmp_create_revision(LEADER_KEY, "==", self.term), cmp_version(key, "==", 0)],
            [op_put(key, self.value)],
        )
        if not result.succeeded:
            self.refused += 1
            raise BenchError(f"etcd refused log entry {self.seq} (fence or double write)")


async def run(ctx: Context) -> None:
    """Start the etcd clusters, then measure every system at every level, interleaved."""
    from nexus_fast.cluster.etcd import EtcdClient
    from nexus_fast.cluster.etcd_procs import EtcdCluster
    from nexus_fast.store import LmdbStore, Put

    args = ctx.args
    value = b"x" * args.value_bytes
    loop = asyncio.get_running_loop()
    workdir = ctx.group.tempdir("nexus-bench-etcd-")
    clusters: list[EtcdCluster] = []
    clients: list[EtcdClient] = []
    systems: list[System] = []
    store: LmdbStore | None = None
    phases = len(args.levels) * (len(args.members) + (2 if args.baseline else 0))
    phase = args.duration / max(1, phases)
    try:
        for size in args.members:
            cluster = EtcdCluster(workdir / f"etcd{size}", size)
            clusters.append(cluster)
            print(f"nexus-bench: starting {size} etcd member(s) ...", flush=True)
            await loop.run_in_executor(None, cluster.start, START_TIMEOUT)
            client = EtcdClient(cluster.endpoints, timeout=10.0)
            clients.append(client)
            await client.connect()
            log = FencedLog(client, value)
            await log.elect(ttl=max(60.0, 3 * args.duration))
            systems.append(
                System(
                    f"etcd {size} member{'s' if size > 1 else ''}, fenced txn",
                    "etcd txn",
                    log.commit,
                    functools.partial(member_pids, cluster),
                    size,
                )
            )
        if args.baseline:
            store = LmdbStore(workdir / "lmdb", map_size=1 << 30)
            await store.open()
            counter = [0]
            lmdb_store = store

            async def lmdb_commit() -> None:
                counter[0] += 1
                await lmdb_store.commit([Put("nodes", log_key(counter[0]), value)])

            systems.append(
                System("LmdbStore.commit (synced), embedded", "lmdb commit", lmdb_commit)
            )
            floor_client = clients[0]

            async def bare_range() -> None:
                await floor_client.get(LEADER_KEY)

            systems.append(
                System(
                    f"etcd range of one key ({args.members[0]} member(s)), gRPC floor",
                    "etcd range",
                    bare_range,
                    functools.partial(member_pids, clusters[0]),
                    args.members[0],
                )
            )
        for level in args.levels:
            for system in systems:
                if ctx.stopping():
                    break
                m = await _measure(ctx, system, level, phase)
                (ctx.report.baseline if system.kind != "etcd txn" else ctx.report.results).append(m)
    finally:
        for client in clients:
            await client.close()
        if store is not None:
            await store.close()
        for cluster in clusters:
            await loop.run_in_executor(None, cluster.stop)
    ctx.report.ratios.extend(commit_ratios(ctx.report.results, ctx.report.baseline))
    ctx.report.notes.extend(cpu_notes(ctx.report.results + ctx.report.baseline))
    ctx.report.notes.append(
        "etcd members are on this machine's disk and loopback; on separate machines each "
        "commit adds a network round trip to a quorum member"
    )


async def _measure(ctx: Context, system: System, level: int, phase: float) -> Measurement:
    hist = LatencyHistogram()
    done = [0]

    async def op(intended: float) -> None:
        await system.commit()
        hist.record(time.perf_counter() - intended)
        done[0] += 1

    progress = Progress(
        lambda t: (
            f"{system.name} c={level}  t={t:4.1f}s  {done[0]:,} ({done[0] / max(t, 1e-9):,.0f}/s)"
        )
    )
    s0 = system.cpu()
    c0 = time.process_time()
    progress.start()
    try:
        result = await drive(op, duration=phase, concurrency=level, stop=ctx.stop)
    finally:
        await progress.stop()
    client_cpu = time.process_time() - c0
    s1 = system.cpu()
    server_cpu = s1 - s0 if s0 is not None and s1 is not None else None
    m = Measurement(
        name=f"{system.name}, {level} in flight",
        throughput=done[0] / result.elapsed if result.elapsed > 0 else 0.0,
        unit="commits/s" if system.kind != "etcd range" else "ranges/s",
        count=done[0],
        duration_s=round(result.elapsed, 3),
        errors=result.errors,
        server_cpu=cpu_figure(server_cpu, result.elapsed),
        client_cpu=cpu_figure(client_cpu, result.elapsed),
        extra={
            "kind": system.kind,
            "members": system.members,
            "in_flight": level,
            "value_bytes": ctx.args.value_bytes,
            "etcd_cpu_us_per_op": per_commit_us(server_cpu, done[0]),
            "client_cpu_us_per_op": per_commit_us(client_cpu, done[0]),
        },
    )
    if result.last_error:
        m.extra["last_error"] = result.last_error
    m.add_latency("commit" if system.kind != "etcd range" else "range", hist)
    return m


def commit_ratios(results: list[Measurement], baseline: list[Measurement]) -> list[Ratio]:
    """etcd txn vs the LMDB commit at the same level: p50 latency and commits/s."""
    lmdb = {m.extra.get("in_flight"): m for m in baseline if m.extra.get("kind") == "lmdb commit"}
    out: list[Ratio] = []
    for m in results:
        base = lmdb.get(m.extra.get("in_flight"))
        if base is None:
            continue
        ours_p50 = m.latency.get("commit", {}).get("p50_ms")
        base_p50 = base.latency.get("commit", {}).get("p50_ms")
        out.append(
            Ratio(
                f"{m.name}: p50 / LMDB p50",
                ratio(float(ours_p50) if ours_p50 else None, float(base_p50) if base_p50 else None),
                "commit latency, etcd fenced txn / LmdbStore.commit of the same bytes",
            )
        )
        out.append(
            Ratio(
                f"{m.name}: commits/s / LMDB",
                ratio(m.throughput, base.throughput),
                "etcd fenced txns/s / LmdbStore commits/s, same in-flight count",
            )
        )
    return out


def cpu_notes(measurements: list[Measurement]) -> list[str]:
    """One line per measurement: the CPU microseconds etcd and this process spent per op."""
    out = []
    for m in measurements:
        etcd_us = m.extra.get("etcd_cpu_us_per_op")
        ours_us = m.extra.get("client_cpu_us_per_op")
        etcd_text = f"etcd {etcd_us:,.0f} us" if etcd_us is not None else "no etcd"
        ours_text = f"this process {ours_us:,.0f} us" if ours_us is not None else "?"
        out.append(f"CPU per op, {m.name}: {etcd_text} (all members), {ours_text}")
    return out
