"""The core services wired as ``server.py`` wires them, without sockets, for unit tests.

A real LmdbStore, NodeRegistry, Scheduler, CommandService and AgentService; node streams are
driven through ``register`` / ``open_session`` and read from ``Session.outbound``; node
reports go in through ``handle_reports``, as the gRPC adapter does.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from nexus_fast.config import SchedulerConfig
from nexus_fast.core.agents import AgentService
from nexus_fast.core.commands import COMMANDS_DB, CommandService, CommandSettings
from nexus_fast.core.fleet import SchedulerFeed
from nexus_fast.core.nodes import NodeRegistry, NodeSettings, Session
from nexus_fast.core.scheduler import Scheduler
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store import LmdbStore

T = TypeVar("T")

# Liveness is only checked when a test calls prune_once (the pruner task is not started).
NODE_TIMEOUT = 0.05


def run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(coro, 20))


async def until(cond: Callable[[], object], timeout: float = 3.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.005)


def res(cpu: float = 0.0, memory: float = 0.0, gpu: float = 0.0) -> pb.Resources:
    return pb.Resources(cpu=cpu, memory=memory, gpu=gpu)


def spec(key: str = "", kind: str = "run", **kw: Any) -> pb.CommandSpec:
    return pb.CommandSpec(idempotency_key=key, kind=kind, **kw)


def drain(session: Session) -> list[pb.ControlMessage]:
    out: list[pb.ControlMessage] = []
    while not session.outbound.empty():
        message = session.outbound.get_nowait()
        if message is not None:
            out.append(message)
    return out


def commands_in(messages: Sequence[pb.ControlMessage]) -> list[pb.Command]:
    return [c for m in messages for c in m.commands]


def cancels_in(messages: Sequence[pb.ControlMessage]) -> list[str]:
    return [i for m in messages for i in m.cancel_command_ids]


class Fabric:
    """Store, registry, scheduler, commands and agents wired as ``NexusServer`` wires them."""

    def __init__(
        self,
        path: Path,
        *,
        queue_capacity: int = 10_000,
        max_batch_size: int = 100,
        default_timeout: float = 10.0,
        default_max_attempts: int = 3,
    ) -> None:
        self.store = LmdbStore(path, map_size=1 << 24)
        self.nodes = NodeRegistry(
            self.store,
            NodeSettings(
                heartbeat_interval=0.01,
                node_timeout=NODE_TIMEOUT,
                down_retention=3600.0,
                max_batch_size=max_batch_size,
            ),
        )
        self.scheduler = Scheduler(SchedulerConfig(), 30.0, random.Random(1))
        self.commands = CommandService(
            self.store,
            self.nodes,
            self.scheduler,
            CommandSettings(
                default_timeout=default_timeout,
                default_max_attempts=default_max_attempts,
                max_payload_size=1024,
                final_retention=3600.0,
                max_batch_size=max_batch_size,
                queue_capacity=queue_capacity,
            ),
        )
        self.agents = AgentService(self.store, self.scheduler, self.commands)
        self.nodes.listeners += [SchedulerFeed(self.scheduler), self.commands, self.agents]
        self.sessions: dict[str, Session] = {}

    async def start(self) -> Fabric:
        await self.store.open()
        self.nodes.load()
        self.commands.load()
        self.agents.load()
        self.commands.start()
        self.agents.start()
        return self

    async def stop(self) -> None:
        await self.agents.stop()
        await self.commands.stop()
        await self.nodes.stop()
        await self.store.close()

    async def node(
        self,
        node_id: str,
        cpu: float = 8.0,
        gpu: float = 0.0,
        labels: dict[str, str] | None = None,
        connect: bool = True,
    ) -> Session | None:
        """Register (a new epoch) and, unless told not to, open a stream; drains the config."""
        node, _ = await self.nodes.register(
            pb.RegisterRequest(node_id=node_id, capacity=res(cpu, 64.0, gpu), labels=labels or {})
        )
        if not connect:
            return None
        session = await self.nodes.open_session(node_id, node.session_epoch)
        self.sessions[node_id] = session
        return session

    def report(self, node_id: str, **kw: Any) -> None:
        """What the gRPC adapter does with a NodeMessage carrying acks/results."""
        self.commands.handle_reports(node_id, pb.NodeMessage(**kw))

    def succeed(self, node_id: str, command_id: str, output: bytes = b"ok") -> None:
        self.report(
            node_id,
            results=[pb.CommandResult(command_id=command_id, success=True, output=output)],
        )

    def fail(self, node_id: str, command_id: str, error: str = "boom") -> None:
        self.report(
            node_id, results=[pb.CommandResult(command_id=command_id, success=False, error=error)]
        )

    def stored(self, command_id: str) -> pb.CommandRecord | None:
        raw = self.store.get(COMMANDS_DB, b"c/" + command_id.encode())
        return pb.CommandRecord.FromString(raw) if raw is not None else None

    def stored_count(self) -> int:
        return len(self.store.scan(COMMANDS_DB, prefix=b"c/"))

    async def flush(self) -> None:
        """Wait until every write made so far (staged ones too) is durable."""
        await self.commands.flush()
        await self.store.commit([])

    async def down(self, *node_ids: str, keep: Sequence[str] = ()) -> None:
        """Let ``node_ids`` miss their heartbeats (``keep`` heartbeat) and run the pruner."""
        await asyncio.sleep(NODE_TIMEOUT * 1.5)
        for node_id in keep:
            self.nodes.heartbeat(self.sessions[node_id], None)
        downed, _ = await self.nodes.prune_once()
        assert downed == len(node_ids)
        for node_id in node_ids:
            assert self.nodes.get(node_id).status == pb.NODE_STATUS_DOWN


async def fabric(path: Path, **kw: Any) -> Fabric:
    return await Fabric(path, **kw).start()


async def wait_sent(session: Session, count: int, timeout: float = 3.0) -> list[pb.Command]:
    """Read ``count`` commands off the node's stream (other messages are skipped)."""
    got: list[pb.Command] = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"node got {len(got)} of {count} commands")
        try:
            message = await asyncio.wait_for(session.outbound.get(), left)
        except TimeoutError:
            continue
        assert message is not None, "the node's stream was closed"
        got.extend(message.commands)
    return got
