"""``roundtrip``: one command (or ``--concurrency``) in flight, submit -> node -> final.

The node is the reference proxy itself: a ``nexus-node --nodes 1 --exec-duration 0``
child process with this run's label, which every command selects. One round trip is one
``SubmitCommands`` with ``wait_ms`` (submit and wait: the reply carries the final,
durable record), timed from the call to the reply with the command ``SUCCEEDED``.

``--before`` also measures, in the same run, the path as it was before issue 11: the
proxy holding every send 2 ms (``--coalesce-hold 0.002``) and the round trip as two RPCs,
``SubmitCommands`` then ``WaitCommands``; and the two-RPC path with today's proxy, which
separates the two levers.

Baselines: ``--baseline`` a bare grpc.aio unary echo of the same request bytes at the same
concurrency, and one synced LMDB commit on the same filesystem (a round trip waits for two:
the submission's and the final state's); ``--peers ray,celery`` the same no-op round trip on Ray (task and actor) and
Celery + Redis (see :mod:`nexus_fast.benchmark.peers`). Ratios are ours over theirs.

Where the time goes: the server's own histograms (``/metrics``) give, per command, the mean
submit -> dispatch to the node and submit -> final (in memory), and the server-side time
of the ``SubmitCommands`` call; the rest of the client's round trip is the gRPC hop and
the client.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from typing import Final

from nexus_fast.benchmark import peers as peer_runs
from nexus_fast.benchmark.baselines import UNARY_METHOD
from nexus_fast.benchmark.common import RPC_TIMEOUT, Context, open_channel
from nexus_fast.benchmark.histogram import LatencyHistogram
from nexus_fast.benchmark.procs import BenchError, metric_sum, spawn_baseline
from nexus_fast.benchmark.report import Measurement, Ratio, cpu_figure, ratio
from nexus_fast.benchmark.runner import Progress, drive
from nexus_fast.node.channel import ClientAuth
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

WAIT_MS: Final = 30_000  # the server's cap: a round trip never ends by the wait running out
NODE_READY_TIMEOUT: Final = 30.0
BEFORE_HOLD_S: Final = 0.002  # nexus-node's COALESCE_S before issue 11
SUCCEEDED: Final = pb.COMMAND_STATE_SUCCEEDED
_SERVER_HISTOGRAMS: Final = {
    "submit->dispatch (server)": "nexus_command_submit_to_dispatch_seconds",
    "submit->final in memory (server)": "nexus_command_submit_to_final_seconds",
}
_SUBMIT_RPC: Final = "nexus_grpc_request_duration_seconds"


def _auth_argv(auth: ClientAuth) -> list[str]:
    argv: list[str] = []
    for flag, value in (
        ("--tls-ca", auth.tls_ca),
        ("--tls-cert", auth.tls_cert),
        ("--tls-key", auth.tls_key),
        ("--tls-server-name", auth.tls_server_name),
        ("--node-token-secret", auth.node_token_secret),
    ):
        if value:
            argv += [flag, value]
    return argv


async def start_proxy(ctx: Context, hold_s: float, tag: str) -> tuple[int, dict[str, str]]:
    """A one-node ``nexus-node`` with its own run label; (pid, the label) once it is READY."""
    assert ctx.server is not None
    labels = {**ctx.labels, "nexus-bench-roundtrip": tag}
    argv = [
        sys.executable,
        "-m",
        "nexus_fast.node",
        "--target",
        ctx.server.grpc_all,  # replicas: the node spreads and fails over by itself
        "--nodes",
        "1",
        "--id-prefix",
        f"rt-{ctx.labels['nexus-bench-run']}-{tag}-",
        "--labels",
        ",".join(f"{k}={v}" for k, v in labels.items()),
        "--exec-duration",
        "0",
        "--coalesce-hold",
        str(hold_s),
        "--ramp",
        "0",
        "--status-interval",
        "0",
        "--log-level",
        "warning",
        *_auth_argv(ctx.auth),
    ]
    proc = ctx.group.start(argv, log_name=f"nexus-node-{tag}", env={**os.environ, **ctx.auth.env()})
    channel = open_channel(ctx.server.grpc, ctx.auth)
    control = pb_grpc.ControlServiceStub(channel)
    deadline = time.monotonic() + NODE_READY_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                raise BenchError(
                    f"nexus-node exited with {proc.returncode}:\n{ctx.group.log_tail(proc)}"
                )
            listed = await control.ListNodes(
                pb.ListNodesRequest(label_selector=labels), timeout=RPC_TIMEOUT
            )
            if any(n.status == pb.NODE_STATUS_READY and n.connected for n in listed.nodes):
                return proc.pid, labels
            if time.monotonic() > deadline:
                raise BenchError(f"nexus-node not ready after {NODE_READY_TIMEOUT:.0f}s")
            await asyncio.sleep(0.05)
    finally:
        await channel.close()


def _request(labels: dict[str, str], wait_ms: int) -> pb.SubmitCommandsRequest:
    spec = pb.CommandSpec(
        kind="bench.noop", payload=b"x" * 16, placement=pb.Placement(label_selector=labels)
    )
    return pb.SubmitCommandsRequest(commands=[spec], wait_ms=wait_ms)


def _server_means(m0: dict[str, float] | None, m1: dict[str, float] | None) -> dict[str, float]:
    """Mean ms per command of the server's histograms over the window (from /metrics)."""
    if m0 is None or m1 is None:
        return {}
    out: dict[str, float] = {}
    wanted = {**_SERVER_HISTOGRAMS, "SubmitCommands call (server)": _SUBMIT_RPC}
    for label, name in wanted.items():
        kw = {"method": "ControlService/SubmitCommands"} if name == _SUBMIT_RPC else {}
        n = metric_sum(m1, f"{name}_count", **kw) - metric_sum(m0, f"{name}_count", **kw)
        s = metric_sum(m1, f"{name}_sum", **kw) - metric_sum(m0, f"{name}_sum", **kw)
        if n > 0:
            out[label] = round(s / n * 1000, 3)
    return out


async def measure_ours(ctx: Context, *, name: str, hold_s: float, one_rpc: bool) -> Measurement:
    """Round trips through the server and a ``nexus-node`` (hold ``hold_s``)."""
    args = ctx.args
    server = ctx.server
    assert server is not None
    pid, labels = await start_proxy(ctx, hold_s, "before" if hold_s else "now")
    channel = open_channel(server.grpc, ctx.auth)
    control = pb_grpc.ControlServiceStub(channel)
    request = _request(labels, WAIT_MS if one_rpc else 0)
    hist = LatencyHistogram()
    done = [0]

    async def round_trip() -> None:
        if one_rpc:
            reply = await control.SubmitCommands(request, timeout=RPC_TIMEOUT + WAIT_MS / 1000)
            if not reply.final or reply.final[0].state != SUCCEEDED:
                raise RuntimeError(f"not succeeded in the reply: {reply.results[0]}")
            return
        reply = await control.SubmitCommands(request, timeout=RPC_TIMEOUT)
        wait = pb.WaitCommandsRequest(ids=[reply.results[0].id], timeout_ms=WAIT_MS)
        async for record in control.WaitCommands(wait, timeout=RPC_TIMEOUT + WAIT_MS / 1000):
            if record.state != SUCCEEDED:
                raise RuntimeError(f"ended {record.state}: {record.reason}")

    async def op(intended: float) -> None:
        await round_trip()
        hist.record(time.perf_counter() - intended)
        done[0] += 1

    progress = Progress(lambda t: f"roundtrip {name}  t={t:5.1f}s  {done[0]:,} round trips")
    try:
        for _ in range(args.warmup):
            await round_trip()
        m0 = server.metrics()
        cpu0 = server.cpu_seconds()
        progress.start()
        result = await drive(
            op,
            duration=args.duration,
            concurrency=args.concurrency,
            max_ops=args.count,
            stop=ctx.stop,
        )
        cpu1 = server.cpu_seconds()
        m1 = server.metrics()
    finally:
        await progress.stop()
        await channel.close()
        ctx.group.stop(pid)
    m = Measurement(
        name=name,
        throughput=done[0] / max(result.elapsed, 1e-9),
        unit="round trips/s",
        count=done[0],
        duration_s=round(result.elapsed, 3),
        errors=result.errors,
        server_cpu=cpu_figure(
            None if cpu0 is None or cpu1 is None else cpu1 - cpu0, result.elapsed
        ),
        extra={
            "concurrency": args.concurrency,
            "node_hold_ms": hold_s * 1000,
            "rpcs_per_round_trip": 1 if one_rpc else 2,
            "server_mean_ms": _server_means(m0, m1),
        },
    )
    if result.last_error:
        m.extra["last_error"] = result.last_error
    m.add_latency("round trip", hist)
    return m


def _synced_commits(path: str, count: int) -> LatencyHistogram:
    """``count`` LMDB write txns of one put each, ``sync=True`` (one fsync each): the cost
    of one durable commit on this filesystem right now, which a round trip pays twice."""
    import lmdb

    env = lmdb.open(path, map_size=1 << 26, sync=True, metasync=True)
    hist = LatencyHistogram()
    try:
        for i in range(count):
            t0 = time.perf_counter()
            with env.begin(write=True) as txn:
                txn.put(b"k%08d" % i, b"v" * 256)
            hist.record(time.perf_counter() - t0)
    finally:
        env.close()
    return hist


async def measure_commit(ctx: Context) -> Measurement:
    """One synced LMDB commit, same filesystem as the spawned server's data, this run."""
    count = min(ctx.args.count or 500, 2000)
    path = str(ctx.group.tempdir("nexus-bench-fsync-"))
    loop = asyncio.get_running_loop()
    t0 = time.perf_counter()
    hist = await loop.run_in_executor(None, _synced_commits, path, count)
    elapsed = time.perf_counter() - t0
    m = Measurement(
        name="LMDB synced commit (1 put, 1 fsync)",
        throughput=count / max(elapsed, 1e-9),
        unit="commits/s",
        count=count,
        duration_s=round(elapsed, 3),
    )
    m.add_latency("round trip", hist)
    return m


def where_the_time_goes(m: Measurement) -> str | None:
    """A one-line split of our mean round trip into hops, from the server's histograms."""
    means = m.extra.get("server_mean_ms") or {}
    total = m.latency.get("round trip", {}).get("mean_ms")
    keys = ("submit->dispatch (server)", "submit->final in memory (server)")
    call = means.get("SubmitCommands call (server)")
    if total is None or call is None or not all(k in means for k in keys):
        return None
    dispatch, final = (float(means[k]) for k in keys)
    return (
        f"where the time goes ({m.name}, means): submit (validate, place, commit) -> sent "
        f"to the node {dispatch:.2f} ms; node hop (stream, nexus-node, ack+result back) "
        f"{final - dispatch:.2f} ms; final state durable (commit) -> reply "
        f"{float(call) - final:.2f} ms; gRPC and client {float(total) - float(call):.2f} ms "
        f"(round trip {float(total):.2f} ms)"
    )


async def measure_echo(ctx: Context) -> Measurement:
    """The same request bytes through a bare grpc.aio unary echo, same concurrency."""
    args = ctx.args
    base = spawn_baseline(ctx.group, "grpc")
    channel = open_channel(base.grpc)
    echo = channel.unary_unary(UNARY_METHOD)
    payload = _request(ctx.labels, WAIT_MS).SerializeToString()
    hist = LatencyHistogram()
    done = [0]

    async def op(intended: float) -> None:
        await echo(payload, timeout=RPC_TIMEOUT)
        hist.record(time.perf_counter() - intended)
        done[0] += 1

    try:
        for _ in range(args.warmup):
            await echo(payload, timeout=RPC_TIMEOUT)
        result = await drive(
            op,
            duration=args.duration,
            concurrency=args.concurrency,
            max_ops=args.count,
            stop=ctx.stop,
        )
    finally:
        await channel.close()
        if base.pid is not None:
            ctx.group.stop(base.pid)
    m = Measurement(
        name="grpc.aio unary echo",
        throughput=done[0] / max(result.elapsed, 1e-9),
        unit="rpc/s",
        count=done[0],
        duration_s=round(result.elapsed, 3),
        errors=result.errors,
        extra={"concurrency": args.concurrency, "request_bytes": len(payload)},
    )
    m.add_latency("round trip", hist)
    return m


def _pct(m: Measurement, key: str) -> float | None:
    value = m.latency.get("round trip", {}).get(key)
    return float(value) if value else None


def _latency_ratio(name: str, ours: Measurement, base: Measurement, key: str, target: str) -> Ratio:
    a, b = _pct(ours, key), _pct(base, key)
    return Ratio(name, ratio(a, b), f"{a} ms / {b} ms ({base.name})", target)


async def run(ctx: Context) -> None:
    """Ours (submit and wait), then --before, --baseline and --peers, and the ratios."""
    args = ctx.args
    report = ctx.report
    ours = await measure_ours(
        ctx, name="nexus_fast: SubmitCommands(wait_ms)", hold_s=0.0, one_rpc=True
    )
    report.results.append(ours)
    split = where_the_time_goes(ours)
    if split:
        report.notes.append(split)
    if args.before and not ctx.stopping():
        two = await measure_ours(
            ctx, name="nexus_fast: Submit then WaitCommands", hold_s=0.0, one_rpc=False
        )
        before = await measure_ours(
            ctx,
            name="before: 2 ms node hold, Submit then Wait",
            hold_s=BEFORE_HOLD_S,
            one_rpc=False,
        )
        report.baseline += [two, before]
        for key in ("p50_ms", "p99_ms"):
            report.ratios.append(
                _latency_ratio(f"{key[:-3]} now / before", ours, before, key, "< 1")
            )
        report.ratios.append(_latency_ratio("p50 one RPC / Submit+Wait", ours, two, "p50_ms", ""))
    if args.baseline and not ctx.stopping():
        echo = await measure_echo(ctx)
        report.baseline.append(echo)
        report.ratios.append(_latency_ratio("p50 round trip / p50 echo", ours, echo, "p50_ms", ""))
        report.ratios.append(_latency_ratio("p99 round trip / p99 echo", ours, echo, "p99_ms", ""))
        commit = await measure_commit(ctx)
        report.baseline.append(commit)
        report.ratios.append(
            _latency_ratio("p50 round trip / p50 synced commit", ours, commit, "p50_ms", "")
        )
    for peer in args.peers or ():
        if ctx.stopping():
            break
        print(f"nexus-bench: measuring {peer} ...", file=sys.stderr)
        rows = await peer_runs.measure(
            ctx.group,
            peer,
            "roundtrip",
            count=args.peer_count or args.count or 2000,
            concurrency=args.concurrency,
            warmup=args.warmup,
        )
        report.baseline += rows
        for row in rows:
            task = row.name.startswith("Ray task")
            if peer == "ray":
                target50, target99 = ("<= 0.8", "<= 1") if task else ("", "")
            else:
                target50, target99 = "<= 1", ""
            short = "Ray task" if task else ("Ray actor" if peer == "ray" else "Celery")
            report.ratios.append(
                _latency_ratio(f"p50 / {short} p50", ours, row, "p50_ms", target50)
            )
            report.ratios.append(
                _latency_ratio(f"p99 / {short} p99", ours, row, "p99_ms", target99)
            )
