"""One simulated node (:class:`NodeSim`) and the narrow context it runs in.

A node registers over gRPC, holds one ``NodeService.Connect`` stream, heartbeats at the
server-advised interval, acks and "executes" commands (sleeping a simulated duration),
reports agents, and reconnects / re-registers on its own when the stream breaks. It sees
the process that runs it only through :class:`NodeContext`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import grpc
import grpc.aio

import nexus_fast
from nexus_fast.node.dedup import DurableDedup
from nexus_fast.node.policy import (
    Action,
    DedupCache,
    agent_id_from_payload,
    backoff_delay,
    classify_stream_end,
    jittered,
    register_error_is_fatal,
    simulate_usage,
)
from nexus_fast.node.spec import RESOURCE_KEYS, NodeSpec
from nexus_fast.node.targets import TargetList, fails_over, leader_hint
from nexus_fast.pb import fabric_pb2 as pb

if TYPE_CHECKING:
    from nexus_fast.telemetry.tracing import ExecutionSpans

log = logging.getLogger("nexus_fast.node")

VERSION = nexus_fast.__version__
DEFAULT_HEARTBEAT_S = 5.0  # used until the server advises an interval
MIN_HEARTBEAT_S = 0.05  # guards against a zero/absurd server value turning into a busy loop
# Acks and results are sent at once when the stream is idle; those produced while a write
# is in flight share the next NodeMessage (Nagle-style). ``--coalesce-hold`` (the old fixed
# 2 ms hold before every send) trades latency for fewer messages; 0 by default.
DEFAULT_COALESCE_HOLD_S = 0.0
OUTBOX_LIMIT = 4096  # per node: pending acks+results before we stop reading commands
MAX_RUNNING = 4096  # per node: concurrent simulated executions before we stop reading
DEFAULT_MAX_BATCH = 1000  # items of one kind per NodeMessage unless the server says otherwise
RPC_TIMEOUT_S = 10.0
STOPPED_AGENTS_KEPT = 256  # per node: stopped agents remembered (and re-reported on reconnect)
AGENT_KINDS = frozenset({"agent.start", "agent.stop"})


@dataclass(slots=True)
class Stats:
    """Monotonic fleet-wide counters."""

    registers: int = 0
    reregisters: int = 0
    reconnects: int = 0
    heartbeats: int = 0
    messages: int = 0
    acks: int = 0
    results: int = 0
    executed: int = 0
    failed: int = 0
    cancelled: int = 0
    duplicates: int = 0
    errors: int = 0
    failovers: int = 0  # a node moved to another target (--target lists several)


class Reporter(Protocol):
    """Counts and logs a problem (rate-limited per ``kind``); see ``Fleet.report``."""

    def __call__(
        self, kind: str, message: str, *, level: int = logging.WARNING, error: bool = True
    ) -> None: ...


class Recorder(Protocol):
    """Notes one executed command (``--record``); see ``Fleet.record``."""

    def __call__(
        self, node_id: str, command: pb.Command, attempt: int, success: bool, error: str
    ) -> None: ...


def _no_report(
    kind: str, message: str, *, level: int = logging.WARNING, error: bool = True
) -> None:
    log.log(level, "%s", message)


def _no_record(node_id: str, command: pb.Command, attempt: int, success: bool, error: str) -> None:
    return None


def _no_metadata(node_id: str) -> tuple[tuple[str, str], ...]:
    return ()


@dataclass(eq=False)
class NodeContext:
    """Everything a :class:`NodeSim` needs from the process that runs it, and nothing else.

    ``stub(i, target)`` returns the NodeService stub of channel ``i`` to ``target`` (a node
    stays on its channel index; it changes target when it fails over);
    ``metadata(node_id)`` is the call metadata of that node's own calls (its minted token);
    ``stopping`` is set by the owner at shutdown. Shared by every node of a ctx.
    """

    stub: Callable[[int, str], Any]
    metadata: Callable[[str], tuple[tuple[str, str], ...]] = _no_metadata
    rng: random.Random = field(default_factory=random.Random)
    stats: Stats = field(default_factory=Stats)
    dedup: DedupCache = field(default_factory=DedupCache)
    register_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(64))
    report: Reporter = _no_report
    record: Recorder = _no_record
    # --state-dir: the durable de-dup record (node/dedup.py); None keeps it in memory only.
    journal: DurableDedup | None = None
    hostname: str = "localhost"
    ramp_s: float | None = None  # None: spread start-up over one heartbeat interval
    failure_rate: float = 0.0
    exec_range: tuple[float, float] = (0.01, 0.01)
    coalesce_hold_s: float = DEFAULT_COALESCE_HOLD_S  # > 0: hold each send this long
    stopping: bool = False
    # --tracing-endpoint: a span around each run of a command with a sampled traceparent.
    spans: ExecutionSpans | None = None

    def exec_duration(self) -> float:
        """One simulated execution time, uniform within ``exec_range``."""
        lo, hi = self.exec_range
        return lo if lo == hi else self.rng.uniform(lo, hi)


class _Execution:
    """One running simulated command."""

    __slots__ = ("attempt", "command", "handle", "started_ns")

    def __init__(self, command: pb.Command) -> None:
        self.command = command
        self.attempt = command.attempt
        self.handle: asyncio.TimerHandle | None = None
        self.started_ns = time.time_ns()  # the start of its span, when it is traced


_GRPC_ENDED = (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError)


class NodeSim:
    """One simulated node: Register, one Connect stream, heartbeats, commands, agents.

    Outbound traffic (acks, results, agent states, heartbeats) is buffered on the node, not
    on the stream, so results produced while disconnected are delivered after reconnecting.
    Exactly one writer task per stream drains it.
    """

    def __init__(
        self,
        ctx: NodeContext,
        spec: NodeSpec,
        channel_index: int,
        targets: TargetList | None = None,
    ) -> None:
        self.ctx = ctx
        self.spec = spec
        self.node_id = spec.node_id
        self.channel_index = channel_index
        # Where this node connects; it moves on by itself when a target is UNAVAILABLE.
        self.targets = targets or TargetList(["127.0.0.1:50053"], rng=ctx.rng)
        self._leader: str | None = None  # the leader named by the last UNAVAILABLE
        self.epoch: int | None = None
        self.state = "starting"
        self.interval_s = DEFAULT_HEARTBEAT_S
        self.max_batch = DEFAULT_MAX_BATCH
        self.draining = False
        self.drain_reason = ""
        self.agents: dict[str, str] = {}
        self._dirty_agents: set[str] = set()
        self._acks: list[pb.CommandAck] = []
        self._results: list[pb.CommandResult] = []
        self._running: dict[str, _Execution] = {}
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._hb_due = False
        self._hb_handle: asyncio.TimerHandle | None = None
        self._failures = 0  # consecutive sessions that never got accepted; drives backoff
        self._reregisters = 0  # consecutive re-registrations without an accepted session
        self._sessions = 0
        rng = ctx.rng
        self._base = {key: rng.uniform(0.05, 0.30) for key in RESOURCE_KEYS}

    # ---- lifecycle

    async def run(self, start_fraction: float) -> None:
        """Node main loop; returns when stopped, superseded or rejected."""
        try:
            await self._main(start_fraction)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.state = "failed"
            self.ctx.stats.errors += 1
            log.exception("node %s: unexpected error; node stopped", self.node_id)
        finally:
            self._cancel_heartbeat()
            for exe in self._running.values():
                if exe.handle is not None:
                    exe.handle.cancel()
            self._running.clear()

    async def _main(self, start_fraction: float) -> None:
        ctx = self.ctx
        first = True
        while not ctx.stopping:
            if self.epoch is None and not await self._register():
                return
            if first:
                first = False
                ramp = ctx.ramp_s if ctx.ramp_s is not None else self.interval_s
                if ramp > 0 and start_fraction > 0:
                    self.state = "waiting"  # stagger: spread first heartbeats over one interval
                    await asyncio.sleep(start_fraction * ramp)
            if self._sessions:
                ctx.stats.reconnects += 1
            self._sessions += 1
            action = await self._session()
            if ctx.stopping:
                return
            if action is Action.SUPERSEDED:
                self.state = "superseded"
                ctx.report(
                    "superseded",
                    f"node {self.node_id}: superseded by another session; node stopped",
                    error=False,
                )
                return
            if action is Action.FATAL:
                self.state = "failed"
                return
            if action is Action.REREGISTER:
                self.epoch = None
                ctx.stats.reregisters += 1
                self._failures = 0  # the server answered: it is up, so re-register promptly
                delay = backoff_delay(self._reregisters, rng=ctx.rng)
                self._reregisters += 1  # but never loop Register/Connect hot
            elif action is Action.FAILOVER:
                delay = self._fail_over()
            else:
                delay = backoff_delay(self._failures, rng=ctx.rng)
                self._failures += 1
            self.state = "backoff"
            await asyncio.sleep(delay)

    async def _register(self) -> bool:
        """Register with retries; False if the node must stop (fatal error or shutdown)."""
        ctx = self.ctx
        request = pb.RegisterRequest(
            node_id=self.node_id,
            address=f"sim://{ctx.hostname}/{self.node_id}",
            labels=self.spec.labels,
            capacity=pb.Resources(**self.spec.capacity),
            version=f"nexus-node/{VERSION}",
        )
        attempt = 0
        while not ctx.stopping:
            self.state = "registering"
            try:
                async with ctx.register_slots:
                    response = await self.stub().Register(
                        request, timeout=RPC_TIMEOUT_S, metadata=ctx.metadata(self.node_id)
                    )
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if register_error_is_fatal(code):
                    self.state = "failed"
                    ctx.report(
                        f"register-fatal-{code.name}",
                        f"node {self.node_id}: Register rejected ({code.name}: {exc.details()}); "
                        "node stopped",
                        level=logging.ERROR,
                    )
                    return False
                ctx.report(
                    f"register-{code.name}",
                    f"node {self.node_id}: Register at {self.targets.current} failed "
                    f"({code.name}: {exc.details()}); retrying",
                )
                if fails_over(code):
                    self._leader = leader_hint(exc.trailing_metadata())
                    self.state = "backoff"
                    await asyncio.sleep(self._fail_over())
                    continue
            else:
                self.targets.ok()
                self.epoch = response.session_epoch
                if response.HasField("config"):
                    self.apply_config(response.config)
                self.state = "registered"
                ctx.stats.registers += 1
                return True
            self.state = "backoff"
            await asyncio.sleep(backoff_delay(attempt, rng=ctx.rng))
            attempt += 1
        return False

    async def _session(self) -> Action:
        """Run one Connect stream until it ends; return what to do next."""
        ctx = self.ctx
        self.state = "connecting"
        call = self.stub().Connect(metadata=ctx.metadata(self.node_id))
        reader = asyncio.create_task(self._reader(call))
        writer = asyncio.create_task(self._writer(call))
        try:
            await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
            for task in (reader, writer):
                exc = task.exception() if task.done() and not task.cancelled() else None
                if exc is not None and not isinstance(exc, _GRPC_ENDED):
                    log.error("node %s: stream task failed: %r", self.node_id, exc, exc_info=exc)
                    call.cancel()  # a local bug: end the call so its status resolves
            code = await call.code()
            details = await call.details()
            if fails_over(code):
                self._leader = leader_hint(await call.trailing_metadata())
        finally:
            self._cancel_heartbeat()
            call.cancel()
            reader.cancel()
            writer.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
        if ctx.stopping:
            return Action.RECONNECT
        action = classify_stream_end(code, details)
        if fails_over(code):
            ctx.report(
                f"stream-{code.name}",
                f"node {self.node_id}: stream to {self.targets.current} ended "
                f"({code.name}: {details}); failing over",
            )
            return Action.FAILOVER
        if code == grpc.StatusCode.OK:
            ctx.report(
                "stream-ok",
                f"node {self.node_id}: stream closed by server; reconnecting",
                level=logging.INFO,
                error=False,
            )
        elif action is Action.FATAL:
            ctx.report(
                f"connect-fatal-{code.name}",
                f"node {self.node_id}: Connect rejected ({code.name}: {details}); node stopped",
                level=logging.ERROR,
            )
        elif action is not Action.SUPERSEDED:
            ctx.report(
                f"stream-{code.name}",
                f"node {self.node_id}: stream ended ({code.name}: {details}); {action.value}",
            )
        return action

    def stub(self) -> Any:
        """The NodeService stub of this node's channel to its current target."""
        return self.ctx.stub(self.channel_index, self.targets.current)

    def _fail_over(self) -> float:
        """Move to the next target (the leader the server named, if any); the delay."""
        before = self.targets.current
        delay = self.targets.next(self._leader)
        self._leader = None
        if self.targets.current != before:
            self.ctx.stats.failovers += 1
            log.debug("node %s: %s -> %s", self.node_id, before, self.targets.current)
        return delay

    # ---- inbound

    async def _reader(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            msg = await call.read()
            if not isinstance(msg, pb.ControlMessage):
                return  # grpc.aio.EOF: the server completed the stream
            if self.state != "connected":
                self.state = "connected"
                self._failures = self._reregisters = 0  # the server accepted this session
                self.targets.ok()
            self.handle_control(msg)
            if self._over_capacity():
                await self._wait_capacity()  # stop reading: gRPC flow control pushes back

    def handle_control(self, msg: pb.ControlMessage) -> None:
        """Apply one ControlMessage: config, drain, commands, then cancellations."""
        if msg.HasField("config"):
            self.apply_config(msg.config)
        if msg.HasField("drain") and (
            msg.drain.draining != self.draining or msg.drain.reason != self.drain_reason
        ):
            self.draining = msg.drain.draining
            self.drain_reason = msg.drain.reason
            self.ctx.report(
                "drain",
                f"node {self.node_id}: drain {'requested' if self.draining else 'lifted'}"
                + (f" ({self.drain_reason})" if self.drain_reason else ""),
                level=logging.INFO,
                error=False,
            )
        for command in msg.commands:
            self._on_command(command)
        if self.ctx.journal is not None:
            self.ctx.journal.sync()  # "started" is durable before anything runs
        for command_id in msg.cancel_command_ids:
            self._on_cancel(command_id)
        if msg.commands or msg.cancel_command_ids:
            self._wake.set()

    def apply_config(self, config: pb.NodeConfig) -> None:
        """Adopt server-advised settings; a shorter interval takes effect right away."""
        if config.heartbeat_interval_ms > 0:
            interval = max(MIN_HEARTBEAT_S, config.heartbeat_interval_ms / 1000.0)
            if interval < self.interval_s and self._hb_handle is not None:
                self._schedule_heartbeat(jittered(interval, self.ctx.rng))
            self.interval_s = interval
        if config.max_batch_size > 0:
            self.max_batch = config.max_batch_size

    def _on_command(self, command: pb.Command) -> None:
        ctx = self.ctx
        self._acks.append(pb.CommandAck(command_id=command.id, attempt=command.attempt))
        running = self._running.get(command.id)
        if running is not None:  # redelivered while running: the result will carry this attempt
            running.attempt = max(running.attempt, command.attempt)
            ctx.stats.duplicates += 1
            return
        stored = ctx.dedup.get(DedupCache.key(self.node_id, command.id))
        # Already executed: answer from the record, never run twice. Except a failed
        # attempt that the core retries here (a higher attempt number): run that again.
        if stored is not None and (stored[0] or command.attempt <= stored[3]):
            ctx.stats.duplicates += 1
            success, output, error, _ = stored
            self._results.append(
                pb.CommandResult(
                    command_id=command.id,
                    attempt=command.attempt,
                    success=success,
                    output=output,
                    error=error,
                )
            )
            return
        exe = _Execution(command)
        self._running[command.id] = exe
        if ctx.journal is not None:
            ctx.journal.started(self.node_id, command.id, exe.attempt)
        if command.deadline_ms and command.deadline_ms < time.time() * 1000.0:
            self._complete(exe, False, b"", "deadline exceeded")
            return
        # Launching or stopping an agent returns at once; the agent then runs on its own.
        delay = 0.0 if command.kind in AGENT_KINDS else ctx.exec_duration()
        if delay <= 0.0:
            # Done now: the result joins the ack in the same NodeMessage (one write, and
            # one state write on the server instead of two).
            self._finish_execution(exe)
            return
        exe.handle = asyncio.get_running_loop().call_later(delay, self._finish_execution, exe)

    def _on_cancel(self, command_id: str) -> None:
        exe = self._running.get(command_id)
        if exe is None:
            return  # unknown or already finished: its result stands
        if exe.handle is not None:
            exe.handle.cancel()
        self._complete(exe, False, b"", "cancelled")

    def _finish_execution(self, exe: _Execution) -> None:
        ctx = self.ctx
        if ctx.failure_rate and ctx.rng.random() < ctx.failure_rate:
            self._complete(exe, False, b"", "simulated failure")
            return
        kind = exe.command.kind
        if kind in AGENT_KINDS:
            agent_id = agent_id_from_payload(exe.command.payload, exe.command.id)
            self._set_agent(agent_id, "running" if kind == "agent.start" else "stopped")
        self._complete(exe, True, b"ok", "")

    def _complete(self, exe: _Execution, success: bool, output: bytes, error: str) -> None:
        ctx = self.ctx
        command = exe.command
        self._running.pop(command.id, None)
        ctx.dedup.put(
            DedupCache.key(self.node_id, command.id), (success, output, error, exe.attempt)
        )
        if ctx.journal is not None:
            ctx.journal.finished(self.node_id, command.id, exe.attempt, success, output, error)
        self._results.append(
            pb.CommandResult(
                command_id=command.id,
                attempt=exe.attempt,
                success=success,
                output=output,
                error=error,
            )
        )
        stats = ctx.stats
        stats.executed += 1
        if not success:
            stats.failed += 1
            if error == "cancelled":
                stats.cancelled += 1
        ctx.record(self.node_id, command, exe.attempt, success, error)
        if ctx.spans is not None and command.traceparent:
            ctx.spans.executed(self.node_id, command, exe.started_ns, success, error)
        self._wake.set()
        if not self._over_capacity():
            self._space.set()

    def _set_agent(self, agent_id: str, state: str) -> None:
        self.agents.pop(agent_id, None)
        self.agents[agent_id] = state  # re-insert: dict order = recency, oldest stopped go first
        self._dirty_agents.add(agent_id)
        stopped = [a for a, s in self.agents.items() if s == "stopped"]
        for old in stopped[: max(0, len(stopped) - STOPPED_AGENTS_KEPT)]:
            del self.agents[old]
            self._dirty_agents.discard(old)

    # ---- outbound

    def pending(self) -> int:
        """Acks and results waiting to be written."""
        return len(self._acks) + len(self._results)

    def _over_capacity(self) -> bool:
        return self.pending() >= OUTBOX_LIMIT or len(self._running) >= MAX_RUNNING

    async def _wait_capacity(self) -> None:
        while self._over_capacity():
            self._space.clear()
            await self._space.wait()

    def running_agents(self) -> int:
        """Number of agents currently in state ``running``."""
        return sum(1 for state in self.agents.values() if state == "running")

    def heartbeat(self) -> pb.Heartbeat:
        """Build a heartbeat with slowly drifting simulated usage."""
        rng = self.ctx.rng
        for key, value in self._base.items():  # small random walk keeps the numbers alive
            self._base[key] = min(0.5, max(0.02, value + rng.uniform(-0.01, 0.01)))
        usage = simulate_usage(
            self.spec.capacity, self._base, len(self._running), self.running_agents()
        )
        return pb.Heartbeat(usage=pb.Resources(**usage), sent_ms=int(time.time() * 1000))

    def build_message(self, *, heartbeat: bool, all_agents: bool) -> pb.NodeMessage | None:
        """Take up to ``max_batch`` acks and results (plus agents/heartbeat) into one message."""
        n = self.max_batch
        acks, self._acks = self._acks[:n], self._acks[n:]
        results, self._results = self._results[:n], self._results[n:]
        agent_ids: Iterable[str] = self.agents if all_agents else self._dirty_agents
        agents = [
            pb.AgentStatus(agent_id=a, state=self.agents[a]) for a in agent_ids if a in self.agents
        ]
        self._dirty_agents.clear()
        if not (heartbeat or acks or results or agents):
            return None
        msg = pb.NodeMessage(acks=acks, results=results, agents=agents)
        if heartbeat:
            msg.heartbeat.CopyFrom(self.heartbeat())
            self._hb_due = False
        if self._acks or self._results:
            self._wake.set()  # more than one batch waiting
        if not self._over_capacity():
            self._space.set()
        return msg

    def _requeue(self, msg: pb.NodeMessage) -> None:
        """Put back what a failed write carried; acks are dropped (redelivery re-acks)."""
        self._results[:0] = list(msg.results)
        self._dirty_agents.update(a.agent_id for a in msg.agents)

    async def _writer(self, call: grpc.aio.StreamStreamCall) -> None:
        """The only writer of this stream: first message, then heartbeats and batches.

        Nagle-style: an idle stream sends what is pending at once; whatever is produced
        while a write is in flight waits for it and leaves in the next message, so a lone
        result is never held and a burst still shares messages.
        """
        assert self.epoch is not None
        self._wake.clear()  # anything still pending goes out in the first message
        first = self.build_message(heartbeat=True, all_agents=True)
        assert first is not None
        first.node_id = self.node_id
        first.session_epoch = self.epoch
        await self._write(call, first)
        while True:
            await self._wake.wait()
            self._wake.clear()
            hold = self.ctx.coalesce_hold_s
            if hold > 0 and not self._hb_due and 0 < self.pending() < self.max_batch:
                await asyncio.sleep(hold)  # --coalesce-hold: let a burst join this message
            msg = self.build_message(heartbeat=self._hb_due, all_agents=False)
            if msg is not None:
                await self._write(call, msg)

    async def _write(self, call: grpc.aio.StreamStreamCall, msg: pb.NodeMessage) -> None:
        if msg.results and self.ctx.journal is not None:
            self.ctx.journal.sync()  # a result is durable before it is reported
        try:
            await call.write(msg)
        except BaseException:
            self._requeue(msg)
            raise
        stats = self.ctx.stats
        stats.messages += 1
        stats.acks += len(msg.acks)
        stats.results += len(msg.results)
        if msg.HasField("heartbeat"):
            stats.heartbeats += 1
            self._schedule_heartbeat(jittered(self.interval_s, self.ctx.rng))

    def _schedule_heartbeat(self, delay: float) -> None:
        self._cancel_heartbeat()
        self._hb_handle = asyncio.get_running_loop().call_later(delay, self._heartbeat_due)

    def _heartbeat_due(self) -> None:
        self._hb_handle = None
        self._hb_due = True
        self._wake.set()

    def _cancel_heartbeat(self) -> None:
        if self._hb_handle is not None:
            self._hb_handle.cancel()
            self._hb_handle = None
        self._hb_due = False
