"""The core services wired as ``server.py`` wires them, without sockets or listeners.

Store, node registry, scheduler, commands and agents on one loop: unit tests and
``bench/core_commands.py`` drive the core through it in process. Node streams are
opened with :meth:`CoreFabric.node` and read from ``Session.outbound``; node reports go
in through ``commands.handle_reports``, as the gRPC adapter does.
"""

from __future__ import annotations

import random

from nexus_fast.config import SchedulerConfig
from nexus_fast.core.agents import AgentService
from nexus_fast.core.commands import CommandService, CommandSettings
from nexus_fast.core.fleet import SchedulerFeed
from nexus_fast.core.nodes import NodeRegistry, NodeSettings, Session, page_budget
from nexus_fast.core.scheduler import Scheduler
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store.base import StateStore


class CoreFabric:
    """Registry, scheduler, commands and agents over ``store``, wired as the server does."""

    def __init__(
        self,
        store: StateStore,
        *,
        queue_capacity: int = 10_000,
        max_batch_size: int = 100,
        default_timeout: float = 10.0,
        default_max_attempts: int = 3,
        max_payload_size: int = 1024,
        max_message_size: int = 4 * 1024 * 1024,
        node_timeout: float = 30.0,
        seed: int = 1,
    ) -> None:
        self.store = store
        self.nodes = NodeRegistry(
            store,
            NodeSettings(
                heartbeat_interval=0.01,
                node_timeout=node_timeout,
                down_retention=3600.0,
                max_batch_size=max_batch_size,
            ),
        )
        self.scheduler = Scheduler(SchedulerConfig(), 30.0, random.Random(seed))
        self.commands = CommandService(
            store,
            self.nodes,
            self.scheduler,
            CommandSettings(
                default_timeout=default_timeout,
                default_max_attempts=default_max_attempts,
                max_payload_size=max_payload_size,
                final_retention=3600.0,
                max_batch_size=max_batch_size,
                queue_capacity=queue_capacity,
                max_page_bytes=page_budget(max_message_size),
            ),
        )
        self.agents = AgentService(store, self.scheduler, self.commands)
        self.nodes.listeners += [SchedulerFeed(self.scheduler), self.commands, self.agents]
        self.sessions: dict[str, Session] = {}

    async def start(self) -> CoreFabric:
        """Open the store, load every service's state and start their tickers."""
        await self.store.open()
        self.nodes.load()
        self.commands.load()
        self.agents.load()
        self.commands.start()
        self.agents.start()
        return self

    async def stop(self) -> None:
        """Stop the services (flushing their writes), then close the store."""
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
        """Register (a new epoch) and, unless told not to, open a stream."""
        node, _ = await self.nodes.register(
            pb.RegisterRequest(
                node_id=node_id,
                capacity=pb.Resources(cpu=cpu, memory=64.0, gpu=gpu),
                labels=labels or {},
            )
        )
        if not connect:
            return None
        session = await self.nodes.open_session(node_id, node.session_epoch)
        self.sessions[node_id] = session
        return session

    async def flush(self) -> None:
        """Wait until every write made so far (staged ones too) is durable."""
        await self.commands.flush()
        await self.store.commit([])
