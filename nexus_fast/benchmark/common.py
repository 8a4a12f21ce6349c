"""What every scenario shares: the run context, gRPC channels, and simulated nodes.

:class:`BenchNode` is a lean node: Register, one Connect stream, heartbeats on demand, and
commands answered at once with one NodeMessage carrying the ack and the result. It reuses
the reference proxy's defaults (:mod:`nexus_fast.node`) but not its ``NodeSim``:
that one simulates execution time, de-duplicates and keeps per-node state, which is
right for a fleet simulator and more than a harness that times the server needs
(``roundtrip`` runs the real ``nexus-node`` on purpose: users run it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import secrets
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio

import nexus_fast.node.channel as client_channel
from nexus_fast.benchmark.base import MAX_MESSAGE
from nexus_fast.benchmark.procs import Endpoints, ProcessGroup
from nexus_fast.benchmark.report import Report
from nexus_fast.node.channel import ClientAuth
from nexus_fast.node.fleet import default_channels
from nexus_fast.node.policy import backoff_delay, simulate_usage
from nexus_fast.node.spec import DEFAULT_CAPACITY
from nexus_fast.node.targets import fails_over, parse_targets
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

REGISTER_CONCURRENCY = 64
RPC_TIMEOUT = 30.0
RUN_LABEL = "nexus-bench-run"  # every node of a run carries it; its commands select it


def run_labels() -> dict[str, str]:
    """``{RUN_LABEL: <random>}``: the label that makes a run's commands land on its own
    nodes, not on other nodes of the server (another fleet, an earlier run)."""
    return {RUN_LABEL: secrets.token_hex(6)}


@dataclass
class Context:
    """One run: parsed arguments, the server under test, child processes, the report."""

    args: argparse.Namespace
    group: ProcessGroup
    report: Report
    server: Endpoints | None = None  # None for in-process scenarios (state, micro)
    stop: asyncio.Event | None = None
    auth: ClientAuth = field(default_factory=ClientAuth)  # --tls-* and --token
    labels: dict[str, str] = field(default_factory=run_labels)  # this run's nodes

    def stopping(self) -> bool:
        """True after Ctrl-C."""
        return self.stop is not None and self.stop.is_set()


def open_channel(target: str, auth: ClientAuth | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel of its own TCP connection; TLS and token as ``auth`` says."""
    options: list[tuple[str, Any]] = [
        ("grpc.use_local_subchannel_pool", 1),  # N channels = N connections, not one shared
        ("grpc.max_receive_message_length", MAX_MESSAGE),
        ("grpc.max_send_message_length", MAX_MESSAGE),
        ("grpc.enable_retries", 0),
    ]
    return client_channel.open_channel(target, auth, options)


class BenchNode:
    """One simulated node with measurement hooks.

    ``on_commands(node, commands, received_at)`` is called for every ControlMessage with
    commands, before the reply (ack + successful result for each) is written.
    """

    def __init__(
        self,
        node_id: str,
        stub: pb_grpc.NodeServiceStub,
        on_commands: Callable[[BenchNode, Any, float], None] | None = None,
        labels: Mapping[str, str] | None = None,
        metadata: tuple[tuple[str, str], ...] = (),
    ) -> None:
        self.node_id = node_id
        self.stub = stub
        self.metadata = metadata  # this node's own token (--node-token-secret), else ()
        self.labels = {"bench": "1", **(labels or {})}
        self.on_commands = on_commands
        self.epoch = 0
        self.call: Any = None
        self.interval = 5.0
        self._write_lock = asyncio.Lock()
        self._reader: asyncio.Task[None] | None = None
        self.heartbeat_bytes = b""
        self.heartbeat_msg = pb.NodeMessage()
        self.results_sent = 0
        self.error = ""

    async def register(self) -> None:
        """Register (new session epoch) and remember the advised heartbeat interval."""
        response = await self.stub.Register(
            pb.RegisterRequest(
                node_id=self.node_id,
                address=f"bench://{self.node_id}",
                labels=self.labels,
                capacity=pb.Resources(**DEFAULT_CAPACITY),
                version="nexus-bench",
            ),
            timeout=RPC_TIMEOUT,
            metadata=self.metadata,
        )
        self.epoch = response.session_epoch
        if response.config.heartbeat_interval_ms:
            self.interval = response.config.heartbeat_interval_ms / 1000.0
        usage = simulate_usage(DEFAULT_CAPACITY, dict.fromkeys(DEFAULT_CAPACITY, 0.2), 0, 0)
        self.heartbeat_msg = pb.NodeMessage(
            heartbeat=pb.Heartbeat(usage=pb.Resources(**usage), sent_ms=int(time.time() * 1000))
        )
        self.heartbeat_bytes = self.heartbeat_msg.SerializeToString()

    async def connect(self) -> None:
        """Open the Connect stream and send the first message (identity + heartbeat)."""
        self.call = self.stub.Connect(metadata=self.metadata)
        first = pb.NodeMessage()
        first.CopyFrom(self.heartbeat_msg)
        first.node_id = self.node_id
        first.session_epoch = self.epoch
        await self.call.write(first)
        self._reader = asyncio.ensure_future(self._read_loop())

    async def heartbeat(self) -> None:
        """Write one heartbeat on the stream."""
        async with self._write_lock:
            await self.call.write(self.heartbeat_msg)

    async def _read_loop(self) -> None:
        call = self.call
        try:
            while True:
                msg = await call.read()
                if msg is grpc.aio.EOF:
                    return
                if not msg.commands:
                    continue
                now = time.perf_counter()
                if self.on_commands is not None:
                    self.on_commands(self, msg.commands, now)
                reply = pb.NodeMessage(
                    acks=[pb.CommandAck(command_id=c.id, attempt=c.attempt) for c in msg.commands],
                    results=[
                        pb.CommandResult(command_id=c.id, attempt=c.attempt, success=True)
                        for c in msg.commands
                    ],
                )
                async with self._write_lock:
                    await call.write(reply)
                self.results_sent += len(msg.commands)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError) as exc:
            self.error = str(exc)[:200]

    async def close(self) -> None:
        """Half-close and cancel the stream."""
        if self.call is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.call.done_writing(), 1.0)
            self.call.cancel()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


class NodePool:
    """``n`` :class:`BenchNode` over ``default_channels(n)`` channels (as ``nexus-node`` does).

    ``labels`` go on every node (a run's :func:`run_labels`, which its commands select).
    ``target`` may name several replicas (``h1:p1,h2:p2``): channel ``j`` goes to target
    ``j mod n`` (at least one channel each), node ``i`` uses channel ``i mod channels``.
    A node whose Register answers ``UNAVAILABLE`` moves to a channel of the next target
    (counted in ``register_retries``); a stream lost later is the run's error, as before.
    """

    def __init__(
        self,
        target: str,
        n: int,
        auth: ClientAuth | None,
        *,
        prefix: str = "bench-",
        on_commands: Callable[[BenchNode, Any, float], None] | None = None,
        channels: int | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        auth = (auth or ClientAuth()).for_nodes()
        targets = parse_targets(target)
        count = max(channels or default_channels(n), len(targets))
        self.channels = [open_channel(targets[j % len(targets)], auth) for j in range(count)]
        stubs = [pb_grpc.NodeServiceStub(ch) for ch in self.channels]
        # The stubs of each target, in channel order: where a node goes when it moves on.
        self._by_target = [stubs[t :: len(targets)] for t in range(len(targets))]
        self.register_retries = 0
        width = max(5, len(str(n - 1)))
        ids = [f"{prefix}{i:0{width}d}" for i in range(n)]
        self.nodes = [
            BenchNode(
                node_id, stubs[i % len(stubs)], on_commands, labels, auth.node_metadata(node_id)
            )
            for i, node_id in enumerate(ids)
        ]

    async def start(self) -> None:
        """Register every node (bounded concurrency), then open every stream."""
        slots = asyncio.Semaphore(REGISTER_CONCURRENCY)

        async def one(i: int, node: BenchNode) -> None:
            async with slots:
                await self._register(i, node)
                await node.connect()

        await asyncio.gather(*(one(i, node) for i, node in enumerate(self.nodes)))

    async def _register(self, i: int, node: BenchNode) -> None:
        """Register node ``i``; on UNAVAILABLE try the next target, two passes at most."""
        n = len(self._by_target)
        first = (i % len(self.channels)) % n
        for k in range(2 * n):
            group = self._by_target[(first + k) % n]
            node.stub = group[i % len(group)]
            try:
                await node.register()
                return
            except grpc.aio.AioRpcError as err:
                if not fails_over(err.code()) or k == 2 * n - 1:
                    raise
                self.register_retries += 1
                await asyncio.sleep(backoff_delay(k // n, cap=2.0))

    async def close(self) -> None:
        """Close streams and channels."""
        await asyncio.gather(*(node.close() for node in self.nodes), return_exceptions=True)
        for ch in self.channels:
            await ch.close()


async def keep_alive(pool: NodePool, stop: asyncio.Event, slices: int = 50) -> None:
    """Heartbeat every node twice per advised interval so none goes down during a long run.

    The beats are spread evenly over the period, ``1/slices`` of the nodes at a time, as
    the nodes of a real fleet (each on its own clock, ``nexus-node`` adds jitter) spread
    theirs. Sending all N at once would put a burst of N messages on both processes every
    period and show up as a latency spike that no real fleet causes.
    """
    nodes = pool.nodes
    slices = max(1, min(slices, len(nodes)))
    while not stop.is_set():
        interval = min((node.interval for node in nodes), default=5.0)
        step = interval * 0.5 / slices
        for start in range(slices):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), step)
            if stop.is_set():
                return
            await asyncio.gather(
                *(node.heartbeat() for node in nodes[start::slices] if not node.error),
                return_exceptions=True,
            )
