"""``--cluster 1,3``: the same scenario on the embedded default and on replicas on etcd.

``nexus-bench roundtrip|dispatch --cluster 1,3`` starts, on free loopback ports, the
embedded server (as ``--spawn``) and for each listed replica count N an etcd cluster (one
member for N = 1, three members otherwise: a quorum that survives one loss, as production
would run) plus N ``nexus-fast serve`` processes with ``[cluster] enabled = true``, each
with its own data dir, and waits until one of them holds the leader key. Then it runs the
scenario ``--cluster-rounds`` times on each system in turn (embedded, 1 replica,
3 replicas, embedded, ...: interleaved, so a machine loaded by other work loads every
system alike), the targets of a cluster spread over its replicas (the simulated nodes are
split over them; submits go to the last replica started, a follower when N > 1, which
forwards them to the leader).

Server CPU of a cluster is the sum over its replicas AND its etcd members. Ratios compare
the median over rounds of each system with the embedded default's.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nexus_fast.benchmark.common import Context, run_labels
from nexus_fast.benchmark.procs import (
    BenchError,
    Endpoints,
    ProcessGroup,
    proc_cpu_seconds,
    spawn_server,
)
from nexus_fast.benchmark.report import Measurement, Ratio, ratio

__all__ = ["SCENARIOS", "etcd_members", "parse_cluster", "replica_config", "run"]

SCENARIOS = ("roundtrip", "dispatch")
PREFIX = "/nexus-bench"
LEASE_TTL_S = 2.0
LEADER_TIMEOUT = 30.0
MAX_REPLICAS = 5


def parse_cluster(text: str) -> list[int]:
    """``"1,3"`` -> ``[1, 3]``: replica counts to compare with the embedded default."""
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected replica counts like 1,3, got {text!r}"
        ) from None
    if not sizes or any(not 1 <= s <= MAX_REPLICAS for s in sizes) or len(set(sizes)) != len(sizes):
        raise argparse.ArgumentTypeError(
            f"expected distinct replica counts within 1..{MAX_REPLICAS} like 1,3, got {text!r}"
        )
    return sizes


def etcd_members(replicas: int) -> int:
    """etcd members for ``replicas`` replicas: 1 for one replica, else 3 (survives a loss)."""
    return 1 if replicas == 1 else 3


def replica_config(name: str, endpoints: list[str], prefix: str = PREFIX) -> str:
    """The TOML of one replica: ``[cluster]`` on, its name, etcd and the key prefix."""
    quoted = ", ".join(f'"{e}"' for e in endpoints)
    return (
        "[cluster]\n"
        "enabled = true\n"
        f'name = "{name}"\n'
        f"etcd_endpoints = [{quoted}]\n"
        f'etcd_prefix = "{prefix}"\n'
        f'lease_ttl = "{LEASE_TTL_S:g}s"\n'
    )


@dataclass
class ClusterEndpoints(Endpoints):
    """A cluster's replicas as one server under test; CPU = replicas + etcd members."""

    pids: list[int] = field(default_factory=list)
    etcd: Any = None  # EtcdCluster
    replicas: list[Endpoints] = field(default_factory=list)  # each one, as ``targets``

    def cpu_seconds(self) -> float | None:
        """CPU seconds of every replica and every etcd member so far."""
        pids = list(self.pids)
        if self.etcd is not None:
            pids += [p for i in range(self.etcd.members) if (p := self.etcd.pid(i)) is not None]
        total = 0.0
        for pid in pids:
            seconds = proc_cpu_seconds(pid)
            if seconds is None:
                return None
            total += seconds
        return total


async def spawn_cluster(
    group: ProcessGroup, replicas: int, etcd_count: int | None = None
) -> ClusterEndpoints:
    """etcd (``etcd_count`` members, default :func:`etcd_members`) + ``replicas``
    cluster-mode servers; returns once a leader holds the key."""
    from nexus_fast.cluster.etcd import EtcdClient
    from nexus_fast.cluster.etcd_procs import EtcdCluster

    loop = asyncio.get_running_loop()
    workdir = group.tempdir(f"nexus-bench-cluster{replicas}-")
    etcd = EtcdCluster(workdir / "etcd", etcd_count or etcd_members(replicas))
    await loop.run_in_executor(None, etcd.start, 30.0)
    result = ClusterEndpoints(grpc="", etcd=etcd)
    try:
        servers: list[Endpoints] = []
        for i in range(replicas):
            config = workdir / f"replica{i}.toml"
            config.write_text(replica_config(f"r{i}", etcd.endpoints))
            print(f"nexus-bench: starting replica r{i} of {replicas} ...", file=sys.stderr)
            start = functools.partial(spawn_server, group, config=config)
            servers.append(await loop.run_in_executor(None, start))
        await _wait_leader(EtcdClient(etcd.endpoints, timeout=5.0))
    except BaseException:
        etcd.stop()
        raise
    # The last replica started first: with several it is a follower (r0, started alone,
    # leads), so submits take the forwarding path clients of a follower take; nodes that a
    # follower refuses (UNAVAILABLE + nexus-leader) move on to the leader by themselves.
    servers.reverse()
    targets = tuple(s.grpc for s in servers)
    result.grpc, result.http, result.ws, result.targets = (
        targets[0],
        servers[0].http,
        servers[0].ws,
        targets,
    )
    result.pids = [s.pid for s in servers if s.pid is not None]
    result.replicas = servers
    return result


async def _wait_leader(client: Any) -> None:
    deadline = time.monotonic() + LEADER_TIMEOUT
    try:
        await client.connect()
        while await client.get(PREFIX.encode() + b"/leader") is None:
            if time.monotonic() > deadline:
                raise BenchError(f"no replica took {PREFIX}/leader within {LEADER_TIMEOUT:.0f}s")
            await asyncio.sleep(0.1)
    finally:
        await client.close()


def _label(results: list[Measurement], start: int, system: str, rnd: int) -> None:
    for m in results[start:]:
        m.extra["system"] = system
        m.extra["round"] = rnd
        m.name = f"{m.name} [{system}, round {rnd}]"


def system_name(replicas: int) -> str:
    """``0`` -> ``"embedded"``, ``3`` -> ``"3 replicas"``."""
    if replicas == 0:
        return "embedded"
    return f"{replicas} replica{'s' if replicas > 1 else ''}"


def medians(results: list[Measurement], system: str) -> tuple[float, float | None] | None:
    """Median throughput and median p50 (ms, first latency) of ``system``'s first figure
    of each round (None when it has none)."""
    firsts: dict[int, Measurement] = {}
    for m in results:
        if m.extra.get("system") == system:
            firsts.setdefault(int(m.extra.get("round", 0)), m)
    if not firsts:
        return None
    rates = [m.throughput for m in firsts.values()]
    p50s = [
        float(next(iter(m.latency.values())).get("p50_ms", 0.0))
        for m in firsts.values()
        if m.latency
    ]
    return statistics.median(rates), (statistics.median(p50s) if p50s else None)


def cluster_ratios(results: list[Measurement], sizes: list[int]) -> list[Ratio]:
    """Each cluster vs the embedded default: throughput and p50, medians over rounds."""
    base = medians(results, "embedded")
    out: list[Ratio] = []
    if base is None:
        return out
    for size in sizes:
        name = system_name(size)
        ours = medians(results, name)
        if ours is None:
            continue
        out.append(
            Ratio(
                f"{name} / embedded, throughput",
                ratio(ours[0], base[0]),
                f"median {ours[0]:,.0f} / {base[0]:,.0f} per second over rounds",
            )
        )
        out.append(
            Ratio(
                f"{name} / embedded, p50",
                ratio(ours[1], base[1]),
                "median p50 of the first latency figure over rounds",
            )
        )
    return out


async def run(
    ctx: Context, group: ProcessGroup, scenario: Callable[[Context], Awaitable[None]]
) -> None:
    """Start every system, run ``scenario`` on each in turn for every round, add ratios."""
    loop = asyncio.get_running_loop()
    args = ctx.args
    systems: list[tuple[int, Endpoints]] = []
    clusters: list[ClusterEndpoints] = []
    try:
        print("nexus-bench: starting the embedded server ...", file=sys.stderr)
        systems.append((0, await loop.run_in_executor(None, lambda: spawn_server(group))))
        for size in args.cluster:
            cluster = await spawn_cluster(group, size)
            clusters.append(cluster)
            systems.append((size, cluster))
        ctx.report.config["server"] = {
            "spawned": True,
            "systems": [system_name(s) for s, _ in systems],
            "etcd_members": {system_name(s): etcd_members(s) for s in args.cluster},
        }
        for rnd in range(1, args.cluster_rounds + 1):
            for size, server in systems:
                if ctx.stopping():
                    return
                first = rnd == 1 and size == 0  # baselines and peers once, not per system
                extras = {"baseline": args.baseline, "before": args.before, "peers": args.peers}
                if not first:
                    extras = {"baseline": False, "before": False, "peers": None}
                sub = dataclasses.replace(
                    ctx,
                    server=server,
                    labels=run_labels(),
                    args=argparse.Namespace(**{**vars(args), **extras}),
                )
                start = len(ctx.report.results)
                await scenario(sub)
                _label(ctx.report.results, start, system_name(size), rnd)
    finally:
        for cluster in clusters:
            for pid in cluster.pids:
                group.stop(pid)
            await loop.run_in_executor(None, cluster.etcd.stop)
    ctx.report.ratios.extend(cluster_ratios(ctx.report.results, args.cluster))
