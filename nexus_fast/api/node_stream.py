"""What a node stream does to the core, whichever transport carries it.

``NodeService.Connect`` (a node's own gRPC stream) and the leader's
:class:`~nexus_fast.cluster.relay.RelayServicer` (node streams a follower holds, relayed
over one stream per follower) both open a session, hand every NodeMessage to the core and
close the session through this one class, so the two paths cannot drift apart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Protocol

import grpc

from nexus_fast import failpoints
from nexus_fast.core.agents import AgentService
from nexus_fast.core.commands import CommandService
from nexus_fast.core.nodes import NodeRegistry, Session
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.telemetry import metrics

__all__ = ["NodeRelay", "NodeStreams", "write_outbound"]


class NodeStreams:
    """Open, feed and close node sessions on the core (runs on the event loop)."""

    def __init__(
        self, registry: NodeRegistry, commands: CommandService, agents: AgentService
    ) -> None:
        self.registry = registry
        self._commands = commands
        self._agents = agents
        # Counter children looked up once: this runs for every message of every node.
        kinds = ("heartbeat", "ack", "result", "agent_status")
        self._counted = {kind: metrics.NODE_MESSAGES.labels(kind=kind) for kind in kinds}

    async def open(self, node_id: str, epoch: int, actor: str, peer: str) -> Session:
        """Attach a stream (``NodeRegistry.open_session``: epoch fence, takeover rule)."""
        return await self.registry.open_session(node_id, epoch, actor, peer)

    def close(self, session: Session) -> None:
        """The stream ended, whichever side ended it: the node counts as disconnected."""
        self.registry.close_session(session)

    def handle(self, session: Session, message: pb.NodeMessage) -> Awaitable[None] | None:
        """Apply one NodeMessage; synchronous unless the node comes back from ``down``.

        Returns an awaitable only then (that status change is persisted first, so its
        event precedes what the message reports); the caller awaits it before the next
        message of the same stream. Raises NexusError (e.g. bad usage) to end the stream.
        """
        heartbeat = None
        if message.HasField("heartbeat"):
            heartbeat = message.heartbeat
            self.registry.validate_usage(heartbeat)
            self._counted["heartbeat"].inc()
        came_back = self.registry.heartbeat(session, heartbeat)
        if came_back is not None:
            return self._after(came_back, session, message)
        self._reports(session, message)
        return None

    async def _after(
        self, came_back: Awaitable[None], session: Session, message: pb.NodeMessage
    ) -> None:
        await came_back
        self._reports(session, message)

    def _reports(self, session: Session, message: pb.NodeMessage) -> None:
        if message.acks or message.results:
            counted = self._counted
            counted["ack"].inc(len(message.acks))
            counted["result"].inc(len(message.results))
            self._commands.handle_reports(session.node_id, message)
        if message.agents:
            self._counted["agent_status"].inc(len(message.agents))
            self._agents.handle_reports(session.node_id, message.agents)


async def write_outbound(context: grpc.aio.ServicerContext, session: Session) -> None:
    """Write ``session.outbound`` to the node's stream until its end mark (None)."""
    outbound = session.outbound
    while True:
        message = await outbound.get()
        if message is None:
            return
        if failpoints.ACTIVE:
            await failpoints.hit_async("stream.send")
        try:
            await context.write(message)
        except grpc.aio.InternalError:
            # The call ended under a write that waited on the node's flow control (a node
            # that stopped reading, cut off, then its stream cancelled or its connection
            # gone): grpc.aio fails the write with ExecuteBatchError. Nothing can reach the
            # node any more, and there is no call left to give a status to: end as a
            # cancelled call does (quietly), not as a handler error with a traceback.
            raise asyncio.CancelledError from None


class NodeRelay(Protocol):
    """Where ``NodeService.Connect`` hands a node stream on a follower replica."""

    def active(self) -> bool:
        """True while this replica relays node streams (a follower); False: serve locally."""

    async def serve(
        self, context: grpc.aio.ServicerContext, first: pb.NodeMessage, actor: str
    ) -> None:
        """Hold the node's stream (``first`` already checked) until it ends."""
