"""``events``: event fan-out to M WebSocket subscribers (and gRPC ``WatchEvents`` watchers).

Events come from real activity: a dispatch load (batches of commands to simulated nodes,
as in the ``dispatch`` scenario) runs for the window while every subscriber counts what it
receives. Latency is event ``time_ms`` (set when the change is made, before the commit) ->
receive, on the wall clock of this machine (1 ms resolution), sampled on every tenth
subscriber. The baseline is a bare picows server broadcasting a frame of ours (the one
closest to our mean events per frame, re-stamped each time) to the same number of
subscribers, as fast as their sockets take it, read by the same client code.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any

import orjson

from nexus_fast.benchmark.common import Context, NodePool, keep_alive, open_channel
from nexus_fast.benchmark.histogram import LatencyHistogram
from nexus_fast.benchmark.procs import metric_sum, spawn_baseline
from nexus_fast.benchmark.report import Measurement, Ratio, cpu_figure, ratio
from nexus_fast.benchmark.runner import HARD_MAX_DURATION, Progress
from nexus_fast.benchmark.scenarios.dispatch import DispatchLoad
from nexus_fast.benchmark.workers import (
    RESULT_GRACE,
    ClientWorkers,
    WorkerControl,
    aggregate,
    split,
)
from nexus_fast.node.channel import ClientAuth
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

EVENTS_PREFIX = b'{"type":"events"'
EVENT_MARK = b'{"index":'  # every event object starts with its index (orjson keeps order)
SAMPLE_EVERY = 10  # subscribers that parse frames for latency
KEEP_FRAMES = 200
TAIL_S = 0.5  # after the load stops, events still in flight may arrive


class FanoutStats:
    """Counters shared by all subscribers of one transport."""

    def __init__(self) -> None:
        self.events = 0
        self.frames = 0
        self.subscribed = 0
        self.done = 0
        self.closed = 0
        self.first = 0.0
        self.last = 0.0
        self.hist = LatencyHistogram()
        self.frames_kept: list[bytes] = []
        self.all_subscribed = asyncio.Event()
        self.all_done = asyncio.Event()
        self.expected = 0


def make_listener(stats: FanoutStats, sample: bool, keep: bool) -> Any:
    """A picows client listener that counts events (and samples latency)."""
    from picows import WSListener, WSMsgType

    class Subscriber(WSListener):
        def on_ws_frame(self, transport: Any, frame: Any) -> None:
            if frame.msg_type != WSMsgType.TEXT:
                return
            data = frame.get_payload_as_bytes()
            if data.startswith(EVENTS_PREFIX):
                now = time.time()
                stats.events += data.count(EVENT_MARK)
                stats.frames += 1
                if not stats.first:
                    stats.first = time.perf_counter()
                stats.last = time.perf_counter()
                if sample:
                    record = stats.hist.record_ns
                    for ev in orjson.loads(data)["events"]:
                        record(int((now - ev["time_ms"] / 1000.0) * 1e9))
                if keep and len(stats.frames_kept) < KEEP_FRAMES:
                    stats.frames_kept.append(data)
            elif data.startswith(b'{"type":"subscribed"'):
                stats.subscribed += 1
                if stats.subscribed >= stats.expected:
                    stats.all_subscribed.set()
            elif data.startswith(b'{"type":"done"'):
                stats.done += 1
                if stats.done >= stats.expected:
                    stats.all_done.set()

        def on_ws_disconnected(self, transport: Any) -> None:
            stats.closed += 1

    return Subscriber


async def connect_subscribers(
    url: str, m: int, stats: FanoutStats, first: int = 0, auth: ClientAuth | None = None
) -> list[Any]:
    """Open ``m`` WebSocket connections to ``url`` and subscribe each to every topic.

    ``first``: global index of the first one (a worker's share): every tenth global index
    samples latency, index 0 keeps frames. ``auth``: its token goes in the upgrade's
    ``Authorization`` header; its TLS files verify a ``wss://`` server (and identify us).
    """
    from picows import WSMsgType, ws_connect

    auth = auth or ClientAuth()
    headers = auth.http_headers()
    ssl_context = auth.ssl_context() if url.startswith("wss:") else None
    stats.expected = m
    transports = []
    for i in range(first, first + m):
        listener = make_listener(stats, i % SAMPLE_EVERY == 0, i == 0)
        transport, _ = await ws_connect(
            listener,
            url,
            max_frame_size=64 * 1024 * 1024,
            extra_headers=headers,
            ssl_context=ssl_context,
        )
        transports.append(transport)
    for i, transport in enumerate(transports, first):
        transport.send(WSMsgType.TEXT, orjson.dumps({"op": "subscribe", "id": i}))
    await asyncio.wait_for(stats.all_subscribed.wait(), 30)
    return transports


async def _watch(stub: Any, stats: FanoutStats, stop: asyncio.Event) -> None:
    call = stub.WatchEvents(pb.WatchEventsRequest())
    stats.subscribed += 1
    try:
        async for batch in call:
            if not batch.events:
                continue
            now = time.time()
            stats.events += len(batch.events)
            stats.frames += 1
            if not stats.first:
                stats.first = time.perf_counter()
            stats.last = time.perf_counter()
            record = stats.hist.record_ns
            for ev in batch.events:
                record(int((now - ev.time_ms / 1000.0) * 1e9))
            if stop.is_set():
                break
    finally:
        call.cancel()


async def measure_ours(ctx: Context) -> tuple[list[Measurement], bytes]:
    """Delivered events per second over WebSocket and gRPC while a dispatch load runs."""
    args = ctx.args
    server = ctx.server
    assert server is not None
    if not server.ws:
        raise ValueError("the events scenario needs the WebSocket URL (--ws) of the target")
    ws_url = server.ws.rstrip("/") + (
        "" if server.ws.rstrip("/").endswith("/v1/events") else "/v1/events"
    )
    channel = open_channel(server.grpc, ctx.auth)
    control = pb_grpc.ControlServiceStub(channel)
    load = DispatchLoad(ctx, channel, final_every=0, targets=server.targets)
    pool = NodePool(
        server.grpc_all,
        args.nodes,
        ctx.auth,
        prefix="ev-",
        on_commands=load.on_commands,
        labels=ctx.labels,
    )
    await pool.start()
    ws = FanoutStats()
    k = args.client_procs
    workers: ClientWorkers | None = None
    transports: list[Any] = []
    if k > 1:
        workers = _subscriber_workers(ctx, ws_url, "ours")
        await workers.start()
        await workers.ready()
    else:
        transports = await connect_subscribers(ws_url, args.subscribers, ws, auth=ctx.auth)
    grpc_stats = FanoutStats()
    watch_stop = asyncio.Event()
    watchers = [
        asyncio.ensure_future(_watch(control, grpc_stats, watch_stop)) for _ in range(args.watchers)
    ]
    hb_stop = asyncio.Event()
    beats = asyncio.ensure_future(keep_alive(pool, hb_stop))
    await asyncio.sleep(0.3)  # node registrations' events drain before the window opens
    if workers is not None:
        workers.send("go")  # each worker resets its counters, as below
    ws.events = ws.frames = grpc_stats.events = grpc_stats.frames = 0
    ws.hist, grpc_stats.hist = LatencyHistogram(), LatencyHistogram()
    m0 = server.metrics()
    cpu0 = server.cpu_seconds()
    c0 = time.process_time()
    t0 = time.perf_counter()

    def delivered() -> int:
        return workers.sent if workers is not None else ws.events

    progress = Progress(
        lambda t: (
            f"events  t={t:5.1f}s  commands={load.received:,}  ws delivered={delivered():,} "
            f"({delivered() / max(t, 1e-9):,.0f}/s)  grpc delivered={grpc_stats.events:,}"
        )
    )
    progress.start()
    try:
        result = await load.drive()
        await asyncio.sleep(TAIL_S)
        elapsed = time.perf_counter() - t0
        cpu1 = server.cpu_seconds()
        m1 = server.metrics()
        client_cpu = time.process_time() - c0
        dropped = ws.closed  # before we close them ourselves
        if workers is not None:
            workers.send("stop")
            agg = aggregate(await workers.results(RESULT_GRACE))
            ws.events = agg.counts.get("events", 0)
            ws.frames = agg.counts.get("frames", 0)
            dropped = agg.counts.get("closed", 0)
            ws.hist = agg.hists.get("recv", LatencyHistogram())
            client_cpu += agg.cpu
    finally:
        await progress.stop()
        if workers is not None:
            await workers.close()
        watch_stop.set()
        hb_stop.set()
        for w in watchers:
            w.cancel()
        await asyncio.gather(beats, *watchers, return_exceptions=True)
        for transport in transports:
            transport.disconnect()
        await pool.close()
        await load.close()
        await channel.close()
    published = None
    if m0 is not None and m1 is not None:
        published = metric_sum(m1, "nexus_events_published_total") - metric_sum(
            m0, "nexus_events_published_total"
        )
    server_cpu = cpu_figure(None if cpu0 is None or cpu1 is None else cpu1 - cpu0, elapsed)
    common = {
        "published": published,
        "published_per_s": round(published / elapsed, 1) if published is not None else None,
        "commands": load.received,
        "commands_per_s": round(load.received / elapsed, 1),
    }
    if load.targets is not None:
        common["submit_retries"] = load.retries  # UNAVAILABLE -> same keys, next target
    out = []
    frame_bytes_mean = (
        round(sum(map(len, ws.frames_kept)) / len(ws.frames_kept)) if ws.frames_kept else 0
    )
    template = b""
    if ws.frames_kept:  # the baseline broadcasts a frame of ours of typical size
        mean = ws.events / max(ws.frames, 1)
        template = min(ws.frames_kept, key=lambda f: abs(f.count(EVENT_MARK) - mean))
    procs_extra: dict[str, Any] = {}
    if workers is not None:
        kept = next((x for x in agg.extras if x.get("template")), {})  # worker 0's frames
        template = kept.get("template", "").encode()
        frame_bytes_mean = kept.get("frame_bytes_mean", 0)
        procs_extra = {"client_procs": k, "client_cpu_per_proc": agg.cpu_per_proc}
    mws = Measurement(
        name=f"ws events delivered, {args.subscribers} subs",
        throughput=ws.events / elapsed,
        unit="events/s",
        count=ws.events,
        duration_s=round(elapsed, 3),
        errors=result.errors + dropped,
        server_cpu=server_cpu,
        client_cpu=cpu_figure(client_cpu, elapsed),
        extra={
            **common,
            "frames": ws.frames,
            "events_per_frame": round(ws.events / ws.frames, 2) if ws.frames else 0,
            "frame_bytes_mean": frame_bytes_mean,
            **procs_extra,
        },
    )
    mws.add_latency("event time->recv", ws.hist)
    out.append(mws)
    if args.watchers:
        mg = Measurement(
            name=f"grpc events delivered, {args.watchers} watchers",
            throughput=grpc_stats.events / elapsed,
            unit="events/s",
            count=grpc_stats.events,
            duration_s=round(elapsed, 3),
            server_cpu=server_cpu,
            extra={**common, "batches": grpc_stats.frames},
        )
        mg.add_latency("event time->recv", grpc_stats.hist)
        out.append(mg)
    return out, template


async def measure_baseline(ctx: Context, template: bytes) -> Measurement:
    """A bare picows broadcast of our frame to the same number of subscribers."""
    args = ctx.args
    frame_file = ctx.group.tempdir("nexus-bench-frame-") / "frame.json"
    frame_file.write_bytes(template or b'{"type":"events","events":[{"index":0,"time_ms":0}]}')
    base = spawn_baseline(
        ctx.group,
        "picows",
        "--subscribers",
        str(args.subscribers),
        "--frame",
        str(frame_file),
        "--duration",
        str(args.duration),
    )
    assert base.ws is not None
    if args.client_procs > 1:
        return await _measure_baseline_procs(ctx, base, template)
    stats = FanoutStats()
    cpu0 = base.cpu_seconds()
    c0 = time.process_time()
    transports = await connect_subscribers(base.ws + "/v1/events", args.subscribers, stats)
    progress = Progress(
        lambda t: (
            f"baseline picows broadcast  t={t:5.1f}s  delivered={stats.events:,} ({stats.events / max(t, 1e-9):,.0f}/s)"
        )
    )
    progress.start()
    try:
        with contextlib.suppress(TimeoutError):
            stop_wait = [asyncio.ensure_future(stats.all_done.wait())]
            if ctx.stop is not None:
                stop_wait.append(asyncio.ensure_future(ctx.stop.wait()))
            await asyncio.wait(stop_wait, timeout=args.duration + 10, return_when="FIRST_COMPLETED")
            for w in stop_wait:
                w.cancel()
    finally:
        await progress.stop()
        for transport in transports:
            transport.disconnect()
    elapsed = max(stats.last - stats.first, 1e-9)
    cpu1 = base.cpu_seconds()
    m = Measurement(
        name=f"picows broadcast, {args.subscribers} subs",
        throughput=stats.events / elapsed,
        unit="events/s",
        count=stats.events,
        duration_s=round(elapsed, 3),
        errors=0,
        server_cpu=cpu_figure(None if cpu0 is None or cpu1 is None else cpu1 - cpu0, elapsed),
        client_cpu=cpu_figure(time.process_time() - c0, elapsed),
        extra={
            "frames": stats.frames,
            "frame_bytes": len(template),
            "events_per_frame": round(stats.events / stats.frames, 2) if stats.frames else 0,
        },
    )
    m.add_latency("event time->recv", stats.hist)
    return m


# ------------------------------------------------- --client-procs K: worker processes


def _subscriber_workers(ctx: Context, url: str, mode: str) -> ClientWorkers:
    """The subscribers split over ``--client-procs`` workers (the same split for both)."""
    args = ctx.args
    specs = [
        {
            "url": url,
            "mode": mode,
            "first": first,
            "subscribers": m,
            "duration": min(args.duration, HARD_MAX_DURATION),
            "auth": (ctx.auth if mode == "ours" else ClientAuth()).to_dict(),
        }
        for first, m in split(args.subscribers, args.client_procs)
    ]
    env = ctx.auth.env() if mode == "ours" else {}
    return ClientWorkers(ctx.group, "events-subscribers", specs, env=env)


async def worker_subscribers(spec: dict[str, Any], ctl: WorkerControl) -> dict[str, Any]:
    """In a worker process: this share of the WebSocket subscribers counts what arrives.

    ``ours``: counters reset at ``go``, the window ends at ``stop`` (the parent runs the
    command load), bounded by the duration plus grace. ``baseline``: until the broadcast
    sends ``done`` (after its duration) or ``stop``.
    """
    stats = FanoutStats()
    keep = spec["first"] == 0
    auth = ClientAuth.from_dict(spec.get("auth"))
    transports = await connect_subscribers(
        spec["url"], spec["subscribers"], stats, spec["first"], auth
    )
    progress: asyncio.Task[None] | None = None
    try:
        ctl.send(ready={})
        c0 = time.process_time()
        if spec["mode"] == "ours":
            await ctl.go.wait()
            stats.events = stats.frames = 0
            stats.hist = LatencyHistogram()
            c0 = time.process_time()
            progress = ctl.progress_task(lambda: stats.events)
            await ctl.window(spec["duration"] + RESULT_GRACE)
        else:
            progress = ctl.progress_task(lambda: stats.events)
            await ctl.window(spec["duration"] + 10, stats.all_done)
        cpu = time.process_time() - c0
        progress.cancel()
        extra: dict[str, Any] = {}
        if keep and stats.frames_kept:
            mean = stats.events / max(stats.frames, 1)
            frame = min(stats.frames_kept, key=lambda f: abs(f.count(EVENT_MARK) - mean))
            extra = {
                "template": frame.decode(),
                "frame_bytes_mean": round(
                    sum(map(len, stats.frames_kept)) / len(stats.frames_kept)
                ),
            }
        return {
            "counts": {"events": stats.events, "frames": stats.frames, "closed": stats.closed},
            "hists": {"recv": stats.hist.to_dict()},
            "cpu": cpu,
            "first": stats.first or None,
            "last": stats.last or None,
            "extra": extra,
        }
    finally:
        if progress is not None:
            progress.cancel()
        for transport in transports:
            transport.disconnect()


async def _measure_baseline_procs(ctx: Context, base: Any, template: bytes) -> Measurement:
    """:func:`measure_baseline` with the subscribers split over worker processes."""
    args = ctx.args
    workers = _subscriber_workers(ctx, base.ws + "/v1/events", "baseline")
    cpu0 = base.cpu_seconds()
    c0 = time.process_time()
    progress = Progress(
        lambda t: (
            f"baseline picows broadcast  t={t:5.1f}s  delivered={workers.sent:,} "
            f"({workers.sent / max(t, 1e-9):,.0f}/s)"
        )
    )
    try:
        await workers.start()
        progress.start()
        results = await workers.results(args.duration + 10 + RESULT_GRACE, ctx.stop)
    finally:
        await progress.stop()
        await workers.close()
    cpu1 = base.cpu_seconds()
    agg = aggregate(results)
    events = agg.counts.get("events", 0)
    frames = agg.counts.get("frames", 0)
    # first..last receive over every worker (perf_counter is one clock for all processes)
    elapsed = max((agg.last or 0.0) - (agg.first or 0.0), 1e-9)
    m = Measurement(
        name=f"picows broadcast, {args.subscribers} subs",
        throughput=events / elapsed,
        unit="events/s",
        count=events,
        duration_s=round(elapsed, 3),
        errors=0,
        server_cpu=cpu_figure(None if cpu0 is None or cpu1 is None else cpu1 - cpu0, elapsed),
        client_cpu=cpu_figure(agg.cpu + time.process_time() - c0, elapsed),
        extra={
            "frames": frames,
            "frame_bytes": len(template),
            "events_per_frame": round(events / frames, 2) if frames else 0,
            "client_procs": args.client_procs,
            "client_cpu_per_proc": agg.cpu_per_proc,
        },
    )
    m.add_latency("event time->recv", agg.hists.get("recv", LatencyHistogram()))
    return m


async def run(ctx: Context) -> None:
    """Measure ours, then (``--baseline``) the picows broadcast, and the ratio."""
    ours, template = await measure_ours(ctx)
    ctx.report.results.extend(ours)
    if ctx.args.baseline and not ctx.stopping():
        base = await measure_baseline(ctx, template)
        ctx.report.baseline.append(base)
        ctx.report.ratios.append(
            Ratio(
                "ws delivered / picows broadcast",
                ratio(ours[0].throughput, base.throughput),
                "ws events delivered/s / bare picows broadcast events delivered/s (same subscribers, frame)",
                ">= 0.8 at 100 subscribers",
            )
        )
        published = ours[0].extra.get("published_per_s")
        if published:
            ctx.report.notes.append(
                f"our server published {published:,.0f} events/s from the command load; the "
                f"fan-out ceiling is reached only if published x subscribers approaches the "
                "baseline's rate (otherwise the load generator, not the fan-out, is the limit)"
            )
