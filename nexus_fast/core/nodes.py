"""Node registry: registration, sessions, heartbeats and the liveness pruner.

The registry keeps every node in memory (a ``Node`` protobuf per node) and
persists each state change, with the event describing it, in one store commit
before it answers. Heartbeats only touch memory: usage and last-seen are
written to the store when the node's status changes, not per heartbeat, so a
large fleet costs the store nothing while it is healthy.

Liveness is tracked with an ``OrderedDict`` kept in last-heartbeat order
(``move_to_end`` per heartbeat is O(1)); the pruner walks it from the stalest
end and stops at the first fresh node, so a tick costs O(expired), not O(fleet).

Status after a restart: nodes that were ``ready``/``draining`` keep that status
but are ``connected=False`` and get one ``node_timeout`` of grace from the
moment the server is up to reconnect; if they don't, the pruner marks them
``down`` as usual. A quick restart therefore causes no mass down/up flap.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Protocol

from google.protobuf.message import Message

from nexus_fast.clock import now_ms
from nexus_fast.codec.protowire import event
from nexus_fast.codec.tokens import decode_page_token, encode_page_token
from nexus_fast.core import acting
from nexus_fast.core.acting import ANONYMOUS
from nexus_fast.core.periodic import Periodic
from nexus_fast.core.staged_events import StagedEvents
from nexus_fast.errors import (
    InvalidArgument,
    NodeNotFound,
    PermissionDenied,
    StaleSession,
    Superseded,
    Unavailable,
)
from nexus_fast.logs import get_logger
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store.base import Delete, Put, StateStore
from nexus_fast.telemetry import metrics

log = get_logger("nodes")

NODES_DB: Final = "nodes"

MAX_NODE_ID_LEN: Final = 128
MAX_ADDRESS_LEN: Final = 256
MAX_LABELS: Final = 64
MAX_LABEL_KEY_LEN: Final = 63
MAX_LABEL_VALUE_LEN: Final = 256
MAX_VERSION_LEN: Final = 64
DEFAULT_PAGE_SIZE: Final = 500
MAX_PAGE_SIZE: Final = 5000
# Room a list response keeps under the message limit for its envelope (page token, totals,
# per-entry tags and lengths are counted per record; this covers the rest and gRPC framing).
PAGE_HEADROOM: Final = 64 * 1024
# Per repeated entry: field tag + length varint, on top of the record's own ByteSize().
_ENTRY_OVERHEAD: Final = 6
# The most capacity a node may report, per resource (config [nodes]); see NodeSettings.
DEFAULT_MAX_CAPACITY: Final = {
    "cpu": 4096.0,
    "memory": float(64 << 40),
    "gpu": 1024.0,
    "disk": float(1 << 50),
}
# Bound per node: a node that stops reading its stream cannot pin unbounded memory.
SESSION_QUEUE_SIZE: Final = 1024

# A live stream silent for this many heartbeat intervals counts as half-dead: its owner
# may replace it from another connection even when no credential proves who it is.
SILENT_INTERVALS: Final = 2.0

_NODE_ID_RE: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
_LABEL_KEY_RE: Final = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]*[A-Za-z0-9])?$")

STATUS_NAMES: Final = {
    pb.NODE_STATUS_READY: "ready",
    pb.NODE_STATUS_DRAINING: "draining",
    pb.NODE_STATUS_DOWN: "down",
    pb.NODE_STATUS_REMOVED: "removed",
}
STATUS_BY_NAME: Final = {name: value for value, name in STATUS_NAMES.items()}
_LIVE: Final = (pb.NODE_STATUS_READY, pb.NODE_STATUS_DRAINING)


def validate_node_id(node_id: str, field_name: str = "node_id") -> None:
    if not node_id:
        raise InvalidArgument(field_name, "must not be empty")
    if len(node_id) > MAX_NODE_ID_LEN:
        raise InvalidArgument(field_name, f"longer than {MAX_NODE_ID_LEN} characters")
    if not _NODE_ID_RE.match(node_id):
        raise InvalidArgument(
            field_name, "may contain only letters, digits and . _ : - (starting alphanumeric)"
        )


def validate_labels(labels: Mapping[str, str], field_name: str = "labels") -> None:
    if not labels:  # the common case; .items() of an empty protobuf map still costs ~3 us
        return
    if len(labels) > MAX_LABELS:
        raise InvalidArgument(field_name, f"more than {MAX_LABELS} labels")
    for key, value in labels.items():
        if not key or len(key) > MAX_LABEL_KEY_LEN or not _LABEL_KEY_RE.match(key):
            raise InvalidArgument(
                f"{field_name}[{key!r}]",
                f"label key must be 1..{MAX_LABEL_KEY_LEN} characters of letters, digits, . _ / -",
            )
        if len(value) > MAX_LABEL_VALUE_LEN:
            raise InvalidArgument(
                f"{field_name}[{key!r}]", f"label value longer than {MAX_LABEL_VALUE_LEN}"
            )


def validate_resources(res: pb.Resources, field_name: str) -> None:
    for name in ("cpu", "memory", "gpu", "disk"):
        value = getattr(res, name)
        if not math.isfinite(value) or value < 0:
            raise InvalidArgument(f"{field_name}.{name}", f"must be finite and >= 0, got {value}")


def validate_capacity(res: pb.Resources, limits: Mapping[str, float]) -> None:
    """A node's reported capacity: finite, >= 0, and within ``limits`` per resource."""
    validate_resources(res, "capacity")
    for name, limit in limits.items():
        value = getattr(res, name)
        if value > limit:
            raise InvalidArgument(
                f"capacity.{name}", f"{value:g} exceeds the limit of {limit:g} (nodes.max_{name})"
            )


def page_budget(max_message_size: int) -> int:
    """Bytes of records a list page may carry so its response fits ``max_message_size``."""
    return max(max_message_size - PAGE_HEADROOM, max_message_size // 2)


def entry_size(message: Message) -> int:
    """Bytes ``message`` adds to a response as one repeated entry."""
    return message.ByteSize() + _ENTRY_OVERHEAD


@dataclass(eq=False)
class Session:
    """One open Connect stream of a node: its bounded outbound queue and how it ends.

    The stream's writer takes messages from ``outbound``; ``None`` there means
    "end the stream", with ``close_reason`` as the status (None = clean end).
    """

    node_id: str
    epoch: int
    actor: str = ""  # the principal that opened it ("" = in-process, e.g. tests, benches)
    peer: str = ""  # the connection it runs on (gRPC peer string), for the takeover rule
    outbound: asyncio.Queue[pb.ControlMessage | None] = field(
        default_factory=lambda: asyncio.Queue(SESSION_QUEUE_SIZE)
    )
    closed: bool = False
    close_reason: Exception | None = None

    def close(self, reason: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self.outbound.full():
            # Closing anyway: a queued message may be dropped to make room for the end mark.
            self.outbound.get_nowait()
        self.outbound.put_nowait(None)

    def has_room(self) -> bool:
        """Room for a batch of commands, keeping a few slots for drain/cancel notices."""
        return not self.closed and self.outbound.qsize() < SESSION_QUEUE_SIZE - 16

    def send(self, message: pb.ControlMessage) -> bool:
        """Queue a message for the node; False (and the stream is ended) when full."""
        if self.closed:
            return False
        try:
            self.outbound.put_nowait(message)
            return True
        except asyncio.QueueFull:
            self.close(Unavailable("node stream fell behind; reconnect"))
            return False


@dataclass(eq=False)
class NodeEntry:
    record: pb.Node
    last_seen: float  # monotonic seconds
    session: Session | None = None


class NodeListener(Protocol):
    """Told about node changes, on the loop, after they are applied in memory."""

    def node_updated(self, node: pb.Node) -> None:
        """A node was added or its status, eligibility, labels or capacity changed."""

    def node_usage(self, node: pb.Node) -> None:
        """A heartbeat updated a node's usage (hot path: keep it O(1))."""

    def node_removed(self, node: pb.Node) -> None:
        """A node was deregistered, removed or expired."""

    def session_opened(self, node: pb.Node, session: Session) -> None:
        """A node opened a Connect stream: work queued for it can flow."""


@dataclass(frozen=True)
class NodeSettings:
    heartbeat_interval: float
    node_timeout: float
    down_retention: float
    max_batch_size: int
    # Register refuses a capacity above these (config [nodes]).
    max_capacity: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_MAX_CAPACITY))
    # Bytes of nodes one ListNodes page may carry (page_budget(server.max_message_size)).
    max_page_bytes: int = page_budget(4 * 1024 * 1024)


class NodeRegistry:
    """All nodes, their sessions and their liveness. Runs on the event loop only."""

    def __init__(self, store: StateStore, settings: NodeSettings) -> None:
        self._store = store
        self.settings = settings
        self._nodes: dict[str, NodeEntry] = {}
        # Live nodes in last-heartbeat order (stalest first).
        self._liveness: OrderedDict[str, None] = OrderedDict()
        # Down nodes in order of going down, for retention.
        self._down: OrderedDict[str, float] = OrderedDict()
        self._sorted_ids: list[str] | None = None
        self._status_counts: dict[int, int] = dict.fromkeys(STATUS_NAMES, 0)
        self._pruner = Periodic("node-pruner", self.prune_once, log)
        self.listeners: list[NodeListener] = []
        self._connection_events = StagedEvents(store)  # node.connected / node.disconnected
        # Node id -> when its last takeover refusal was reported (bounded by the fleet).
        self._refused_at: dict[str, float] = {}
        metrics.NODES.source = self.status_counts  # read at scrape time, nothing to keep in sync

    # ------------------------------------------------------------ start / stop

    def load(self) -> int:
        """Rebuild memory from the store. Live nodes get a fresh grace period."""
        now = time.monotonic()
        wall_ms = now_ms()
        for _, value in self._store.scan(NODES_DB):
            node = pb.Node.FromString(value)
            node.connected = False
            entry = NodeEntry(record=node, last_seen=now)
            self._nodes[node.id] = entry
            if node.status in _LIVE:
                self._liveness[node.id] = None
            else:
                gone_for = max(0.0, (wall_ms - node.status_changed_ms) / 1000.0)
                self._down[node.id] = now - gone_for
            self._status_counts[node.status] = self._status_counts.get(node.status, 0) + 1
        for entry in self._nodes.values():
            self._updated(entry.record)
        # Oldest-down first so retention can stop at the first young one.
        self._down = OrderedDict(sorted(self._down.items(), key=lambda item: item[1]))
        self._sorted_ids = None
        return len(self._nodes)

    def start(self, pruning_interval: float) -> None:
        self._pruner.start(pruning_interval)

    async def stop(self, end_streams: bool = True) -> None:
        """Stop the pruner and end every open node stream (nodes will reconnect)."""
        await self._pruner.stop()
        for entry in self._nodes.values() if end_streams else ():
            if entry.session is not None:
                entry.session.close(Unavailable("server shutting down"))

    # ------------------------------------------------------------ queries

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, node_id: str) -> pb.Node:
        entry = self._nodes.get(node_id)
        if entry is None:
            raise NodeNotFound(node_id)
        return entry.record

    def status_counts(self) -> dict[str, int]:
        """Nodes per status name (removed nodes are gone, so never counted)."""
        return {
            name: self._status_counts.get(status, 0)
            for status, name in STATUS_NAMES.items()
            if status != pb.NODE_STATUS_REMOVED
        }

    def connected_count(self) -> int:
        return sum(1 for e in self._nodes.values() if e.session is not None)

    def list_nodes(
        self,
        statuses: Iterable[int] = (),
        labels: Mapping[str, str] | None = None,
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[pb.Node], str, int]:
        """Nodes in id order, filtered; returns (page, next_token, total_matched)."""
        wanted = set(statuses)
        for status in wanted:
            if status not in STATUS_NAMES:
                raise InvalidArgument("statuses", f"unknown node status {status}")
        if labels:
            validate_labels(labels, "label_selector")
        if page_size < 0 or page_size > MAX_PAGE_SIZE:
            raise InvalidArgument("page_size", f"must be 0..{MAX_PAGE_SIZE}")
        size = page_size or DEFAULT_PAGE_SIZE
        after = decode_page_token(page_token)
        if self._sorted_ids is None:
            self._sorted_ids = sorted(self._nodes)
        ids = self._sorted_ids
        start = bisect.bisect_right(ids, after) if after else 0
        selector = list(labels.items()) if labels else []
        page: list[pb.Node] = []
        budget = self.settings.max_page_bytes
        matched = after_start = 0
        full = False  # the page is closed (count or bytes); later matches are only counted
        for i, node_id in enumerate(ids):
            node = self._nodes[node_id].record
            if not self._matches(node, wanted, selector):
                continue
            matched += 1
            if i >= start:
                after_start += 1
                if full or len(page) == size:
                    full = True
                    continue
                # The page must fit the message limit; it always takes at least one node.
                cost = entry_size(node)
                if page and cost > budget:
                    full = True
                    continue
                budget -= cost
                page.append(node)
        next_token = encode_page_token(page[-1].id) if after_start > len(page) else ""
        return page, next_token, matched

    @staticmethod
    def _matches(node: pb.Node, wanted: set[int], selector: list[tuple[str, str]]) -> bool:
        if wanted and node.status not in wanted:
            return False
        return not selector or all(node.labels.get(k) == v for k, v in selector)

    # ------------------------------------------------------------ node calls

    async def register(
        self, request: pb.RegisterRequest, actor: str = "", peer: str = ""
    ) -> tuple[pb.Node, pb.NodeConfig]:
        """Create or refresh a node; each call starts a new session epoch.

        ``actor`` (the caller's principal name) and ``peer`` (its connection) decide
        whether a live stream may be replaced (:meth:`_check_takeover`) and go on the
        events. PermissionDenied when the node's live stream belongs to someone else.
        """
        validate_node_id(request.node_id)
        if len(request.address) > MAX_ADDRESS_LEN:
            raise InvalidArgument("address", f"longer than {MAX_ADDRESS_LEN} characters")
        if len(request.version) > MAX_VERSION_LEN:
            raise InvalidArgument("version", f"longer than {MAX_VERSION_LEN} characters")
        validate_labels(request.labels)
        validate_capacity(request.capacity, self.settings.max_capacity)

        ts = now_ms()
        entry = self._nodes.get(request.node_id)
        previous = pb.Node()
        if entry is None:
            node = pb.Node(id=request.node_id, eligible=True, registered_ms=ts)
            entry = NodeEntry(record=node, last_seen=time.monotonic())
            self._nodes[node.id] = entry
            self._sorted_ids = None
            event_type = "node.registered"
            old_status = pb.NODE_STATUS_UNSPECIFIED
        else:
            await self._check_takeover(entry, actor, peer, "Register")
            node = entry.record
            previous.CopyFrom(node)
            event_type = "node.reregistered"
            old_status = node.status
        old_session = entry.session if entry is not None else None
        node.address = request.address
        node.labels.clear()
        node.labels.update(request.labels)
        node.capacity.CopyFrom(request.capacity)
        node.version = request.version
        node.session_epoch += 1
        node.last_heartbeat_ms = ts
        node.connected = False
        new_status = pb.NODE_STATUS_DRAINING if node.draining else pb.NODE_STATUS_READY
        self._set_status(entry, new_status, ts)  # before the events: they carry the node as is
        events: list[bytes] = []
        if event_type == "node.registered":
            events.append(_event(event_type, node, actor))
        else:
            changed = _changed(previous, node)
            events.append(
                _event(event_type, node, actor, {"changed": ",".join(changed)} if changed else None)
            )
            if changed:
                log.warning(
                    "node re-registered with changes",
                    extra={"node": node.id, "changed": changed, "principal": actor, "peer": peer},
                )
        if old_session is not None:
            if not old_session.closed:
                events.append(self._superseded_event(node, old_session, actor, peer, "Register"))
            # Ended before the write, as before: nothing is dispatched to it meanwhile.
            old_session.close(Superseded(f"superseded by session epoch {node.session_epoch}"))
            entry.session = None
        try:
            await self._store.commit(
                [Put(NODES_DB, node.id.encode(), node.SerializeToString(deterministic=True))],
                events,
                acting.records(node.id),
            )
        except BaseException:
            self._rollback(request.node_id, entry, previous, old_status)
            raise
        self._updated(node)
        return node, self.node_config()

    def node_config(self) -> pb.NodeConfig:
        return pb.NodeConfig(
            heartbeat_interval_ms=int(self.settings.heartbeat_interval * 1000),
            node_timeout_ms=int(self.settings.node_timeout * 1000),
            max_batch_size=self.settings.max_batch_size,
        )

    async def open_session(
        self, node_id: str, epoch: int, actor: str = "", peer: str = ""
    ) -> Session:
        """Attach a Connect stream; ends any older stream of the same node.

        The epoch fences stale streams; it is not a credential: a live stream is replaced
        only as :meth:`_check_takeover` allows (PermissionDenied otherwise).
        """
        validate_node_id(node_id, "node_id (first message)")
        entry = self._nodes.get(node_id)
        if entry is None:
            raise NodeNotFound(node_id)
        node = entry.record
        if epoch != node.session_epoch:
            raise StaleSession(
                f"session epoch {epoch} of node {node_id!r} is not current "
                f"(current is {node.session_epoch}); register again"
            )
        old = entry.session
        was_live = old is not None and not old.closed
        if old is not None:
            await self._check_takeover(entry, actor, peer, "Connect")  # returns without awaiting
            old.close(Superseded("superseded by a newer stream of the same session"))
        session = Session(node_id=node_id, epoch=epoch, actor=actor, peer=peer)
        entry.session = session
        if was_live:
            assert old is not None
            await self._store.commit(
                (), [self._superseded_event(node, old, actor, peer, "Connect")]
            )
        node.connected = True
        self._touch(entry)
        session.send(pb.ControlMessage(config=self.node_config()))
        if node.draining:
            session.send(
                pb.ControlMessage(drain=pb.DrainNotice(draining=True, reason=node.drain_reason))
            )
        if node.status == pb.NODE_STATUS_DOWN:
            ts = now_ms()
            self._set_status(entry, self._live_status(node), ts)
            await self._persist([node], [("node.up", node)])
            self._updated(node)
        if entry.session is session:
            self._connection_events.add(_event("node.connected", node, actor))  # not awaited
            for listener in self.listeners:
                listener.session_opened(node, session)
        return session

    def session_of(self, node_id: str) -> Session | None:
        entry = self._nodes.get(node_id)
        return entry.session if entry is not None else None

    def close_session(self, session: Session) -> None:
        """Called when a stream ends, whichever side ended it."""
        session.close(None)
        entry = self._nodes.get(session.node_id)
        if entry is not None and entry.session is session:
            entry.session = None
            entry.record.connected = False
            self._connection_events.add(_event("node.disconnected", entry.record, session.actor))

    def heartbeat(self, session: Session, heartbeat: pb.Heartbeat | None) -> Awaitable[None] | None:
        """Record that the node spoke: memory only, O(1).

        Any message counts as a sign of life, not only heartbeats: a node busy sending
        results while its heartbeat waits in a queue must not be declared down.
        ``heartbeat`` (when the message has one) also updates usage.

        Returns an awaitable only when the node comes back from ``down``: that
        status change must be persisted, and the caller awaits it.
        """
        entry = self._nodes.get(session.node_id)
        if entry is None or entry.session is not session:
            return None
        node = entry.record
        node.last_heartbeat_ms = now_ms()
        self._touch(entry)
        if heartbeat is not None and heartbeat.HasField("usage"):
            node.usage.CopyFrom(heartbeat.usage)
            for listener in self.listeners:
                listener.node_usage(node)
        if node.status == pb.NODE_STATUS_DOWN:
            # Back from down on the same stream: a status change, persisted by the caller.
            self._set_status(entry, self._live_status(node), node.last_heartbeat_ms)
            self._updated(node)
            return self._persist([node], [("node.up", node)])
        return None

    def validate_usage(self, heartbeat: pb.Heartbeat) -> None:
        if heartbeat.HasField("usage"):
            validate_resources(heartbeat.usage, "heartbeat.usage")

    async def deregister(self, node_id: str, epoch: int, actor: str = "", peer: str = "") -> None:
        """Remove a node at its own request; the live stream's owner rule applies."""
        validate_node_id(node_id)
        entry = self._nodes.get(node_id)
        if entry is None:
            raise NodeNotFound(node_id)
        if epoch != entry.record.session_epoch:
            raise StaleSession(
                f"session epoch {epoch} of node {node_id!r} is not current "
                f"(current is {entry.record.session_epoch})"
            )
        await self._check_takeover(entry, actor, peer, "Deregister")
        await self._remove(entry, "node.deregistered", None, actor)

    # ------------------------------------------------------------ operator calls

    async def drain(self, node_id: str, drain: bool, reason: str, actor: str = "") -> pb.Node:
        validate_node_id(node_id)
        if len(reason) > 1024:
            raise InvalidArgument("reason", "longer than 1024 characters")
        entry = self._nodes.get(node_id)
        if entry is None:
            raise NodeNotFound(node_id)
        node = entry.record
        if node.draining == drain and node.drain_reason == reason:
            return node
        node.draining = drain
        node.drain_reason = reason if drain else ""
        if node.status in _LIVE:
            self._set_status(entry, self._live_status(node), now_ms())
        await self._persist([node], [("node.drain" if drain else "node.undrain", node)], actor)
        self._updated(node)
        if entry.session is not None:
            entry.session.send(
                pb.ControlMessage(drain=pb.DrainNotice(draining=drain, reason=node.drain_reason))
            )
        return node

    async def set_eligibility(self, node_id: str, eligible: bool, actor: str = "") -> pb.Node:
        validate_node_id(node_id)
        entry = self._nodes.get(node_id)
        if entry is None:
            raise NodeNotFound(node_id)
        node = entry.record
        if node.eligible != eligible:
            node.eligible = eligible
            await self._persist([node], [("node.eligibility", node)], actor)
            self._updated(node)
        return node

    async def remove(self, node_id: str, actor: str = "") -> None:
        validate_node_id(node_id)
        entry = self._nodes.get(node_id)
        if entry is None:
            raise NodeNotFound(node_id)
        await self._remove(entry, "node.removed", NodeNotFound(node_id), actor)

    # ------------------------------------------------------------ pruner

    async def prune_once(self) -> tuple[int, int]:
        """Mark stale nodes down and drop long-down ones; returns (downed, removed)."""
        now = time.monotonic()
        deadline = now - self.settings.node_timeout
        ts = now_ms()
        downed: list[pb.Node] = []
        for node_id in self._liveness:
            entry = self._nodes[node_id]
            if entry.last_seen > deadline:
                break  # everything after this one heartbeated more recently
            downed.append(entry.record)
        for node in downed:
            entry = self._nodes[node.id]
            self._set_status(entry, pb.NODE_STATUS_DOWN, ts)
            self._updated(node)
        expired: list[str] = []
        retention_deadline = now - self.settings.down_retention
        for node_id, since in self._down.items():
            if since > retention_deadline:
                break
            expired.append(node_id)
        ops: list[Put | Delete] = [
            Put(NODES_DB, n.id.encode(), n.SerializeToString(deterministic=True)) for n in downed
        ]
        events = [_event("node.down", n) for n in downed]
        for node_id in expired:
            entry = self._nodes.pop(node_id)
            self._down.pop(node_id, None)
            self._refused_at.pop(node_id, None)
            self._count(entry.record.status, -1)
            entry.record.status = pb.NODE_STATUS_REMOVED
            ops.append(Delete(NODES_DB, node_id.encode()))
            events.append(_event("node.expired", entry.record))
            for listener in self.listeners:
                listener.node_removed(entry.record)
        if expired:
            self._sorted_ids = None
        if ops:
            await self._store.commit(ops, events)
            if downed:
                log.info("nodes went down", extra={"count": len(downed)})
            if expired:
                log.info("down nodes expired", extra={"count": len(expired)})
        return len(downed), len(expired)

    # ------------------------------------------------------------ internals

    @staticmethod
    def _live_status(node: pb.Node) -> int:
        return pb.NODE_STATUS_DRAINING if node.draining else pb.NODE_STATUS_READY

    def _touch(self, entry: NodeEntry) -> None:
        entry.last_seen = time.monotonic()
        node_id = entry.record.id
        if node_id in self._liveness:
            self._liveness.move_to_end(node_id)

    def _set_status(self, entry: NodeEntry, status: int, ts: int) -> None:
        node = entry.record
        old = node.status
        node_id = node.id
        if old == status:
            return
        if old != pb.NODE_STATUS_UNSPECIFIED:
            self._count(old, -1)
        self._count(status, +1)
        node.status = status  # type: ignore[assignment]
        node.status_changed_ms = ts
        if status in _LIVE:
            self._down.pop(node_id, None)
            self._liveness[node_id] = None
            self._liveness.move_to_end(node_id)
            entry.last_seen = time.monotonic()
        else:
            self._liveness.pop(node_id, None)
            if status == pb.NODE_STATUS_DOWN:
                self._down[node_id] = time.monotonic()

    def _updated(self, node: pb.Node) -> None:
        for listener in self.listeners:
            listener.node_updated(node)

    def _count(self, status: int, delta: int) -> None:
        self._status_counts[status] = self._status_counts.get(status, 0) + delta

    def _rollback(self, node_id: str, entry: NodeEntry, previous: pb.Node, old: int) -> None:
        """Undo an in-memory change whose commit failed, so memory matches disk."""
        if old == pb.NODE_STATUS_UNSPECIFIED:
            self._nodes.pop(node_id, None)
            self._liveness.pop(node_id, None)
            self._count(entry.record.status, -1)
            self._sorted_ids = None
        else:
            self._set_status(entry, old, previous.status_changed_ms)
            entry.record.CopyFrom(previous)

    async def _remove(
        self, entry: NodeEntry, event_type: str, reason: Exception | None, actor: str = ""
    ) -> None:
        node = entry.record
        node_id = node.id
        if entry.session is not None:
            entry.session.close(reason)
            entry.session = None
        self._nodes.pop(node_id, None)
        self._liveness.pop(node_id, None)
        self._down.pop(node_id, None)
        self._count(node.status, -1)
        self._sorted_ids = None
        node.status = pb.NODE_STATUS_REMOVED
        node.status_changed_ms = now_ms()
        node.connected = False
        for listener in self.listeners:
            listener.node_removed(node)
        self._refused_at.pop(node_id, None)
        await self._store.commit(
            [Delete(NODES_DB, node_id.encode())],
            [_event(event_type, node, actor)],
            acting.records(node_id),
        )

    async def _persist(
        self, nodes: Sequence[pb.Node], events: Sequence[tuple[str, pb.Node]], actor: str = ""
    ) -> None:
        ops = [Put(NODES_DB, n.id.encode(), n.SerializeToString(deterministic=True)) for n in nodes]
        await self._store.commit(
            ops,
            [_event(t, n, actor) for t, n in events],
            acting.records(lambda: ",".join(n.id for n in nodes)),
        )

    # ------------------------------------------------------------ session ownership

    async def _check_takeover(self, entry: NodeEntry, actor: str, peer: str, call: str) -> None:
        """Refuse (PermissionDenied) a call that would replace the node's live stream.

        A stream silent for :data:`SILENT_INTERVALS` heartbeat intervals is half-dead,
        not live: anyone the permission check let through may replace it (so a node
        whose credential changed is never locked out by its own dead stream). A live
        stream is replaced only by the principal that opened it, and, when that is
        :data:`ANONYMOUS` (authentication off: nothing proves who it is), only from its
        own connection (same gRPC peer ``ip:port``, so the same client process). So the
        public epoch never takes a healthy stream. Returns without awaiting when allowed.
        """
        session = entry.session
        if session is None or session.closed:
            return
        if time.monotonic() - entry.last_seen > SILENT_INTERVALS * self.settings.heartbeat_interval:
            return
        if actor != session.actor:
            reason = "its live stream belongs to another principal"
        elif actor == ANONYMOUS and peer != session.peer:
            reason = (
                "its live stream is healthy and nothing proves the caller is the same node "
                "(authentication is off); retry once that stream has ended"
            )
        else:
            return
        node = entry.record
        now = time.monotonic()
        last = self._refused_at.get(node.id)
        # One event and log line per node per heartbeat interval: refusals cannot flood either.
        if last is None or now - last >= self.settings.heartbeat_interval:
            self._refused_at[node.id] = now
            details = {"call": call, "principal": actor, "owner": session.actor}
            details.update(peer=peer, owner_peer=session.peer)
            log.warning("node takeover refused", extra={"node": node.id, **details})
            await self._store.commit((), [_event("node.takeover_refused", node, actor, details)])
        raise PermissionDenied(f"{call} refused for node {node.id!r}: {reason}")

    def _superseded_event(
        self, node: pb.Node, old: Session, actor: str, peer: str, call: str
    ) -> bytes:
        """The ``node.superseded`` event (and its WARNING line) for a replaced live stream."""
        details = {
            "call": call,
            "old_principal": old.actor,
            "new_principal": actor,
            "old_peer": old.peer,
            "new_peer": peer,
            "old_epoch": str(old.epoch),
            "new_epoch": str(node.session_epoch),
        }
        log.warning("node stream superseded", extra={"node": node.id, **details})
        return _event("node.superseded", node, actor, details)


def _changed(before: pb.Node, after: pb.Node) -> list[str]:
    """Which of address, labels and capacity a re-registration changed."""
    changed = []
    if before.address != after.address:
        changed.append("address")
    if dict(before.labels) != dict(after.labels):
        changed.append("labels")
    if before.capacity != after.capacity:
        changed.append("capacity")
    return changed


def _event(
    event_type: str, node: pb.Node, actor: str = "", details: Mapping[str, str] | None = None
) -> bytes:
    body = node.SerializeToString(deterministic=True)
    return event("node", event_type, node.id, body, now_ms(), actor, details)
