"""``relay``: the leader's CPU per node message a follower relays, next to a direct one.

Issue 12's relay (nexus_fast/cluster/relay.py): a follower holds node streams and carries
their messages to the leader over ONE ``ReplicaService.Relay`` stream, in batches. This
scenario starts one etcd member and three cluster-mode replicas (real processes on free
loopback ports, as ``--cluster`` does), finds the leader (the pid in its leader key),
connects ``--nodes`` simulated nodes (the ``heartbeat`` scenario's nodes) to the two
followers ONLY and drives heartbeats at ``--rate`` for ``--duration`` seconds, reading every
process's CPU from /proc before and after. In the same run, round by round, the same nodes
and rate go to the embedded server (each heartbeat on the server's own stream) and to a
bare grpc.aio bidi echo (same streams and message bytes).

Per-message figures (``extra["us_per_message"]``, CPU microseconds):

- leader: its CPU / relayed heartbeats it handled (its ``nexus_node_messages_total
  {kind="heartbeat"}`` increase): ``r`` in docs/performance.md;
- each follower: its CPU / frames it relayed (``nexus_relay_up_batch_frames`` sum
  increase), and frames per RelayUp (sum / count increase): the batching behind ``r``;
- embedded: its CPU / heartbeats handled: ``h``; echo: its CPU / messages echoed back;
- etcd: CPU over the window only (heartbeats never reach etcd: leases and watches).

A process's CPU counts everything it did in the window. What it spends idle (nodes
connected and silent, measured just before) is reported as ``idle_cpu_percent``. Ratios
are medians over ``--rounds``.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from nexus_fast.benchmark.clustercost import PREFIX, ClusterEndpoints, spawn_cluster
from nexus_fast.benchmark.common import Context, NodePool
from nexus_fast.benchmark.histogram import LatencyHistogram
from nexus_fast.benchmark.procs import (
    BenchError,
    Endpoints,
    metric_sum,
    proc_cpu_seconds,
    spawn_baseline,
    spawn_server,
)
from nexus_fast.benchmark.report import Measurement, Ratio, cpu_figure, ratio
from nexus_fast.benchmark.scenarios.heartbeat import (
    HEARTBEAT_METRIC,
    EchoStreams,
    send_interval,
    stream_loop,
    timed_window,
)

REPLICAS = 3
ETCD_MEMBERS = 1
FRAMES_METRIC = "nexus_relay_up_batch_frames"
SESSIONS_METRIC = "nexus_relay_sessions"  # the leader's relayed sessions
STREAMS_METRIC = "nexus_grpc_connections_active"  # the embedded server's node streams
READY_TIMEOUT = 60.0  # seconds for every node's session to be open before measuring
IDLE_SECONDS = 2.0


@dataclass
class Watched:
    """One process a phase reads: its CPU from /proc, and /metrics when ``server`` is set."""

    role: str
    pid: int | None
    server: Endpoints | None = None

    def snapshot(self) -> tuple[float | None, dict[str, float] | None]:
        cpu = proc_cpu_seconds(self.pid) if self.pid is not None else None
        return cpu, (self.server.metrics() if self.server is not None else None)


Snapshot = dict[str, tuple[float | None, dict[str, float] | None]]


async def _snapshots(watched: list[Watched]) -> Snapshot:
    loop = asyncio.get_running_loop()
    taken = await asyncio.gather(*(loop.run_in_executor(None, w.snapshot) for w in watched))
    return {w.role: s for w, s in zip(watched, taken, strict=True)}


@dataclass
class Window:
    """What one measured window produced, per process role."""

    elapsed: float
    client_cpu: float
    writes: int
    before: Snapshot
    after: Snapshot
    idle_percent: dict[str, float | None] = field(default_factory=dict)

    def cpu(self, role: str) -> float | None:
        (a, _), (b, _) = self.before[role], self.after[role]
        return None if a is None or b is None else b - a

    def delta(self, role: str, name: str, **labels: str) -> float | None:
        (_, a), (_, b) = self.before[role], self.after[role]
        if a is None or b is None:
            return None
        return metric_sum(b, name, **labels) - metric_sum(a, name, **labels)


def _cpu_percent(before: Snapshot, after: Snapshot, role: str, wall: float) -> float | None:
    a, b = before[role][0], after[role][0]
    return None if a is None or b is None or wall <= 0 else round(100.0 * (b - a) / wall, 1)


async def _measure(
    ctx: Context,
    watched: list[Watched],
    start: Callable[[float, list[int], asyncio.Event], list[asyncio.Future[None]]],
    render: Callable[[float, int], str],
) -> Window:
    """Idle CPU first, then the load ``start`` begins for ``--duration`` seconds."""
    idle0 = await _snapshots(watched)
    t_idle = time.perf_counter()
    await asyncio.sleep(IDLE_SECONDS)
    idle1 = await _snapshots(watched)
    idle_wall = time.perf_counter() - t_idle
    idle = {w.role: _cpu_percent(idle0, idle1, w.role, idle_wall) for w in watched}
    counter = [0, 1 << 62]
    stop = asyncio.Event()
    before = await _snapshots(watched)
    c0 = time.process_time()
    t0 = time.perf_counter()
    tasks = start(t0, counter, stop)
    try:
        await timed_window(ctx, stop, lambda t: render(t, counter[0]))
        elapsed = time.perf_counter() - t0
        after = await _snapshots(watched)
        client_cpu = time.process_time() - c0
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return Window(elapsed, client_cpu, counter[0], before, after, idle)


async def _wait_open(server: Endpoints, metric: str, n: int) -> None:
    """Wait until ``server``'s ``metric`` reaches ``n`` (every node's session open)."""
    loop = asyncio.get_running_loop()
    deadline = time.monotonic() + READY_TIMEOUT
    value = 0.0
    while time.monotonic() < deadline:
        metrics = await loop.run_in_executor(None, server.metrics)
        value = metric_sum(metrics, metric) if metrics else 0.0
        if value >= n:
            return
        await asyncio.sleep(0.2)
    raise BenchError(f"{metric} stayed at {value:g} of {n} nodes for {READY_TIMEOUT:.0f}s")


async def _nodes_phase(
    ctx: Context, target: str, watched: list[Watched], ready: tuple[Endpoints, str], tag: str
) -> tuple[Window, int, LatencyHistogram]:
    """``--nodes`` nodes on ``target`` heartbeat at ``--rate``; (window, errors, latency)."""
    args = ctx.args
    pool = NodePool(target, args.nodes, ctx.auth, prefix=f"relay-{tag}-", labels=ctx.labels)
    hist = LatencyHistogram()
    interval = send_interval(args)
    n = args.nodes
    try:
        await pool.start()
        await _wait_open(*ready, n)

        def start(t0: float, counter: list[int], stop: asyncio.Event) -> list[Any]:
            return [
                asyncio.ensure_future(
                    stream_loop(i, n, interval, t0, node.heartbeat, hist, counter, stop)
                )
                for i, node in enumerate(pool.nodes)
            ]

        window = await _measure(
            ctx, watched, start, lambda t, c: f"relay {tag}  t={t:5.1f}s  heartbeats sent={c:,}"
        )
        return window, sum(1 for node in pool.nodes if node.error), hist
    finally:
        await pool.close()


async def _echo_phase(ctx: Context, echo: Endpoints) -> Window:
    """The same streams, rate and bytes against the bare bidi echo."""
    args = ctx.args
    streams = EchoStreams(echo.grpc, args.nodes)
    interval = send_interval(args)

    def start(t0: float, counter: list[int], stop: asyncio.Event) -> list[Any]:
        streams.start(0, args.nodes, interval, t0, counter, stop)
        return []

    try:
        window = await _measure(
            ctx,
            [Watched("echo", echo.pid)],
            start,
            lambda t, c: f"relay echo  t={t:5.1f}s  written={c:,}  echoed={streams.received:,}",
        )
        window.writes = streams.received
        return window
    finally:
        await streams.close()


def _per_message(cpu: float | None, count: float | None) -> float | None:
    """CPU microseconds per message (None without a count or a CPU reading)."""
    if cpu is None or not count:
        return None
    return round(1e6 * cpu / count, 2)


def _measurement(
    name: str, count: float, cpu: float | None, w: Window, role: str, **extra: Any
) -> Measurement:
    return Measurement(
        name=name,
        throughput=count / w.elapsed if w.elapsed > 0 else 0.0,
        unit="messages/s",
        count=int(count),
        duration_s=round(w.elapsed, 3),
        server_cpu=cpu_figure(cpu, w.elapsed),
        client_cpu=cpu_figure(w.client_cpu, w.elapsed),
        extra={
            "role": role,
            "us_per_message": _per_message(cpu, count),
            "idle_cpu_percent": w.idle_percent.get(role),
            "client_writes": w.writes,
            **extra,
        },
    )


async def _leader(cluster: ClusterEndpoints) -> tuple[Endpoints, list[Endpoints]]:
    """The replica whose pid the leader key holds, and the others (the followers)."""
    from nexus_fast.cluster.etcd import EtcdClient

    client = EtcdClient(cluster.etcd.endpoints, timeout=5.0)
    try:
        await client.connect()
        kv = await client.get(PREFIX.encode() + b"/leader")
    finally:
        await client.close()
    pid = int(json.loads(kv.value)["pid"]) if kv is not None else None
    leaders = [r for r in cluster.replicas if r.pid == pid]
    if len(leaders) != 1:
        raise BenchError(f"the leader key names pid {pid}, none of the replicas started here")
    return leaders[0], [r for r in cluster.replicas if r.pid != pid]


@dataclass
class _Systems:
    embedded: Endpoints
    echo: Endpoints
    cluster: ClusterEndpoints
    leader: Endpoints
    followers: list[Endpoints]


async def _round(ctx: Context, s: _Systems, rnd: int) -> dict[str, float | None]:
    """One round: embedded, 3 replicas (nodes on the followers), echo; returns us/message."""
    report = ctx.report
    tag = f"round {rnd}"
    # Embedded: every heartbeat arrives on the server's own stream.
    emb = Watched("embedded", s.embedded.pid, s.embedded)
    w, errors, hist = await _nodes_phase(
        ctx, s.embedded.grpc, [emb], (s.embedded, STREAMS_METRIC), "embedded"
    )
    handled = w.delta("embedded", HEARTBEAT_METRIC, kind="heartbeat") or 0.0
    m = _measurement(
        f"embedded: heartbeats handled [{tag}]", handled, w.cpu("embedded"), w, "embedded"
    )
    m.errors = errors
    m.add_latency("send->write done", hist)
    report.baseline.append(m)
    h = m.extra["us_per_message"]
    # 3 replicas: the nodes on the two followers only; the leader sees relayed messages.
    watched = [Watched("leader", s.leader.pid, s.leader)]
    watched += [Watched(f"follower {i + 1}", f.pid, f) for i, f in enumerate(s.followers)]
    etcd_pids = [s.cluster.etcd.pid(i) for i in range(s.cluster.etcd.members)]
    watched += [Watched(f"etcd {i + 1}", pid) for i, pid in enumerate(etcd_pids)]
    targets = ",".join(f.grpc for f in s.followers)
    w, errors, hist = await _nodes_phase(
        ctx, targets, watched, (s.leader, SESSIONS_METRIC), "followers"
    )
    relayed = w.delta("leader", HEARTBEAT_METRIC, kind="heartbeat") or 0.0
    etcd_cpu = [w.cpu(x.role) for x in watched if x.role.startswith("etcd")]
    lead = _measurement(
        f"leader: relayed heartbeats handled [{tag}]",
        relayed,
        w.cpu("leader"),
        w,
        "leader",
        etcd_cpu_seconds=[None if c is None else round(c, 3) for c in etcd_cpu],
    )
    lead.errors = errors
    lead.add_latency("send->write done", hist)
    report.results.append(lead)
    r = lead.extra["us_per_message"]
    follower_us: list[float] = []
    batches: list[float] = []
    for i in range(len(s.followers)):
        role = f"follower {i + 1}"
        frames = w.delta(role, FRAMES_METRIC + "_sum") or 0.0
        ups = w.delta(role, FRAMES_METRIC + "_count") or 0.0
        fm = _measurement(
            f"{role}: heartbeats received and relayed [{tag}]",
            frames,
            w.cpu(role),
            w,
            role,
            relay_ups=int(ups),
            frames_per_relay_up=round(frames / ups, 2) if ups else None,
        )
        report.results.append(fm)
        if fm.extra["us_per_message"] is not None:
            follower_us.append(fm.extra["us_per_message"])
        if ups:
            batches.append(frames / ups)
    # The bare bidi echo: the gRPC floor of one message in and one out.
    w = await _echo_phase(ctx, s.echo)
    em = _measurement(
        f"grpc.aio bidi echo: messages echoed [{tag}]", w.writes, w.cpu("echo"), w, "echo"
    )
    report.baseline.append(em)
    figures = {
        "r": r,
        "h": h,
        "follower": statistics.mean(follower_us) if follower_us else None,
        "frames_per_relay_up": statistics.mean(batches) if batches else None,
        "echo": em.extra["us_per_message"],
    }
    report.notes.append(
        f"{tag}: CPU us per message: leader per relayed heartbeat r = {_us(r)}, "
        f"embedded per heartbeat h = {_us(h)}, follower per heartbeat relayed = "
        f"{_us(figures['follower'])}, echo per message = {_us(figures['echo'])}; "
        f"{_us(figures['frames_per_relay_up'])} frames per RelayUp"
    )
    return figures


def _us(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f}"


def _median(rounds: list[dict[str, float | None]], key: str) -> float | None:
    values = [v for f in rounds if (v := f.get(key)) is not None]
    return statistics.median(values) if values else None


async def _start(ctx: Context) -> _Systems:
    loop = asyncio.get_running_loop()
    group = ctx.group
    print("nexus-bench: starting the embedded server and the echo ...", file=sys.stderr)
    embedded = await loop.run_in_executor(None, lambda: spawn_server(group))
    echo = await loop.run_in_executor(None, lambda: spawn_baseline(group, "grpc"))
    cluster = await spawn_cluster(group, REPLICAS, ETCD_MEMBERS)
    try:
        leader, followers = await _leader(cluster)
    except BaseException:
        await _stop_cluster(ctx, cluster)
        raise
    return _Systems(embedded, echo, cluster, leader, followers)


async def _stop_cluster(ctx: Context, cluster: ClusterEndpoints) -> None:
    for pid in cluster.pids:
        ctx.group.stop(pid)
    await asyncio.get_running_loop().run_in_executor(None, cluster.etcd.stop)


async def run(ctx: Context) -> None:
    """Start the three systems, measure ``--rounds`` rounds interleaved, add the ratios."""
    args = ctx.args
    systems = await _start(ctx)
    rounds: list[dict[str, float | None]] = []
    try:
        ctx.report.config["server"] = {
            "spawned": True,
            "systems": ["embedded", f"{REPLICAS} replicas", "grpc.aio bidi echo"],
            "etcd_members": ETCD_MEMBERS,
            "nodes_on": "the two followers only",
        }
        for rnd in range(1, args.rounds + 1):
            if ctx.stopping():
                break
            rounds.append(await _round(ctx, systems, rnd))
            pid = (await _leader(systems.cluster))[0].pid
            if pid != systems.leader.pid:
                ctx.report.notes.append(f"round {rnd}: the leader changed; its figures mix two")
    finally:
        await _stop_cluster(ctx, systems.cluster)
    r, h = _median(rounds, "r"), _median(rounds, "h")
    follower, echo = _median(rounds, "follower"), _median(rounds, "echo")
    ctx.report.ratios += [
        Ratio(
            "leader per relayed / embedded per direct",
            ratio(r, h),
            f"r / h: median {_us(r)} / {_us(h)} us of server CPU per heartbeat",
        ),
        Ratio(
            "follower per relayed / embedded per direct",
            ratio(follower, h),
            f"median {_us(follower)} / {_us(h)} us per heartbeat (follower: receive + relay)",
        ),
        Ratio(
            "leader per relayed / echo per message",
            ratio(r, echo),
            f"median {_us(r)} / {_us(echo)} us (echo: one message in, one out)",
        ),
    ]
