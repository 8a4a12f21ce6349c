"""The leader's group commit through etcd (ReplicatedStore) vs the embedded LmdbStore.

The request is `nexus-bench state`'s: one Put of 200 bytes and one 120-byte event, awaited
until durable. Systems, measured in turn at each level and for every round (interleaved):
LmdbStore alone (the embedded default), and a ReplicatedStore leader (Election won, then
become_leader) on 1 and on 3 real etcd members started here. Prints per system and level,
for each round: commits/s, p50/p99 ms, requests per LMDB txn / etcd entry, this process's
CPU and the etcd members' CPU per request (from /proc). docs/performance.md, "Replicas on
etcd".

    .venv/bin/python bench/replicated_commit.py --phase 4 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

from nexus_fast.benchmark.histogram import LatencyHistogram
from nexus_fast.benchmark.procs import proc_cpu_seconds
from nexus_fast.benchmark.runner import drive
from nexus_fast.cluster.election import Election
from nexus_fast.cluster.etcd import EtcdClient
from nexus_fast.cluster.etcd_procs import EtcdCluster
from nexus_fast.store import LmdbStore, Put
from nexus_fast.store.replicated import ReplicatedStore

VALUE, EVENT = b"v" * 200, b"e" * 120
PREFIX = b"/bench"


async def measure(
    store: Any, level: int, pids: list[int], counter: list[int], phase: float
) -> dict[str, float]:
    hist = LatencyHistogram()
    done = [0]

    async def op(intended: float) -> None:
        counter[0] += 1
        await store.commit([Put("nodes", b"k%012d" % counter[0], VALUE)], (EVENT,))
        hist.record(time.perf_counter() - intended)
        done[0] += 1

    def written() -> int:
        return int(store.entries_written if isinstance(store, ReplicatedStore) else store.txn_count)

    def etcd_cpu() -> float:
        return sum(proc_cpu_seconds(p) or 0.0 for p in pids)

    e0, c0, w0 = etcd_cpu(), time.process_time(), written()
    result = await drive(op, duration=phase, concurrency=level)
    c1, e1, w1 = time.process_time(), etcd_cpu(), written()
    n = max(done[0], 1)
    return {
        "rate": done[0] / result.elapsed,
        "p50": hist.percentile(50) * 1e3,
        "p99": hist.percentile(99) * 1e3,
        "per_txn": done[0] / max(1, w1 - w0),
        "ours_us": (c1 - c0) * 1e6 / n,
        "etcd_us": (e1 - e0) * 1e6 / n,
        "errors": result.errors,
    }


async def leader(
    tmp: Path, members: int
) -> tuple[EtcdCluster, EtcdClient, Election, ReplicatedStore]:
    cluster = EtcdCluster(tmp / f"etcd{members}", members)
    cluster.start()
    client = EtcdClient(cluster.endpoints, timeout=5.0)
    await client.connect()
    election = Election(client, PREFIX, "r0", "127.0.0.1:1", 5.0)
    store = ReplicatedStore(
        LmdbStore(tmp / f"replica{members}", map_size=1 << 30), client, election, PREFIX
    )
    await store.open()
    await election.start()
    for _ in range(200):
        if election.role == "leader":
            break
        await asyncio.sleep(0.05)
    await store.become_leader()
    return cluster, client, election, store


async def main(args: argparse.Namespace) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="nexus-replicated-commit-"))
    parts: list[tuple[EtcdCluster, EtcdClient, Election, ReplicatedStore]] = []
    embedded = LmdbStore(tmp / "embedded", map_size=1 << 30)
    try:
        await embedded.open()
        systems: dict[str, tuple[Any, list[int]]] = {"LmdbStore (embedded)": (embedded, [])}
        for members in (1, 3):
            part = await leader(tmp, members)
            parts.append(part)
            pids = [p for i in range(members) if (p := part[0].pid(i)) is not None]
            systems[f"ReplicatedStore, etcd {members} member(s)"] = (part[3], pids)
        counter = [0]
        results: dict[tuple[str, int], list[dict[str, float]]] = {}
        for _ in range(args.rounds):
            for level in args.levels:
                for name, (store, pids) in systems.items():
                    row = await measure(store, level, pids, counter, args.phase)
                    results.setdefault((name, level), []).append(row)
        for (name, level), rows in results.items():
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            each = ", ".join(f"{r['rate']:,.0f}" for r in rows)
            print(
                f"{name:38s} {level:>3d} in flight: median {med['rate']:8,.0f}/s  p50 {med['p50']:6.2f}"
                f"  p99 {med['p99']:6.2f} ms  req/txn {med['per_txn']:5.1f}  ours {med['ours_us']:5.0f} us"
                f"  etcd {med['etcd_us']:5.0f} us  (rounds: {each}/s;"
                f" errors {sum(r['errors'] for r in rows):.0f})"
            )
    finally:
        for cluster, client, election, store in parts:
            await store.close()
            await election.stop()
            await client.close()
            cluster.stop()
        await embedded.close()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase", type=float, default=4.0, help="seconds per measurement (4)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over every system (3)")
    parser.add_argument(
        "--levels", type=lambda t: [int(x) for x in t.split(",")], default=[1, 16, 256]
    )
    uvloop.run(main(parser.parse_args()))
