"""A fleet of simulated nodes in one process: channels, shared counters, logs, status.

:class:`Fleet` builds one :class:`~nexus_fast.node.sim.NodeContext` that every node
shares, opens the gRPC channels (one per 250 nodes), prints status lines and shuts down
cleanly (optionally deregistering every node).

With several ``--target`` values node ``i`` starts on target ``i mod n`` and fails over on
its own (:class:`~nexus_fast.node.targets.TargetList`, in the order of
:func:`~nexus_fast.node.targets.spread_order`, so the nodes of a dead target spread over
the others); channels are opened per (target,
channel index) when a node first needs one, so one target costs what it did before.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import random
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO, Any

import grpc
import grpc.aio

from nexus_fast.node.channel import ClientAuth, open_channel
from nexus_fast.node.dedup import DurableDedup
from nexus_fast.node.policy import DedupCache
from nexus_fast.node.sim import (
    VERSION,
    NodeContext,
    NodeSim,
    Stats,
    log,
)
from nexus_fast.node.spec import NodeSpec
from nexus_fast.node.targets import TargetList, parse_targets, spread_order
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

NODES_PER_CHANNEL = 250
REGISTER_CONCURRENCY = 64  # in-flight Register RPCs per process, so restarts don't stampede
DEREGISTER_CONCURRENCY = 128
DEREGISTER_TIMEOUT_S = 5.0
LOG_SUPPRESS_S = 5.0  # identical warnings are logged at most once per this window
RECORD_FLUSH_S = 0.2
MAX_MESSAGE = 64 * 1024 * 1024


def default_channels(nodes: int) -> int:
    """One channel per 250 nodes, at least one."""
    return max(1, math.ceil(nodes / NODES_PER_CHANNEL))


@dataclass(slots=True)
class StatusSnapshot:
    """Point-in-time view used to render a status line (rates come from two snapshots)."""

    elapsed: float
    cpu_seconds: float
    nodes: int
    connected: int
    registered: int
    draining: int = 0
    superseded: int = 0
    fatal: int = 0
    counters: Stats = field(default_factory=Stats)


def _rate(now: float, before: float, dt: float) -> float:
    return (now - before) / dt if dt > 0 else 0.0


def format_status(
    snap: StatusSnapshot, prev: StatusSnapshot | None = None, *, as_json: bool = False
) -> str:
    """Render one status line; rates are per second since ``prev`` (or since start)."""
    c = snap.counters
    p = prev.counters if prev else Stats()
    dt = snap.elapsed - (prev.elapsed if prev else 0.0)
    cpu_pct = 100.0 * _rate(snap.cpu_seconds, prev.cpu_seconds if prev else 0.0, dt)
    hb_rate = _rate(c.heartbeats, p.heartbeats, dt)
    cmd_rate = _rate(c.executed, p.executed, dt)
    if as_json:
        doc: dict[str, Any] = {
            "t": round(snap.elapsed, 3),
            "nodes": snap.nodes,
            "connected": snap.connected,
            "registered": snap.registered,
            "draining": snap.draining,
            "superseded": snap.superseded,
            "fatal": snap.fatal,
            "heartbeats_per_s": round(hb_rate, 1),
            "commands_per_s": round(cmd_rate, 1),
            "cpu_percent": round(cpu_pct, 1),
        }
        doc.update(dataclasses.asdict(c))
        return json.dumps(doc, separators=(",", ":"))
    line = (
        f"t={snap.elapsed:.1f}s nodes={snap.nodes} connected={snap.connected} "
        f"registered={snap.registered} hb/s={hb_rate:.1f} reconnects={c.reconnects} "
        f"cmds={c.executed} ({cmd_rate:.1f}/s) failed={c.failed} dup={c.duplicates} "
        f"cancelled={c.cancelled} errors={c.errors} cpu={cpu_pct:.1f}%"
    )
    extras = [
        f"{name}={value}"
        for name, value in (
            ("draining", snap.draining),
            ("superseded", snap.superseded),
            ("fatal", snap.fatal),
            ("failovers", c.failovers),
        )
        if value
    ]
    return " ".join([line, *extras])


class Fleet:
    """Owns the channels, the nodes, counters, the record file and the status line."""

    def __init__(self, args: argparse.Namespace, specs: Sequence[NodeSpec]) -> None:
        self.args = args
        self.auth = ClientAuth.from_args(args).for_nodes()
        self.channel_count = args.channels or default_channels(len(specs))
        self.targets = parse_targets(args.target)
        self.channels: dict[tuple[int, str], grpc.aio.Channel] = {}
        self._stubs: dict[tuple[int, str], pb_grpc.NodeServiceStub] = {}
        self.ctx = NodeContext(
            stub=self.stub_for,
            metadata=self.auth.node_metadata,
            rng=random.Random(args.seed),
            dedup=DedupCache(args.dedup_size),
            register_slots=asyncio.Semaphore(REGISTER_CONCURRENCY),
            report=self.report,
            record=self.record,
            hostname=socket.gethostname(),
            ramp_s=args.ramp,
            failure_rate=args.failure_rate,
            exec_range=args.exec_duration,
            coalesce_hold_s=args.coalesce_hold,
            spans=_execution_spans(getattr(args, "tracing_endpoint", None)),
        )
        if getattr(args, "state_dir", None):
            self.ctx.journal = DurableDedup(args.state_dir, self.ctx.dedup)
            log.info(
                "state dir %s: %d commands remembered, %d interrupted by the last exit",
                args.state_dir,
                len(self.ctx.dedup),
                self.ctx.journal.interrupted,
            )
        self.nodes = [
            NodeSim(
                self.ctx,
                spec,
                i % self.channel_count,
                TargetList(spread_order(self.targets, i), rng=self.ctx.rng),
            )
            for i, spec in enumerate(specs)
        ]
        self._record_fp: IO[str] | None = None
        self._record_flush: asyncio.TimerHandle | None = None
        self._last_log: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._t0 = time.monotonic()
        self._cpu0 = time.process_time()

    @property
    def stats(self) -> Stats:
        """Fleet-wide counters (shared with every node)."""
        return self.ctx.stats

    @property
    def stopping(self) -> bool:
        """True once shutdown began: nodes stop retrying."""
        return self.ctx.stopping

    def stub(self, node: NodeSim) -> pb_grpc.NodeServiceStub:
        """The NodeService stub of this node's channel to its current target."""
        return self.stub_for(node.channel_index, node.targets.current)

    def stub_for(self, index: int, target: str) -> pb_grpc.NodeServiceStub:
        """The stub of channel ``index`` to ``target``, opened on first use."""
        key = (index, target)
        stub = self._stubs.get(key)
        if stub is None:
            channel = open_channel(target, self.auth, self._channel_options())
            self.channels[key] = channel
            stub = self._stubs[key] = pb_grpc.NodeServiceStub(channel)
        return stub

    # ---- reporting (given to the nodes through their context)

    def report(
        self, kind: str, message: str, *, level: int = logging.WARNING, error: bool = True
    ) -> None:
        """Count and log a problem; one message per kind per window, not one per node."""
        if error:
            self.stats.errors += 1
        now = time.monotonic()
        last = self._last_log.get(kind)
        if last is None or now - last >= LOG_SUPPRESS_S:
            suppressed = self._suppressed.pop(kind, 0)
            suffix = (
                f" (+{suppressed} similar in the last {LOG_SUPPRESS_S:.0f}s)" if suppressed else ""
            )
            log.log(level, "%s%s", message, suffix)
            self._last_log[kind] = now
        else:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            log.debug("%s", message)

    def record(
        self, node_id: str, command: pb.Command, attempt: int, success: bool, error: str
    ) -> None:
        """Append one JSON line per executed command to ``--record`` (flushed every 200ms)."""
        if self._record_fp is None:
            return
        line = {
            "node_id": node_id,
            "command_id": command.id,
            "attempt": attempt,
            "success": success,
            "kind": command.kind,
            "ts_ms": int(time.time() * 1000),
        }
        if error:
            line["error"] = error
        self._record_fp.write(json.dumps(line, separators=(",", ":")) + "\n")
        if self._record_flush is None:
            loop = asyncio.get_running_loop()
            self._record_flush = loop.call_later(RECORD_FLUSH_S, self.flush_record)

    def flush_record(self) -> None:
        """Flush the record file (timer callback and at exit)."""
        self._record_flush = None
        if self.ctx.journal is not None:
            self.ctx.journal.sync()
        if self._record_fp is not None:
            self._record_fp.flush()

    # ---- status

    def snapshot(self) -> StatusSnapshot:
        """Current counters and node-state gauges."""
        connected = registered = draining = superseded = fatal = 0
        for node in self.nodes:
            state = node.state
            if state == "connected":
                connected += 1
            if state == "superseded":
                superseded += 1
            elif state == "failed":
                fatal += 1
            elif node.epoch is not None:
                registered += 1
            if node.draining:
                draining += 1
        c = self.stats
        return StatusSnapshot(
            elapsed=time.monotonic() - self._t0,
            cpu_seconds=time.process_time() - self._cpu0,
            nodes=len(self.nodes),
            connected=connected,
            registered=registered,
            draining=draining,
            superseded=superseded,
            fatal=fatal,
            counters=dataclasses.replace(c),
        )

    def _print(self, line: str) -> None:
        print(line, flush=True)

    async def _status_loop(self, interval: float) -> None:
        prev = self.snapshot()
        while True:
            await asyncio.sleep(interval)
            snap = self.snapshot()
            self._print(format_status(snap, prev, as_json=self.args.json_status))
            prev = snap

    # ---- run

    def _channel_options(self) -> list[tuple[str, Any]]:
        args = self.args
        options: list[tuple[str, Any]] = [
            ("grpc.use_local_subchannel_pool", 1),  # K channels = K TCP connections, not 1 shared
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.enable_retries", 0),  # we retry ourselves, with our own backoff
        ]
        if args.keepalive > 0:
            options += [
                ("grpc.keepalive_time_ms", int(args.keepalive * 1000)),
                ("grpc.keepalive_timeout_ms", 10_000),
            ]
        return options

    def _open_channels(self) -> None:
        """Open every channel the nodes start on (node i: channel i mod k, target i mod n)."""
        for node in self.nodes[: self.channel_count * len(self.targets)]:
            self.stub(node)

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set, ``--duration`` elapses or every node has stopped."""
        args = self.args
        loop = asyncio.get_running_loop()
        if args.record:
            self._record_fp = open(args.record, "a", encoding="utf-8")  # noqa: SIM115
        self._open_channels()
        log.info(
            "nexus-node %s: %d nodes -> %s over %d channel(s)",
            VERSION,
            len(self.nodes),
            ",".join(self.targets),
            len(self.channels),
        )
        n = max(len(self.nodes), 1)
        node_tasks = [
            loop.create_task(node.run(i / n), name=f"node:{node.node_id}")
            for i, node in enumerate(self.nodes)
        ]
        aux: list[asyncio.Task[Any]] = []
        if args.status_interval > 0:
            aux.append(loop.create_task(self._status_loop(args.status_interval)))
        stop_wait = loop.create_task(stop.wait())
        nodes_done = loop.create_task(asyncio.wait(node_tasks)) if node_tasks else None
        aux.append(stop_wait)
        waiters: set[asyncio.Future[Any]] = {stop_wait}
        if nodes_done is not None:
            aux.append(nodes_done)
            waiters.add(nodes_done)
        exit_code = 0
        try:
            await asyncio.wait(
                waiters, timeout=args.duration or None, return_when=asyncio.FIRST_COMPLETED
            )
            if nodes_done is not None and nodes_done.done() and not stop.is_set():
                snap = self.snapshot()
                log.error(
                    "all nodes stopped on their own (%d rejected, %d superseded); exiting",
                    snap.fatal,
                    snap.superseded,
                )
                exit_code = 1
        finally:
            await self._shutdown(node_tasks, aux)
        snap = self.snapshot()
        self._print("final " + format_status(snap, None, as_json=args.json_status))
        return exit_code

    async def _shutdown(
        self, node_tasks: list[asyncio.Task[None]], aux: list[asyncio.Task[Any]]
    ) -> None:
        """Stop heartbeats (cancel streams), optionally Deregister, close channels."""
        self.ctx.stopping = True
        for task in [*node_tasks, *aux]:
            task.cancel()
        await asyncio.gather(*node_tasks, *aux, return_exceptions=True)
        if self.args.deregister_on_exit:
            await self._deregister_all()
        if self._record_flush is not None:
            self._record_flush.cancel()
        self.flush_record()
        if self._record_fp is not None:
            self._record_fp.close()
            self._record_fp = None
        if self.ctx.journal is not None:
            self.ctx.journal.close()
        await asyncio.gather(
            *(ch.close(None) for ch in self.channels.values()), return_exceptions=True
        )

    async def _deregister_all(self) -> None:
        slots = asyncio.Semaphore(DEREGISTER_CONCURRENCY)
        todo = [
            n for n in self.nodes if n.epoch is not None and n.state not in ("failed", "superseded")
        ]

        async def one(node: NodeSim) -> bool:
            async with slots:
                try:
                    await self.stub(node).Deregister(
                        pb.DeregisterRequest(node_id=node.node_id, session_epoch=node.epoch),
                        timeout=DEREGISTER_TIMEOUT_S,
                        metadata=self.auth.node_metadata(node.node_id),
                    )
                except grpc.aio.AioRpcError as exc:
                    self.report(
                        f"deregister-{exc.code().name}",
                        f"node {node.node_id}: Deregister failed ({exc.code().name}: {exc.details()})",
                    )
                    return False
                return True

        results = await asyncio.gather(*(one(node) for node in todo))
        log.info("deregistered %d/%d nodes", sum(results), len(todo))


def _execution_spans(endpoint: str | None) -> Any:
    """``--tracing-endpoint``: the span recorder (the SDK is imported only then)."""
    if not endpoint:
        return None
    from nexus_fast.telemetry.tracing import node_spans

    return node_spans(endpoint)
