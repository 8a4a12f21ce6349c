"""The core services wired as ``server.py`` wires them, without sockets, for unit tests.

:class:`~nexus_fast.core.assembly.CoreFabric` on a real LmdbStore, with helpers to report,
read what was stored and take nodes down.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

import uvloop

from nexus_fast.core.assembly import CoreFabric
from nexus_fast.core.commands import COMMANDS_DB
from nexus_fast.core.nodes import Session
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


class Fabric(CoreFabric):
    """The core as ``NexusServer`` wires it, on an LmdbStore at ``path``, with test helpers."""

    def __init__(self, path: Path, **kw: Any) -> None:
        super().__init__(LmdbStore(path, map_size=1 << 24), node_timeout=NODE_TIMEOUT, **kw)

    async def start(self) -> Fabric:
        await super().start()
        return self

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
