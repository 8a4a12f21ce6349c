"""``heartbeat``: N simulated nodes stream heartbeats; heartbeats handled per second.

Our figure is the server's own count (``nexus_node_messages_total{kind="heartbeat"}``
over the window; the client's write count when there is no /metrics). The baseline is a
bare grpc.aio bidi echo with the same number of streams, channels and message bytes; its
figure is echoes received per second. Latency: ours is send -> write accepted by gRPC
flow control (the server does not answer heartbeats); the baseline's is the echo round trip.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from typing import Any

from nexus_fast.benchmark.baselines import STREAM_METHOD
from nexus_fast.benchmark.common import Context, NodePool, open_channel
from nexus_fast.benchmark.histogram import LatencyHistogram
from nexus_fast.benchmark.procs import metric_sum, spawn_baseline
from nexus_fast.benchmark.report import Measurement, Ratio, cpu_figure, cpu_ratio, ratio
from nexus_fast.benchmark.runner import HARD_MAX_DURATION, Progress
from nexus_fast.benchmark.workers import (
    RESULT_GRACE,
    ClientWorkers,
    WorkerControl,
    aggregate,
    split,
)
from nexus_fast.node.channel import ClientAuth
from nexus_fast.node.fleet import default_channels
from nexus_fast.pb import fabric_pb2 as pb

HEARTBEAT_METRIC = "nexus_node_messages_total"


def send_interval(args: Any) -> float:
    """Seconds between two heartbeats of one node; 0 = as fast as possible."""
    if args.interval:
        return float(args.interval)
    if args.rate:
        return float(args.nodes) / float(args.rate)
    return 0.0


async def stream_loop(
    index: int,
    n: int,
    interval: float,
    t0: float,
    write: Any,
    hist: LatencyHistogram | None,
    counter: list[int],
    stop: asyncio.Event,
    sent_at: collections.deque[float] | None = None,
) -> None:
    """Write heartbeats on one stream: back to back, or on a fixed per-node timetable."""
    phase = interval * index / n  # spread the nodes evenly over one interval
    k = 0
    perf = time.perf_counter
    while not stop.is_set():
        if interval > 0:
            intended = t0 + phase + k * interval
            delay = intended - perf()
            if delay > 0:
                await asyncio.sleep(delay)
                if stop.is_set():
                    return
            k += 1
        else:
            intended = perf()
        if sent_at is not None:
            sent_at.append(intended)
        await write()
        if hist is not None:
            hist.record(perf() - intended)
        counter[0] += 1
        if counter[0] >= counter[1]:
            stop.set()


async def timed_window(ctx: Context, stop: asyncio.Event, render: Any) -> None:
    """Wait ``--duration`` (or until ``stop`` or Ctrl-C) showing progress, then set ``stop``."""
    progress = Progress(render)
    progress.start()
    with contextlib.suppress(TimeoutError):
        waits = [asyncio.ensure_future(stop.wait())]
        if ctx.stop is not None:
            waits.append(asyncio.ensure_future(ctx.stop.wait()))
        await asyncio.wait(
            waits, timeout=min(ctx.args.duration, HARD_MAX_DURATION), return_when="FIRST_COMPLETED"
        )
        for w in waits:
            w.cancel()
    stop.set()
    await progress.stop()


async def measure_ours(ctx: Context) -> Measurement:
    """Heartbeats handled per second by the server under test."""
    args = ctx.args
    server = ctx.server
    assert server is not None
    pool = NodePool(server.grpc_all, args.nodes, ctx.auth, prefix="hb-", labels=ctx.labels)
    t_reg = time.perf_counter()
    await pool.start()
    reg_s = time.perf_counter() - t_reg
    interval = send_interval(args)
    hist = LatencyHistogram()
    counter = [0, args.count or 1 << 62]
    stop = asyncio.Event()
    m0 = server.metrics()
    hb0 = metric_sum(m0, HEARTBEAT_METRIC, kind="heartbeat") if m0 else 0.0
    cpu0 = server.cpu_seconds()
    c0 = time.process_time()
    t0 = time.perf_counter()
    loops = [
        asyncio.ensure_future(
            stream_loop(i, len(pool.nodes), interval, t0, node.heartbeat, hist, counter, stop)
        )
        for i, node in enumerate(pool.nodes)
    ]
    await timed_window(
        ctx,
        stop,
        lambda t: (
            f"heartbeat  t={t:5.1f}s  sent={counter[0]:,}  {counter[0] / max(t, 1e-9):,.0f}/s"
        ),
    )
    elapsed = time.perf_counter() - t0
    cpu1 = server.cpu_seconds()
    m1 = server.metrics()
    client_cpu = time.process_time() - c0
    for loop in loops:
        loop.cancel()
    await asyncio.gather(*loops, return_exceptions=True)
    errors = sum(1 for node in pool.nodes if node.error)
    await pool.close()
    if m1 is not None and m0 is not None:
        handled = metric_sum(m1, HEARTBEAT_METRIC, kind="heartbeat") - hb0
        source = "server metric nexus_node_messages_total{kind=heartbeat}"
    else:
        handled = counter[0]
        source = "client writes (no /metrics)"
    m = Measurement(
        name=f"heartbeats handled, {args.nodes} nodes",
        throughput=handled / elapsed,
        unit="heartbeats/s",
        count=int(handled),
        duration_s=round(elapsed, 3),
        errors=errors,
        server_cpu=cpu_figure(None if cpu0 is None or cpu1 is None else cpu1 - cpu0, elapsed),
        client_cpu=cpu_figure(client_cpu, elapsed),
        extra={
            "source": source,
            "client_writes": counter[0],
            "register_seconds": round(reg_s, 3),
            "interval_s": interval,
            "message_bytes": len(pool.nodes[0].heartbeat_bytes) if pool.nodes else 0,
        },
    )
    m.add_latency("send->write done", hist)
    return m


class EchoStreams:
    """``n`` bidi streams to a bare echo server, each timing the echo of what it writes.

    The same client code serves the in-process baseline and each ``--client-procs`` worker.
    """

    def __init__(self, target: str, n: int) -> None:
        self.channels = [open_channel(target) for _ in range(default_channels(n))]
        self.message = _baseline_message()
        self.calls: list[Any] = []
        for i in range(n):
            method = self.channels[i % len(self.channels)].stream_stream(
                STREAM_METHOD,
                request_serializer=pb.NodeMessage.SerializeToString,
                response_deserializer=pb.NodeMessage.FromString,
            )
            self.calls.append(method())
        self.hist = LatencyHistogram()
        self.received = 0
        self._queues: list[collections.deque[float]] = [collections.deque() for _ in self.calls]
        self._tasks: list[asyncio.Future[None]] = [
            asyncio.ensure_future(self._read(c, q)) for c, q in zip(self.calls, self._queues)
        ]

    async def _read(self, call: Any, sent_at: collections.deque[float]) -> None:
        perf = time.perf_counter
        while True:
            msg = await call.read()
            if not isinstance(msg, pb.NodeMessage):
                return
            self.hist.record(perf() - sent_at.popleft())  # one stream echoes in order
            self.received += 1

    def start(
        self,
        first: int,
        total: int,
        interval: float,
        t0: float,
        counter: list[int],
        stop: asyncio.Event,
    ) -> None:
        """Write on every stream (stream ``i`` is ``first + i`` of ``total`` for pacing)."""
        message = self.message
        self._tasks += [
            asyncio.ensure_future(
                stream_loop(
                    first + i,
                    total,
                    interval,
                    t0,
                    lambda call=call: call.write(message),
                    None,
                    counter,
                    stop,
                    self._queues[i],
                )
            )
            for i, call in enumerate(self.calls)
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for call in self.calls:
            call.cancel()
        for ch in self.channels:
            await ch.close()


async def measure_baseline(ctx: Context) -> Measurement:
    """The same streams against a bare grpc.aio bidi echo; echoes received per second."""
    args = ctx.args
    base = spawn_baseline(ctx.group, "grpc")
    n = args.nodes
    streams = EchoStreams(base.grpc, n)
    counter = [0, args.count or 1 << 62]
    stop = asyncio.Event()
    cpu0 = base.cpu_seconds()
    c0 = time.process_time()
    t0 = time.perf_counter()
    streams.start(0, n, send_interval(args), t0, counter, stop)
    await timed_window(
        ctx,
        stop,
        lambda t: (
            f"baseline bidi echo  t={t:5.1f}s  echoes={streams.received:,}  "
            f"{streams.received / max(t, 1e-9):,.0f}/s"
        ),
    )
    elapsed = time.perf_counter() - t0
    echoed = streams.received
    cpu1 = base.cpu_seconds()
    client_cpu = time.process_time() - c0
    await streams.close()
    m = Measurement(
        name=f"grpc.aio bidi echo, {n} streams",
        throughput=echoed / elapsed,
        unit="messages/s",
        count=echoed,
        duration_s=round(elapsed, 3),
        server_cpu=cpu_figure(None if cpu0 is None or cpu1 is None else cpu1 - cpu0, elapsed),
        client_cpu=cpu_figure(client_cpu, elapsed),
        extra={"message_bytes": streams.message.ByteSize(), "client_writes": counter[0]},
    )
    m.add_latency("echo round trip", streams.hist)
    return m


def _baseline_message() -> Any:
    return pb.NodeMessage(
        heartbeat=pb.Heartbeat(
            usage=pb.Resources(cpu=1.6, memory=6.8e9, gpu=0.0, disk=2.1e10),
            sent_ms=int(time.time() * 1000),
        )
    )


# ------------------------------------------------- --client-procs K: worker processes


def _worker_specs(ctx: Context, target: str) -> list[dict[str, Any]]:
    """One spec per worker: its share of the nodes (same split for ours and the baseline)."""
    args = ctx.args
    k = args.client_procs
    counts = [n for _, n in split(args.count, k)] if args.count else [0] * k
    return [
        {
            "worker": w,
            "target": target,
            "offset": offset,
            "nodes": n,
            "total": args.nodes,
            "interval": send_interval(args),
            "count": max(1, counts[w]) if args.count else 0,
            "duration": min(args.duration, HARD_MAX_DURATION),
            "auth": ctx.auth.to_dict(),
            "labels": ctx.labels,
        }
        for w, (offset, n) in enumerate(split(args.nodes, k))
    ]


async def worker_ours(spec: dict[str, Any], ctl: WorkerControl) -> dict[str, Any]:
    """In a worker process: this share of the nodes heartbeats the server under test."""
    pool = NodePool(
        spec["target"],
        spec["nodes"],
        ClientAuth.from_dict(spec["auth"]),
        prefix=f"hb-{spec['worker']}-",
        labels=spec["labels"],
    )
    t_reg = time.perf_counter()
    try:
        await pool.start()
        ctl.send(
            ready={
                "register_seconds": round(time.perf_counter() - t_reg, 3),
                "message_bytes": len(pool.nodes[0].heartbeat_bytes) if pool.nodes else 0,
            }
        )
        await ctl.go.wait()
        hist = LatencyHistogram()
        counter = [0, spec["count"] or 1 << 62]
        stop = asyncio.Event()
        c0 = time.process_time()
        t0 = time.perf_counter()
        n, offset = spec["total"], spec["offset"]
        loops = [
            asyncio.ensure_future(
                stream_loop(
                    offset + i, n, spec["interval"], t0, node.heartbeat, hist, counter, stop
                )
            )
            for i, node in enumerate(pool.nodes)
        ]
        progress = ctl.progress_task(lambda: counter[0])
        if not ctl.stop.is_set():
            await ctl.window(spec["duration"], stop)
        stop.set()
        ctl.send(done=True)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - c0
        for task in (*loops, progress):
            task.cancel()
        await asyncio.gather(*loops, progress, return_exceptions=True)
        return {
            "counts": {
                "client_writes": counter[0],
                "errors": sum(1 for node in pool.nodes if node.error),
            },
            "hists": {"send": hist.to_dict()},
            "cpu": cpu,
            "elapsed": elapsed,
        }
    finally:
        await pool.close()


async def worker_baseline(spec: dict[str, Any], ctl: WorkerControl) -> dict[str, Any]:
    """In a worker process: this share of the streams against the bare bidi echo."""
    streams = EchoStreams(spec["target"], spec["nodes"])
    counter = [0, spec["count"] or 1 << 62]
    stop = asyncio.Event()
    try:
        ctl.send(ready={"message_bytes": streams.message.ByteSize()})
        await ctl.go.wait()
        c0 = time.process_time()
        t0 = time.perf_counter()
        streams.start(spec["offset"], spec["total"], spec["interval"], t0, counter, stop)
        progress = ctl.progress_task(lambda: streams.received)
        if not ctl.stop.is_set():
            await ctl.window(spec["duration"], stop)
        stop.set()
        ctl.send(done=True)
        elapsed = time.perf_counter() - t0
        echoed = streams.received
        cpu = time.process_time() - c0
        progress.cancel()
        return {
            "counts": {"echoed": echoed, "client_writes": counter[0]},
            "hists": {"echo": streams.hist.to_dict()},
            "cpu": cpu,
            "elapsed": elapsed,
        }
    finally:
        await streams.close()


async def _run_workers(
    ctx: Context, workers: ClientWorkers, label: str, before: Any, after: Any
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], float, float, Any, Any]:
    """Start, wait ready, snapshot ``before()``, go, collect, snapshot ``after()``."""
    try:
        await workers.start()
        readies = await workers.ready()
        snap0 = before()
        c0 = time.process_time()
        t0 = time.perf_counter()
        workers.send("go")
        progress = Progress(
            lambda t: (
                f"{label}  t={t:5.1f}s  {workers.sent:,}  {workers.sent / max(t, 1e-9):,.0f}/s"
            )
        )
        progress.start()
        try:
            await workers.done(min(ctx.args.duration, HARD_MAX_DURATION) + RESULT_GRACE, ctx.stop)
        finally:
            await progress.stop()
        elapsed = time.perf_counter() - t0  # the window: go .. every worker's window ended
        snap1 = after()
        parent_cpu = time.process_time() - c0
        results = await workers.results(RESULT_GRACE)
    finally:
        await workers.close()
    return readies, results, elapsed, parent_cpu, snap0, snap1


async def measure_ours_procs(ctx: Context) -> Measurement:
    """:func:`measure_ours` with the nodes split over ``--client-procs`` worker processes."""
    args = ctx.args
    server = ctx.server
    assert server is not None
    workers = ClientWorkers(
        ctx.group, "heartbeat-ours", _worker_specs(ctx, server.grpc_all), env=ctx.auth.env()
    )

    def snapshot() -> tuple[dict[str, float] | None, float | None]:
        return server.metrics(), server.cpu_seconds()

    readies, results, elapsed, parent_cpu, (m0, cpu0), (m1, cpu1) = await _run_workers(
        ctx, workers, "heartbeat (workers' writes)", snapshot, snapshot
    )
    agg = aggregate(results)
    writes = agg.counts.get("client_writes", 0)
    if m1 is not None and m0 is not None:
        handled = metric_sum(m1, HEARTBEAT_METRIC, kind="heartbeat") - metric_sum(
            m0, HEARTBEAT_METRIC, kind="heartbeat"
        )
        source = "server metric nexus_node_messages_total{kind=heartbeat}"
    else:
        handled = writes
        source = "client writes (no /metrics)"
    m = Measurement(
        name=f"heartbeats handled, {args.nodes} nodes",
        throughput=handled / elapsed,
        unit="heartbeats/s",
        count=int(handled),
        duration_s=round(elapsed, 3),
        errors=agg.counts.get("errors", 0),
        server_cpu=cpu_figure(None if cpu0 is None or cpu1 is None else cpu1 - cpu0, elapsed),
        client_cpu=cpu_figure(agg.cpu + parent_cpu, elapsed),
        extra={
            "source": source,
            "client_writes": writes,
            "register_seconds": max(r["register_seconds"] for r in readies),
            "interval_s": send_interval(args),
            "message_bytes": readies[0]["message_bytes"],
            "client_procs": args.client_procs,
            "client_cpu_per_proc": agg.cpu_per_proc,
        },
    )
    m.add_latency("send->write done", agg.hists.get("send", LatencyHistogram()))
    return m


async def measure_baseline_procs(ctx: Context) -> Measurement:
    """:func:`measure_baseline` with the same split of the streams over worker processes."""
    args = ctx.args
    base = spawn_baseline(ctx.group, "grpc")
    workers = ClientWorkers(ctx.group, "heartbeat-baseline", _worker_specs(ctx, base.grpc))
    readies, results, elapsed, parent_cpu, cpu0, cpu1 = await _run_workers(
        ctx, workers, "baseline bidi echo (echoes)", base.cpu_seconds, base.cpu_seconds
    )
    agg = aggregate(results)
    echoed = agg.counts.get("echoed", 0)
    m = Measurement(
        name=f"grpc.aio bidi echo, {args.nodes} streams",
        throughput=echoed / elapsed,
        unit="messages/s",
        count=echoed,
        duration_s=round(elapsed, 3),
        server_cpu=cpu_figure(None if cpu0 is None or cpu1 is None else cpu1 - cpu0, elapsed),
        client_cpu=cpu_figure(agg.cpu + parent_cpu, elapsed),
        extra={
            "message_bytes": readies[0]["message_bytes"],
            "client_writes": agg.counts.get("client_writes", 0),
            "client_procs": args.client_procs,
            "client_cpu_per_proc": agg.cpu_per_proc,
        },
    )
    m.add_latency("echo round trip", agg.hists.get("echo", LatencyHistogram()))
    return m


async def run(ctx: Context) -> None:
    """Measure ours, then (``--baseline``) the bidi echo, and their ratio."""
    procs = ctx.args.client_procs > 1
    ours = await (measure_ours_procs(ctx) if procs else measure_ours(ctx))
    ctx.report.results.append(ours)
    if ctx.args.baseline and not ctx.stopping():
        base = await (measure_baseline_procs(ctx) if procs else measure_baseline(ctx))
        ctx.report.baseline.append(base)
        ctx.report.ratios.append(
            Ratio(
                "heartbeats / bidi echo",
                ratio(ours.throughput, base.throughput),
                "heartbeats handled/s / bare grpc.aio bidi echo messages/s (same streams, bytes)",
                ">= 0.8 at 10,000 nodes",
            )
        )
        ctx.report.ratios.append(
            cpu_ratio(
                "heartbeats / bidi echo", ours, base, "the same, when a client sets the rates"
            )
        )
