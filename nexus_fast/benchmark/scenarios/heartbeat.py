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
from nexus_fast.benchmark.report import Measurement, Ratio, cpu_figure, ratio
from nexus_fast.benchmark.runner import HARD_MAX_DURATION, Progress
from nexus_fast.node_proxy import default_channels
from nexus_fast.pb import fabric_pb2 as pb

HEARTBEAT_METRIC = "nexus_node_messages_total"


def send_interval(args: Any) -> float:
    """Seconds between two heartbeats of one node; 0 = as fast as possible."""
    if args.interval:
        return float(args.interval)
    if args.rate:
        return args.nodes / float(args.rate)
    return 0.0


async def _stream_loop(
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


async def _window(ctx: Context, stop: asyncio.Event, render: Any) -> None:
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
    pool = NodePool(server.grpc, args.nodes, args, prefix="hb-")
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
            _stream_loop(i, len(pool.nodes), interval, t0, node.heartbeat, hist, counter, stop)
        )
        for i, node in enumerate(pool.nodes)
    ]
    await _window(
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


async def measure_baseline(ctx: Context) -> Measurement:
    """The same streams against a bare grpc.aio bidi echo; echoes received per second."""
    args = ctx.args
    base = spawn_baseline(ctx.group, "grpc")
    n = args.nodes
    channels = [open_channel(base.grpc) for _ in range(default_channels(n))]
    message = pb.NodeMessage(
        heartbeat=pb.Heartbeat(
            usage=pb.Resources(cpu=1.6, memory=6.8e9, gpu=0.0, disk=2.1e10),
            sent_ms=int(time.time() * 1000),
        )
    )
    calls = []
    for i in range(n):
        method = channels[i % len(channels)].stream_stream(
            STREAM_METHOD,
            request_serializer=pb.NodeMessage.SerializeToString,
            response_deserializer=pb.NodeMessage.FromString,
        )
        calls.append(method())
    hist = LatencyHistogram()
    received = [0]
    counter = [0, args.count or 1 << 62]
    stop = asyncio.Event()
    interval = send_interval(args)
    queues: list[collections.deque[float]] = [collections.deque() for _ in calls]

    async def reader(call: Any, sent_at: collections.deque[float]) -> None:
        perf = time.perf_counter
        while True:
            msg = await call.read()
            if not isinstance(msg, pb.NodeMessage):
                return
            hist.record(perf() - sent_at.popleft())  # one stream echoes in order
            received[0] += 1

    readers = [asyncio.ensure_future(reader(c, q)) for c, q in zip(calls, queues)]
    cpu0 = base.cpu_seconds()
    c0 = time.process_time()
    t0 = time.perf_counter()
    loops = [
        asyncio.ensure_future(
            _stream_loop(
                i,
                n,
                interval,
                t0,
                lambda call=call: call.write(message),
                None,
                counter,
                stop,
                queues[i],
            )
        )
        for i, call in enumerate(calls)
    ]
    await _window(
        ctx,
        stop,
        lambda t: (
            f"baseline bidi echo  t={t:5.1f}s  echoes={received[0]:,}  {received[0] / max(t, 1e-9):,.0f}/s"
        ),
    )
    elapsed = time.perf_counter() - t0
    echoed = received[0]
    cpu1 = base.cpu_seconds()
    client_cpu = time.process_time() - c0
    for task in (*loops, *readers):
        task.cancel()
    await asyncio.gather(*loops, *readers, return_exceptions=True)
    for call in calls:
        call.cancel()
    for ch in channels:
        await ch.close()
    m = Measurement(
        name=f"grpc.aio bidi echo, {n} streams",
        throughput=echoed / elapsed,
        unit="messages/s",
        count=echoed,
        duration_s=round(elapsed, 3),
        server_cpu=cpu_figure(None if cpu0 is None or cpu1 is None else cpu1 - cpu0, elapsed),
        client_cpu=cpu_figure(client_cpu, elapsed),
        extra={"message_bytes": message.ByteSize(), "client_writes": counter[0]},
    )
    m.add_latency("echo round trip", hist)
    return m


async def run(ctx: Context) -> None:
    """Measure ours, then (``--baseline``) the bidi echo, and their ratio."""
    ours = await measure_ours(ctx)
    ctx.report.results.append(ours)
    if ctx.args.baseline and not ctx.stopping():
        base = await measure_baseline(ctx)
        ctx.report.baseline.append(base)
        ctx.report.ratios.append(
            Ratio(
                "heartbeats / bidi echo",
                ratio(ours.throughput, base.throughput),
                "heartbeats handled/s / bare grpc.aio bidi echo messages/s (same streams, bytes)",
                ">= 0.8 at 10,000 nodes",
            )
        )
