"""The dispatcher: per-node command queues, in-flight sets, and the node streams.

Commands reach it only once their placement is durable. Each node has a lane in one
bounded :class:`~nexus_fast.queue.CommandQueue` (lane = its slot in the shared
:class:`~nexus_fast.core.slots.NodeSlots` + 1; lane 0 holds commands waiting for a node).
Pushing marks the node dirty; one loop callback per iteration sends every dirty node its
queued commands, while its stream has room, in ``ControlMessage`` batches of at most
``batch_size`` commands and ``max_message_bytes`` (estimated as payload + a fixed overhead;
always at least one command). Ids popped for a message the stream had no room for wait in
the node's carry and go first next time. A sent command is in flight on its node until its
result (or its node is lost), and is sent again when the node's stream reconnects: delivery
is at-least-once.

The state machine (``CommandService``) decides what goes where; the dispatcher only moves
ids between lanes and streams, and tells the service what it sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Final

from nexus_fast.clock import now_ms
from nexus_fast.codec.protowire import add_node_command
from nexus_fast.core.command_spec import MAX_ID_LEN, MAX_KIND_LEN
from nexus_fast.core.command_states import DISPATCHED, PLACED
from nexus_fast.core.nodes import NodeRegistry, Session
from nexus_fast.core.slots import NodeSlots
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.queue import CommandQueue

__all__ = ["Dispatcher"]

_UNPLACED: Final = 0  # lane of commands waiting for a node
# Bytes of one Command in a ControlMessage besides its payload: id and kind at their
# longest, attempt, deadline, field tags and lengths. An estimate that never undercounts,
# so messages are sized without a ByteSize() per command.
COMMAND_OVERHEAD: Final = MAX_ID_LEN + MAX_KIND_LEN + 32


class Dispatcher:
    """Queues commands per node and sends them down the nodes' streams; loop only."""

    def __init__(
        self,
        nodes: NodeRegistry,
        slots: NodeSlots,
        active: Mapping[str, pb.CommandRecord],
        *,
        capacity: int,
        priorities: int,
        batch_size: int,
        max_message_bytes: int,
        sent: Callable[[list[pb.CommandRecord]], None],
        payload_of: Callable[[pb.CommandRecord], bytes | None] | None = None,
    ) -> None:
        self._nodes = nodes
        self._slots = slots
        self._active = active
        self._batch_size = batch_size
        # Commands' bytes per ControlMessage, under the gRPC message limit.
        self._max_bytes = max_message_bytes
        self._sent = sent
        # Internal (agent) commands whose node payload is built now, not stored in the record.
        self._payload_of = payload_of
        self._queue: CommandQueue[str] = CommandQueue(capacity, lanes=priorities)
        # Nodes whose slot this dispatcher holds (acquired on first push, let go on removal).
        self._held: set[str] = set()
        # Dispatched or acked, per node, in dispatch order: re-sent when the node reconnects.
        self._inflight: dict[str, dict[str, None]] = {}
        # Popped from a node's lane but not sent (its stream was full): sent first next
        # time, each only while still PLACED on that node (checked when sent).
        self._carry: dict[str, list[str]] = {}
        self._dirty: set[str] = set()
        # Nodes left with queued or carried commands by the last dispatch (no stream, or no
        # room on it): the only ones the ticker retries, instead of a scan of every node.
        self._backlog: set[str] = set()
        self._handle: asyncio.Handle | None = None

    def __len__(self) -> int:
        return len(self._queue)

    def stop(self) -> None:
        """Cancel a scheduled dispatch (shutdown)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    # ------------------------------------------------------------ queues

    def push(self, record: pb.CommandRecord, node_id: str, slot: int = -1) -> None:
        """Queue a placed record for ``node_id`` (``slot``: its placement's, if known)."""
        if node_id not in self._held:
            self._held.add(node_id)
            slot = self._slots.acquire(node_id)
        elif slot < 0:
            slot = self._slots.get(node_id)  # type: ignore[assignment]  # held: present
        self._queue.push(slot + 1, record.spec.priority, record.id, record.id)
        self._dirty.add(node_id)
        self._schedule()

    def push_pending(self, record: pb.CommandRecord) -> None:
        """Queue a record that waits for a node."""
        self._queue.push(_UNPLACED, record.spec.priority, record.id, record.id)

    def pending_count(self) -> int:
        return self._queue.depth(_UNPLACED)

    def pop_pending(self, limit: int) -> list[str]:
        """Up to ``limit`` ids waiting for a node, by priority then age."""
        return self._queue.pop_batch(_UNPLACED, limit)

    def discard(self, command_id: str) -> None:
        """Take a queued command out of whichever lane holds it (no-op if none)."""
        self._queue.discard(command_id)

    def leave(self, node_id: str, command_id: str) -> None:
        """The command left its node (result, timeout, cancel): out of its lane and in-flight."""
        inflight = self._inflight.get(node_id)
        if inflight is not None:
            inflight.pop(command_id, None)
        self._queue.discard(command_id)

    def restore_inflight(self, node_id: str, command_id: str) -> None:
        """A command was in flight on its node before a restart: re-sent on reconnect."""
        self._inflight.setdefault(node_id, {})[command_id] = None

    def take_node(self, node_id: str) -> tuple[list[str], list[str]]:
        """Empty a lost node's lane and in-flight set: (queued ids, in-flight ids)."""
        queued = [i for i in self._carry.pop(node_id, ()) if self._placed_on(i, node_id)]
        slot = self._slots.get(node_id) if node_id in self._held else None
        if slot is not None:
            while ids := self._queue.pop_batch(slot + 1, 10_000):
                queued.extend(ids)
        return queued, list(self._inflight.pop(node_id, {}))

    def node_removed(self, node_id: str) -> None:
        """The node is gone (its lane already emptied by :meth:`take_node`): let its slot go."""
        self._inflight.pop(node_id, None)
        self._carry.pop(node_id, None)
        self._dirty.discard(node_id)
        self._backlog.discard(node_id)
        if node_id in self._held:
            self._held.discard(node_id)
            self._slots.release(node_id)

    def mark_backlog(self) -> None:
        """Retry nodes with queued commands (their stream had no room last time)."""
        if self._backlog:
            # A node still stuck is put back by the dispatch that retries it.
            self._dirty |= self._backlog
            self._backlog = set()
        if self._dirty:
            self._schedule()

    # ------------------------------------------------------------ streams

    def send_cancel(self, node_id: str, command_ids: list[str]) -> None:
        """Tell the node to stop ``command_ids`` (if it is connected)."""
        session = self._nodes.session_of(node_id)
        if session is not None:
            session.send(pb.ControlMessage(cancel_command_ids=command_ids))

    def session_opened(self, node: pb.Node, session: Session) -> None:
        """Re-send what the node may have missed, then whatever is queued for it."""
        inflight = self._inflight.get(node.id)
        if inflight:
            active = self._active
            message = pb.ControlMessage()
            size = 0
            for command_id in inflight:
                record = active.get(command_id)
                if record is None:
                    continue
                payload = self._payload(record)
                cost = len(payload) + COMMAND_OVERHEAD
                if message.commands and (
                    size + cost > self._max_bytes or len(message.commands) >= self._batch_size
                ):
                    session.send(message)
                    message, size = pb.ControlMessage(), 0
                add_node_command(message, record, payload)
                size += cost
            if message.commands:
                session.send(message)
        if node.id in self._held:
            self._dirty.add(node.id)
            self._schedule()

    def _payload(self, record: pb.CommandRecord) -> bytes:
        """The payload the node receives: built at dispatch (``payload_of``) or stored."""
        if record.agent_id and self._payload_of is not None:
            built = self._payload_of(record)
            if built is not None:
                return built
        return record.spec.payload

    def _placed_on(self, command_id: str, node_id: str) -> bool:
        record = self._active.get(command_id)
        return record is not None and record.state == PLACED and record.node_id == node_id

    def _schedule(self) -> None:
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_soon(self._dispatch_dirty)

    def _dispatch_dirty(self) -> None:
        """Send queued commands to connected nodes, one batched message per node."""
        self._handle = None
        dirty, self._dirty = self._dirty, set()
        sent: list[pb.CommandRecord] = []
        slots = self._slots
        queue, carry, backlog = self._queue, self._carry, self._backlog
        for node_id in dirty:
            slot = slots.get(node_id)
            if slot is None:
                continue
            session = self._nodes.session_of(node_id)
            if session is not None and not session.closed:
                self._dispatch_to(node_id, slot + 1, session, sent)
            if node_id in carry or queue.depth(slot + 1):
                backlog.add(node_id)
        if sent:
            self._sent(sent)

    def _dispatch_to(
        self, node_id: str, lane: int, session: Session, sent: list[pb.CommandRecord]
    ) -> None:
        batch_size = self._batch_size
        budget = self._max_bytes
        active = self._active
        queue = self._queue
        inflight = self._inflight.setdefault(node_id, {})
        ts = now_ms()
        while (node_id in self._carry or queue.depth(lane)) and session.has_room():
            if node_id in self._carry:
                ids, carried = self._carry.pop(node_id), True
            else:
                ids, carried = queue.pop_batch(lane, batch_size), False
            message = pb.ControlMessage()
            size = 0
            for n, command_id in enumerate(ids):
                record = active.get(command_id)
                if record is None:
                    continue
                # A carried id may have left this node meanwhile (timed out, re-placed).
                if carried and (record.state != PLACED or record.node_id != node_id):
                    continue
                payload = record.spec.payload if not record.agent_id else self._payload(record)
                cost = len(payload) + COMMAND_OVERHEAD
                if size + cost > budget and message.commands:
                    # Full by bytes: send it; the rest waits if the stream has no room.
                    if not session.send(message) or not session.has_room():
                        self._carry[node_id] = ids[n:]
                        return
                    message = pb.ControlMessage()
                    size = 0
                record.state = DISPATCHED
                record.dispatched_ms = ts
                record.updated_ms = ts
                inflight[command_id] = None
                add_node_command(message, record, payload)
                size += cost
                sent.append(record)
            if message.commands and not session.send(message):
                break  # the stream was closed for falling behind; reconnect re-sends in-flight
