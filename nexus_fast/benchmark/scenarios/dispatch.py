"""``dispatch``: end to end. Submit batches -> place -> dispatch -> node ack+result -> final.

Each operation is one ``SubmitCommands`` of ``--batch-size`` commands placed by the
scheduler (no target node) on this run's own nodes: every node registers with the label
``nexus-bench-run=<random>`` and every command selects it, so other nodes of the server
(a ``nexus-node`` fleet, an earlier run) never receive them. Command ids are client idempotency keys, so the submit time
of every command is known before the reply; every command's payload also carries its
submit time (``perf_counter`` in ns, see :func:`stamp_payload`). The simulated nodes
note when each command arrives and answer at once with ack + success in one message.
They run in this process, or with ``--client-procs K`` split over K worker processes
(role ``dispatch-nodes``) that time each arrival from the stamp in the payload
(``perf_counter`` is CLOCK_MONOTONIC, one clock for every process), so no per-command
message crosses processes. Submits, ``WaitCommands`` sampling and the baseline stay here.

Figures: commands completed per second (the node sent the result; the server's
``nexus_commands_processed_total`` must agree at the end), latency submit -> node
receives (every command), submit -> reply, and submit -> final (sampled with
``WaitCommands`` on one command of every ``--final-every``-th batch). The baseline is a
bare grpc.aio unary echo of the same request bytes at the same concurrency (or rate).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grpc

from nexus_fast.benchmark import peers
from nexus_fast.benchmark.baselines import UNARY_METHOD
from nexus_fast.benchmark.common import (
    RPC_TIMEOUT,
    BenchNode,
    Context,
    NodePool,
    keep_alive,
    open_channel,
)
from nexus_fast.benchmark.histogram import LatencyHistogram
from nexus_fast.benchmark.procs import metric_sum, spawn_baseline
from nexus_fast.benchmark.report import Measurement, Ratio, cpu_figure, cpu_ratio, ratio
from nexus_fast.benchmark.runner import (
    DRAIN_TIMEOUT,
    HARD_MAX_DURATION,
    DriveResult,
    Progress,
    drive,
)
from nexus_fast.benchmark.workers import (
    RESULT_GRACE,
    Aggregate,
    ClientWorkers,
    WorkerControl,
    aggregate,
    split,
)
from nexus_fast.node.channel import ClientAuth
from nexus_fast.node.targets import TargetList, fails_over, leader_hint
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

PROCESSED = "nexus_commands_processed_total"
SUBMIT_METHOD = "/nexus.fabric.v1.ControlService/SubmitCommands"


KEY_DIGITS = 9
PAYLOAD_SIZE = 32  # bytes of every command's payload (it was b"x" * 32 before the stamp)
STAMP = b"t="  # the payload: STAMP, the submit time in ns (STAMP_DIGITS digits), padding
STAMP_DIGITS = 20  # perf_counter_ns fits in 19 digits for 300 years of uptime
_STAMP_END = len(STAMP) + STAMP_DIGITS
_STAMP_PAD = b"x" * (PAYLOAD_SIZE - _STAMP_END)


def stamp_payload(submit_ns: int) -> bytes:
    """The :data:`PAYLOAD_SIZE` payload bytes carrying the submit time ``submit_ns``.

    ``submit_ns`` is ``perf_counter`` in ns (CLOCK_MONOTONIC on Linux: the same clock in
    every process of the machine), so a node in another process times ``recv - submit``.
    """
    return STAMP + b"%0*d" % (STAMP_DIGITS, max(0, submit_ns)) + _STAMP_PAD


def payload_stamp(payload: bytes) -> int | None:
    """The submit time (ns) :func:`stamp_payload` put in ``payload``; None if it has none."""
    if len(payload) < _STAMP_END or not payload.startswith(STAMP):
        return None
    digits = payload[len(STAMP) : _STAMP_END]
    return int(digits) if digits.isdigit() else None


def build_batch(
    prefix: str,
    first: int,
    size: int,
    submit_ns: int = 0,
    selector: Mapping[str, str] | None = None,
) -> pb.SubmitCommandsRequest:
    """A batch of ``size`` scheduler-placed commands with ids ``prefix-first..`` (reference).

    ``selector``: labels a node must carry to be chosen (the run's own nodes).
    """
    return pb.SubmitCommandsRequest(
        commands=[
            pb.CommandSpec(
                idempotency_key=f"{prefix}-{first + i:0{KEY_DIGITS}d}",
                kind="bench.noop",
                payload=stamp_payload(submit_ns),
                placement=pb.Placement(
                    label_selector=selector or {}, request=pb.Resources(cpu=0.001)
                ),
            )
            for i in range(size)
        ]
    )


class BatchEncoder:
    """Serialized ``SubmitCommandsRequest`` bytes, equal to :func:`build_batch`'s, made fast.

    Every command differs only in its fixed-width id and (per batch) its fixed-width
    payload, so one spec is encoded once and both are spliced in: the client then costs
    microseconds per batch, and both our server and the echo baseline are measured at
    their limit rather than at the client's.
    """

    def __init__(self, prefix: str, size: int, selector: Mapping[str, str] | None = None) -> None:
        self.prefix = prefix
        self.size = size
        marker = b"#" * (len(prefix) + 1 + KEY_DIGITS)
        payload_marker = b"~" * PAYLOAD_SIZE
        one = build_batch("", 0, 1, 0, selector).commands[0]
        one.idempotency_key = marker.decode()
        one.payload = payload_marker
        spec = pb.SubmitCommandsRequest(commands=[one]).SerializeToString()
        # The id (field 1) is serialized before the payload (field 3), the placement
        # (field 5, with the selector) after both: it stays in the constant tail.
        head, _, rest = spec.partition(marker)
        mid, _, tail = rest.partition(payload_marker)
        self.head = head
        self.mid = mid
        self.tail = tail

    def encode(self, first: int, submit_ns: int = 0) -> tuple[bytes, list[str]]:
        """The request bytes for ids ``first .. first+size-1`` submitted at ``submit_ns``."""
        ids = [f"{self.prefix}-{first + i:0{KEY_DIGITS}d}" for i in range(self.size)]
        head = self.head
        rest = self.mid + stamp_payload(submit_ns) + self.tail
        return b"".join([head + cid.encode() + rest for cid in ids]), ids


def op_mode(args: Any) -> str:
    """Human description of the load shape."""
    if args.rate:
        return f"fixed rate {args.rate:g} batches/s"
    return f"closed loop, concurrency {args.concurrency}"


class DispatchLoad:
    """Submits batches and tracks every command until its node got it (and answered)."""

    def __init__(
        self, ctx: Context, channel: Any, *, final_every: int, targets: Sequence[str] = ()
    ) -> None:
        self.ctx = ctx
        self.control = pb_grpc.ControlServiceStub(channel)
        # Raw bytes both ways: the reply is not parsed (the echo baseline does the same).
        self.submit_raw = channel.unary_unary(SUBMIT_METHOD)
        # Several replicas (--target a,b): a submit answered UNAVAILABLE goes again, the
        # same bytes (so the same idempotency keys: never a second command), to the next.
        self.targets = TargetList(targets) if len(targets) > 1 else None
        self._submits: dict[str, Any] = {targets[0]: self.submit_raw} if self.targets else {}
        self._extra_channels: list[Any] = []
        self.retries = 0
        self.batch = ctx.args.batch_size
        self.prefix = f"b{os.getpid()}-{int(time.time() * 1000) % 10_000_000:07d}"
        self.encoder = BatchEncoder(self.prefix, self.batch, ctx.labels)
        self.next_id = 0
        self.submitted_at: dict[str, float] = {}
        self.recv = LatencyHistogram()
        self.reply = LatencyHistogram()
        self.final = LatencyHistogram()
        self.submitted = 0
        self.received = 0
        self.completed_at = 0.0
        self.failed_commands = 0
        self.final_every = final_every
        self.batches = 0
        self.waiters: set[asyncio.Future[None]] = set()
        self.all_received = asyncio.Event()
        self.window_over = False

    def on_commands(self, node: BenchNode, commands: Any, now: float) -> None:
        """Node hook: latency submit -> node receives, for every command."""
        pop = self.submitted_at.pop  # a redelivered command is timed once
        record = self.recv.record_ns
        n = 0
        for c in commands:
            t = pop(c.id, None)
            if t is not None:
                record(int((now - t) * 1e9))
                n += 1
        self.received += n
        self.completed_at = now
        if self.window_over and self.received >= self.submitted:
            self.all_received.set()

    async def drive(self) -> DriveResult:
        """Submit batches for the window, closed loop or at ``--rate`` (see ``runner.drive``)."""
        args = self.ctx.args
        return await drive(
            self.submit,
            duration=args.duration,
            concurrency=args.concurrency,
            rate=args.rate,
            max_ops=-(-args.count // args.batch_size) if args.count else None,
            stop=self.ctx.stop,
        )

    async def submit(self, intended: float) -> None:
        """One SubmitCommands of a fresh batch (the drive's operation)."""
        first = self.next_id
        self.next_id += self.batch
        request, ids = self.encoder.encode(first, int(intended * 1e9))
        for cid in ids:
            self.submitted_at[cid] = intended
        try:
            await self._submit(request)
        except grpc.aio.AioRpcError:
            for cid in ids:
                self.submitted_at.pop(cid, None)
            self.failed_commands += len(ids)
            raise
        self.reply.record(time.perf_counter() - intended)
        self.submitted += len(ids)
        self.batches += 1
        if self.final_every and self.batches % self.final_every == 0:
            waiter = asyncio.ensure_future(self._wait_final(ids[-1], intended))
            self.waiters.add(waiter)
            waiter.add_done_callback(self.waiters.discard)

    async def _submit(self, request: bytes) -> None:
        """One SubmitCommands; with several targets, again on the next one (or the leader
        the server names) while they answer UNAVAILABLE, at most two passes over them."""
        targets = self.targets
        if targets is None:
            await self.submit_raw(request, timeout=RPC_TIMEOUT)
            return
        tries = 0
        while True:
            target = targets.current
            submit = self._submits.get(target)
            if submit is None:
                channel = open_channel(target, self.ctx.auth)
                self._extra_channels.append(channel)
                submit = self._submits[target] = channel.unary_unary(SUBMIT_METHOD)
            try:
                await submit(request, timeout=RPC_TIMEOUT)
            except grpc.aio.AioRpcError as err:
                tries += 1
                if not fails_over(err.code()) or tries > 2 * len(targets.targets):
                    raise
                self.retries += 1
                await asyncio.sleep(targets.next(leader_hint(err.trailing_metadata())))
                continue
            targets.ok()
            return

    async def close(self) -> None:
        """Close the channels opened to other targets."""
        for channel in self._extra_channels:
            await channel.close()

    async def _wait_final(self, cid: str, intended: float) -> None:
        with contextlib.suppress(grpc.aio.AioRpcError):
            async for record in self.control.WaitCommands(
                pb.WaitCommandsRequest(ids=[cid], timeout_ms=int(DRAIN_TIMEOUT * 1000)),
                timeout=DRAIN_TIMEOUT + 5,
            ):
                if record.state == pb.COMMAND_STATE_SUCCEEDED:
                    self.final.record(time.perf_counter() - intended)


async def measure_ours(ctx: Context) -> Measurement:
    """Commands completed per second through the real server.

    The nodes run in this process, or (``--client-procs K``) in K worker processes; the
    submits, the ``WaitCommands`` samples and every figure but the node side stay here.
    """
    args = ctx.args
    server = ctx.server
    assert server is not None
    channel = open_channel(server.grpc, ctx.auth)
    load = DispatchLoad(ctx, channel, final_every=args.final_every, targets=server.targets)
    workers: ClientWorkers | None = None
    pool: NodePool | None = None
    agg: Aggregate | None = None
    if args.client_procs > 1:
        specs = _node_specs(ctx, server.grpc_all, load.prefix)
        workers = ClientWorkers(ctx.group, "dispatch-nodes", specs, env=ctx.auth.env())
    else:
        pool = NodePool(
            server.grpc_all,
            args.nodes,
            ctx.auth,
            prefix="dp-",
            on_commands=load.on_commands,
            labels=ctx.labels,
        )
    hb_stop = asyncio.Event()
    beats: asyncio.Future[None] | None = None
    progress: Progress | None = None

    def received() -> int:  # live: the workers' last progress figures
        return workers.sent if workers is not None else load.received

    try:
        if workers is not None:
            await workers.start()
            await workers.ready()  # every worker registered and connected its nodes
        else:
            assert pool is not None
            await pool.start()
        await asyncio.sleep(0.2)  # let the scheduler see every node's first heartbeat
        if pool is not None:
            beats = asyncio.ensure_future(keep_alive(pool, hb_stop))
        m0 = server.metrics()
        cpu0 = server.cpu_seconds()
        c0 = time.process_time()
        if workers is not None:
            workers.send("go")  # they only time stamped commands of this run: no reset race
        t0 = time.perf_counter()
        progress = Progress(
            lambda t: (
                f"dispatch  t={t:5.1f}s  submitted={load.submitted:,}  "
                f"received={received():,}  {received() / max(t, 1e-9):,.0f} cmd/s"
            )
        )
        progress.start()
        result = await load.drive()
        # Let every command that was accepted reach its node (bounded).
        load.window_over = True
        if workers is not None:
            # progress figures come every 0.5 s: this may end that much after the last
            # arrival, which is harmless (elapsed ends at the workers' last arrival)
            await _until(lambda: workers.sent >= load.submitted, DRAIN_TIMEOUT)
        elif load.received < load.submitted:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(load.all_received.wait(), DRAIN_TIMEOUT)
        end = max(load.completed_at, t0 + result.elapsed)
        cpu1 = server.cpu_seconds()
        client_cpu = time.process_time() - c0
        if load.waiters:
            await asyncio.wait(list(load.waiters), timeout=DRAIN_TIMEOUT)
        await asyncio.sleep(0.3)  # results in flight reach the server before we count
        m1 = server.metrics()
        if workers is not None:
            workers.send("stop")  # after the count: their nodes stay connected until here
            agg = aggregate(await workers.results(RESULT_GRACE, ctx.stop))
            # first submit .. last arrival (perf_counter: one clock for every process)
            end = max(agg.last or 0.0, t0 + result.elapsed)
            client_cpu += agg.cpu
        elapsed = end - t0
    finally:
        if progress is not None:
            await progress.stop()
        if workers is not None:
            await workers.close()
        hb_stop.set()
        if beats is not None:
            await asyncio.gather(beats, return_exceptions=True)
        if pool is not None:
            await pool.close()
        await load.close()
        await channel.close()
    n_received = load.received if agg is None else agg.counts.get("received", 0)
    lost = load.submitted - n_received
    extra: dict[str, Any] = {
        "mode": op_mode(args),
        "batch_size": args.batch_size,
        "nodes": args.nodes,
        "submitted": load.submitted,
        "received_by_nodes": n_received,
        "submit_rpcs": load.batches,
        "submit_rpc_per_s": round(load.batches / max(result.elapsed, 1e-9), 1),
    }
    if load.targets is not None:
        extra["targets"] = load.targets.targets
        extra["submit_retries"] = load.retries  # UNAVAILABLE -> same keys, next target
        if pool is not None:
            extra["node_register_retries"] = pool.register_retries
        if load.retries:
            ctx.report.notes.append(
                f"dispatch: {load.retries} submits retried on another target after "
                "UNAVAILABLE (same idempotency keys: no command submitted twice)"
            )
    if agg is not None:
        extra["client_procs"] = args.client_procs
        extra["client_cpu_per_proc"] = agg.cpu_per_proc
        extra["redelivered"] = agg.counts.get("redelivered", 0)
        extra["node_stream_errors"] = agg.counts.get("node_errors", 0)
    server_failed = 0
    if m0 is not None and m1 is not None:
        done = {
            s: metric_sum(m1, PROCESSED, status=s) - metric_sum(m0, PROCESSED, status=s)
            for s in ("succeeded", "failed", "timed_out", "cancelled")
        }
        extra["server_final_states"] = done
        server_failed = int(done["failed"] + done["timed_out"] + done["cancelled"])
    if result.last_error:
        extra["last_error"] = result.last_error
    m = Measurement(
        name=f"commands end to end, batch {args.batch_size}",
        throughput=n_received / elapsed if elapsed > 0 else 0.0,
        unit="commands/s",
        count=n_received,
        duration_s=round(elapsed, 3),
        errors=load.failed_commands + max(0, lost) + server_failed,
        server_cpu=cpu_figure(None if cpu0 is None or cpu1 is None else cpu1 - cpu0, elapsed),
        client_cpu=cpu_figure(client_cpu, elapsed),
        extra=extra,
    )
    recv = load.recv if agg is None else agg.hists.get("recv", LatencyHistogram())
    m.add_latency("submit->node recv", recv)
    m.add_latency("submit->reply", load.reply)
    m.add_latency("submit->final (smpl)", load.final)
    return m


async def _until(cond: Callable[[], bool], timeout: float, every: float = 0.05) -> None:
    """Poll ``cond()`` until true or ``timeout`` seconds passed (the in-process drain's
    bound; like it, Ctrl-C does not cut it short: a second Ctrl-C does)."""
    deadline = time.perf_counter() + timeout
    while not cond() and time.perf_counter() < deadline:
        await asyncio.sleep(every)


# ------------------------------------------------- --client-procs K: worker processes


def _node_specs(ctx: Context, target: str, prefix: str) -> list[dict[str, Any]]:
    """One spec per worker: its share of the nodes and this run's command id prefix."""
    args = ctx.args
    # The parent ends the window with stop after the drive, its drain and the final
    # samples; this bound only matters if the parent never does.
    bound = min(args.duration, HARD_MAX_DURATION) + 3 * DRAIN_TIMEOUT + RESULT_GRACE
    return [
        {
            "worker": w,
            "target": target,
            "offset": offset,
            "nodes": n,
            "prefix": prefix,
            "duration": bound,
            "auth": ctx.auth.to_dict(),
            "labels": ctx.labels,
        }
        for w, (offset, n) in enumerate(split(args.nodes, args.client_procs))
    ]


class ArrivalClock:
    """Node hook in a worker: latency submit -> node receives from each command's stamp.

    Only commands of this run count (ids starting with ``prefix``, a stamped payload).
    A command is counted and timed on its first attempt; a later attempt (another node,
    perhaps in another worker, after a failure) counts as redelivered and is not timed
    again, as the in-process nodes time a command once.
    """

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.recv = LatencyHistogram()
        self.received = 0
        self.redelivered = 0
        self.first = 0.0
        self.last = 0.0

    def on_commands(self, node: BenchNode, commands: Any, now: float) -> None:
        """``BenchNode`` hook: called before the node answers the commands."""
        now_ns = int(now * 1e9)
        record = self.recv.record_ns
        prefix = self.prefix
        n = 0
        for c in commands:
            if not c.id.startswith(prefix):
                continue
            if c.attempt > 1:
                self.redelivered += 1
                continue
            submit_ns = payload_stamp(c.payload)
            if submit_ns is None:
                continue
            record(now_ns - submit_ns)
            n += 1
        if n:
            self.received += n
            if not self.first:
                self.first = now
            self.last = now


async def worker_nodes(spec: dict[str, Any], ctl: WorkerControl) -> dict[str, Any]:
    """In a worker process: this share of the nodes receives and answers the commands.

    Registers and connects the nodes (heartbeating them at their advised interval),
    reports ready, and from ``go`` until ``stop`` (or the bound in the spec) times every
    command of the run that arrives; the nodes answer each at once (ack + result).
    """
    clock = ArrivalClock(spec["prefix"])
    pool = NodePool(
        spec["target"],
        spec["nodes"],
        ClientAuth.from_dict(spec["auth"]),
        prefix=f"dp-{spec['worker']}-",
        on_commands=clock.on_commands,
        labels=spec["labels"],
    )
    hb_stop = asyncio.Event()
    beats: asyncio.Future[None] | None = None
    t_reg = time.perf_counter()
    try:
        await pool.start()
        beats = asyncio.ensure_future(keep_alive(pool, hb_stop))
        ctl.send(ready={"register_seconds": round(time.perf_counter() - t_reg, 3)})
        await ctl.go.wait()
        c0 = time.process_time()
        t0 = time.perf_counter()
        progress = ctl.progress_task(lambda: clock.received)
        if not ctl.stop.is_set():
            await ctl.window(spec["duration"])
        ctl.send(done=True)
        elapsed = time.perf_counter() - t0
        cpu = time.process_time() - c0
        progress.cancel()
        await asyncio.gather(progress, return_exceptions=True)
        return {
            "counts": {
                "received": clock.received,
                "redelivered": clock.redelivered,
                "results_sent": sum(node.results_sent for node in pool.nodes),
                "node_errors": sum(1 for node in pool.nodes if node.error),
            },
            "hists": {"recv": clock.recv.to_dict()},
            "cpu": cpu,
            "elapsed": elapsed,
            "first": clock.first or None,
            "last": clock.last or None,
        }
    finally:
        hb_stop.set()
        if beats is not None:
            await asyncio.gather(beats, return_exceptions=True)
        await pool.close()


async def measure_baseline(ctx: Context) -> Measurement:
    """The same request bytes, concurrency or rate, against a bare grpc.aio unary echo."""
    args = ctx.args
    base = spawn_baseline(ctx.group, "grpc")
    channel = open_channel(base.grpc)
    echo = channel.unary_unary(UNARY_METHOD)  # raw bytes both ways, as ours
    hist = LatencyHistogram()
    counter = [0, 0]
    encoder = BatchEncoder(  # the same request bytes as ours, selector included
        f"e{os.getpid()}-{int(time.time() * 1000) % 10_000_000:07d}", args.batch_size, ctx.labels
    )

    async def op(intended: float) -> None:
        first = counter[1]
        counter[1] += args.batch_size
        # the same encoder, sizes and stamped payload as ours
        request, _ids = encoder.encode(first, int(intended * 1e9))
        await echo(request, timeout=RPC_TIMEOUT)
        hist.record(time.perf_counter() - intended)
        counter[0] += 1

    progress = Progress(
        lambda t: (
            f"baseline unary echo  t={t:5.1f}s  rpcs={counter[0]:,}  {counter[0] / max(t, 1e-9):,.0f}/s"
        )
    )
    cpu0 = base.cpu_seconds()
    c0 = time.process_time()
    progress.start()
    try:
        result = await drive(
            op,
            duration=args.duration,
            concurrency=args.concurrency,
            rate=args.rate,
            max_ops=-(-args.count // args.batch_size) if args.count else None,
            stop=ctx.stop,
        )
    finally:
        await progress.stop()
        await channel.close()
    cpu1 = base.cpu_seconds()
    m = Measurement(
        name="grpc.aio unary echo",
        throughput=counter[0] / result.elapsed,
        unit="rpc/s",
        count=counter[0],
        duration_s=round(result.elapsed, 3),
        errors=result.errors,
        server_cpu=cpu_figure(
            None if cpu0 is None or cpu1 is None else cpu1 - cpu0, result.elapsed
        ),
        client_cpu=cpu_figure(time.process_time() - c0, result.elapsed),
        extra={
            "mode": op_mode(args),
            "request_bytes": len(encoder.encode(0)[0]),
        },
    )
    m.add_latency("echo round trip", hist)
    return m


async def measure_floor(ctx: Context) -> Measurement:
    """The same client, fleet and load against the dispatch floor server (plaintext)."""
    floor = spawn_baseline(ctx.group, "dispatch-floor")
    m = await measure_ours(dataclasses.replace(ctx, server=floor, auth=ctx.auth.plaintext()))
    m.name = "dispatch floor: same RPCs, no work"
    return m


async def run(ctx: Context) -> None:
    """Measure ours, then (``--baseline``) the unary echo and the floor, (``--peers``) Ray
    and Celery throughput, and the ratios."""
    args = ctx.args
    ours = await measure_ours(ctx)
    ctx.report.results.append(ours)
    if args.baseline and not ctx.stopping():
        await _baselines(ctx, ours)
    if args.peers:
        await peers.throughput_ratios(ctx, ours)


async def _baselines(ctx: Context, ours: Measurement) -> None:
    """The unary echo and the dispatch floor, and our ratios to them."""
    args = ctx.args
    base = await measure_baseline(ctx)
    ctx.report.baseline.append(base)
    limit = base.throughput * args.batch_size
    ctx.report.ratios.append(
        Ratio(
            "commands / (echo rpc/s x batch)",
            ratio(ours.throughput, limit),
            f"{ours.throughput:,.0f} cmd/s / ({base.throughput:,.0f} rpc/s x {args.batch_size})"
            + (" (fixed rate: both carry the offered load; use closed loop)" if args.rate else ""),
            ">= 0.5 (batches of 100, 1,000 nodes); and >= 20,000 cmd/s absolute",
        )
    )
    if ctx.stopping():
        return
    floor = await measure_floor(ctx)
    ctx.report.baseline.append(floor)
    ctx.report.ratios.append(
        Ratio(
            "commands / floor commands",
            ratio(ours.throughput, floor.throughput),
            f"{ours.throughput:,.0f} cmd/s / {floor.throughput:,.0f} cmd/s through the same "
            "RPCs with no work behind them (the most grpc.aio carries here)"
            + (" (fixed rate: both carry the offered load; use closed loop)" if args.rate else "")
            + "; what our work costs on top of the transport",
        )
    )
    ctx.report.ratios.append(cpu_ratio("commands / floor commands", ours, floor, ""))
    p99_ours = ours.latency["submit->node recv"].get("p99_ms")
    p99_base = base.latency["echo round trip"].get("p99_ms")
    ctx.report.ratios.append(
        Ratio(
            "p99 submit->recv / p99 echo",
            ratio(float(p99_ours) if p99_ours else None, float(p99_base) if p99_base else None),
            f"{p99_ours} ms / {p99_base} ms",
        )
    )
    # Issue 11's target 3: the floor carries the same batches to the same fleet at the same
    # rate, so what the client and its simulated nodes add is in both p99s.
    p99_floor = floor.latency["submit->node recv"].get("p99_ms")
    ctx.report.ratios.append(
        Ratio(
            "p99 submit->recv / floor p99",
            ratio(float(p99_ours) if p99_ours else None, float(p99_floor) if p99_floor else None),
            f"{p99_ours} ms / {p99_floor} ms"
            + ("" if args.rate else " (closed loop: use --rate at 10% of max for the target)"),
            "<= 2 at 10% of max rate",
        )
    )
