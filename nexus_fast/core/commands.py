"""Commands: submit, place, dispatch, ack, result, retry — durable at every step.

Lifecycle: ``pending -> placed -> dispatched -> acked -> succeeded | failed |
timed_out | cancelled``. The rules that make it trustworthy:

* A submission is answered only after its records and events are committed
  (one group-committed write for the whole batch), and a command reaches a
  node's stream only after that commit: a node never runs a command the store
  could forget.
* Delivery is at-least-once: commands in flight on a node are sent again when
  its stream reconnects, and after a restart. Nodes de-duplicate by id, so
  execution is exactly-once per node.
* Later transitions (dispatched, acked, final) are committed without holding
  anything up; the single writer applies them in order, so the last state wins.
* Every wait is bounded: each stage (pending, placed, dispatched) has a deadline
  of the command's timeout; an expired stage uses up an attempt, and the last
  attempt ends in ``timed_out``. A node going down retries its commands elsewhere.

This module is the state machine: validation, placement, transitions, deadlines,
waiters and metrics. It hands records to the :class:`~nexus_fast.core.command_log.CommandLog`
(persistence, group commit) and, once durable, to the
:class:`~nexus_fast.core.dispatch.Dispatcher` (per-node queues, in-flight, streams). A
submit walks one way: API -> here (validate, place) -> log (commit) -> dispatcher (queue)
-> the node's stream.
"""

from __future__ import annotations

import dataclasses
import heapq
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from nexus_fast import failpoints
from nexus_fast.clock import now_ms
from nexus_fast.commands import apply_acks
from nexus_fast.core.command_log import COMMANDS_DB, CommandLog
from nexus_fast.core.command_spec import (
    MAX_PRIORITY,
    cap_result,
    placement_requests,
    same_spec,
    validate_spec,
)
from nexus_fast.core.command_states import (
    ACKED,
    CANCELLED,
    DISPATCHED,
    FAILED,
    FINAL_STATES,
    PENDING,
    PLACED,
    STATE_NAMES,
    SUCCEEDED,
    TIMED_OUT,
)
from nexus_fast.core.dispatch import Dispatcher
from nexus_fast.core.nodes import (
    NodeRegistry,
    Session,
    entry_size,
    page_budget,
    validate_node_id,
)
from nexus_fast.core.periodic import Periodic
from nexus_fast.core.scheduler import Scheduler
from nexus_fast.core.waiters import CommandWaiters
from nexus_fast.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    QueueFull,
)
from nexus_fast.logs import get_logger
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store.base import StateStore
from nexus_fast.telemetry import metrics
from nexus_fast.telemetry import trace_context as traces

__all__ = [
    "ACKED",
    "CANCELLED",
    "COMMANDS_DB",
    "DISPATCHED",
    "FAILED",
    "FINAL_STATES",
    "PENDING",
    "PLACED",
    "STATE_NAMES",
    "SUCCEEDED",
    "TIMED_OUT",
    "CommandService",
    "CommandSettings",
]

log = get_logger("commands")

Specs = Sequence[pb.CommandSpec]
MAX_WAIT_IDS: Final = 10_000
MAX_LIST_PAGE: Final = 5000
DEFAULT_LIST_PAGE: Final = 500
# A list call reads at most this many records before returning a partial page.
_LIST_SCAN_LIMIT: Final = 50_000
_TICK: Final = 0.1


@dataclass(frozen=True)
class CommandSettings:
    default_timeout: float
    default_max_attempts: int
    max_payload_size: int
    final_retention: float
    max_batch_size: int
    queue_capacity: int
    # Node-reported output and error text are cut to this many bytes (and flagged).
    max_output_size: int = 64 * 1024
    # Bytes of records one ListCommands page may carry (page_budget(server.max_message_size)).
    max_page_bytes: int = page_budget(4 * 1024 * 1024)


class CommandService:
    """Owns every non-final command; runs on the event loop only."""

    def __init__(
        self,
        store: StateStore,
        nodes: NodeRegistry,
        scheduler: Scheduler,
        settings: CommandSettings,
    ) -> None:
        self._store = store
        self._nodes = nodes
        self._scheduler = scheduler
        self.settings = settings
        self._active: dict[str, pb.CommandRecord] = {}
        self._log = CommandLog(store)
        self._dispatch = Dispatcher(
            nodes,
            scheduler.slots,
            self._active,
            capacity=settings.queue_capacity,
            priorities=MAX_PRIORITY + 1,
            batch_size=settings.max_batch_size,
            max_message_bytes=settings.max_page_bytes,
            sent=self._dispatched,
            payload_of=self._node_payload,
        )
        # (deadline, seq, id, stage); an entry is live while its stage number is current.
        self._deadlines: list[tuple[float, int, str, int]] = []
        self._stage: dict[str, int] = {}
        self._seq = 0
        self._waiters = CommandWaiters()
        # A final state reaches WaitCommands only once durable (docs/reliability.md).
        self._log.on_durable = self._waiters.notify
        self._pending_dirty = False
        self._submitted_at: dict[str, float] = {}
        self._ticker = Periodic("commands", self._tick, log)
        # Children looked up once (labels() is a dict lookup and a check), and exported
        # at zero so rate() works from the first scrape.
        self._processed: dict[int, metrics.LoopCounter] = {
            state: metrics.COMMANDS_PROCESSED.labels(status=STATE_NAMES[state])
            for state in FINAL_STATES
        }
        # Generated ids: a random per-process prefix and a counter (uuid4 costs more and
        # sorts randomly; these also list in submission order).
        self._id_prefix = f"{now_ms():x}{os.urandom(4).hex()}-"
        self._id_counter = itertools.count(1)
        # Internal callers (agents) hear about final states here.
        self.on_final: list[Callable[[pb.CommandRecord], None]] = []
        # Node-bound payloads built at dispatch, by kind: the record keeps a reference (agent.start
        # carries the agent's spec, stored once per agent, not in each replica's command).
        self.node_payloads: dict[str, Callable[[pb.CommandRecord], bytes | None]] = {}

    # ------------------------------------------------------------ start / stop

    def load(self) -> int:
        """Restore every non-final command after a restart; returns how many."""
        for record in self._log.load():
            self._active[record.id] = record
            self._restore(record)
        metrics.COMMAND_QUEUE_DEPTH.set(len(self._dispatch))
        return len(self._active)

    def _restore(self, record: pb.CommandRecord) -> None:
        node_id = record.node_id
        state = record.state
        if state in (PLACED, DISPATCHED, ACKED) and self._node_live(node_id):
            self._scheduler.reserve(node_id, record.spec.placement.request, self._spread(record))
            if state == PLACED:
                self._dispatch.push(record, node_id)
            else:
                # The restart gives the attempt a fresh deadline, on the node's side too.
                record.dispatched_ms = now_ms()
                self._dispatch.restore_inflight(node_id, record.id)
            self._set_deadline(record)
            return
        # Its node is down or gone (or it never had one): place it again.
        if state == PLACED:
            record.attempt -= 1  # it never reached the node
        elif state in (DISPATCHED, ACKED):
            if record.attempt >= record.spec.max_attempts:
                self._finish(record, FAILED, f"node {node_id} was lost", left=True)
                return
            record.tried_nodes.append(node_id)
        record.state = PENDING
        record.node_id = ""
        self._push_pending(record)
        self._set_deadline(record)

    def _node_live(self, node_id: str) -> bool:
        if not node_id:
            return False
        try:
            status = self._nodes.get(node_id).status
        except NotFound:
            return False
        return status in (pb.NODE_STATUS_READY, pb.NODE_STATUS_DRAINING)

    def start(self) -> None:
        self._ticker.start(_TICK)
        self._pending_dirty = True

    async def stop(self) -> None:
        self._waiters.stop()  # WaitCommands calls end now, not at the drain deadline
        await self._ticker.stop()
        self._dispatch.stop()
        await self.flush()

    async def halt(self) -> None:
        """Demotion (cluster): stop timers and writes; nothing is flushed (not ours now)."""
        self._log.halt()
        self._waiters.stop()
        self._dispatch.stop()
        await self._ticker.stop()

    async def flush(self) -> None:
        """Commit the staged writes now and wait until every write so far is durable."""
        await self._log.flush()

    # ------------------------------------------------------------ queries

    @property
    def active_count(self) -> int:
        return len(self._active)

    def active_records(self) -> Iterable[pb.CommandRecord]:
        return self._active.values()

    def get(self, command_id: str) -> pb.CommandRecord:
        if not command_id:
            raise InvalidArgument("id", "must not be empty")
        record = self._active.get(command_id) or self._log.read(command_id)
        if record is None:
            raise NotFound(f"command {command_id!r} not found")
        return record

    def list_commands(
        self,
        states: Iterable[int] = (),
        node_id: str = "",
        page_size: int = 0,
        page_token: str = "",
    ) -> tuple[list[pb.CommandRecord], str]:
        """Commands in id order (durable ones), filtered; (page, next_token)."""
        wanted = set(states)
        for state in wanted:
            if state not in STATE_NAMES:
                raise InvalidArgument("states", f"unknown command state {state}")
        if page_size > MAX_LIST_PAGE:
            raise InvalidArgument("page_size", f"must be 0..{MAX_LIST_PAGE}")
        size = page_size or DEFAULT_LIST_PAGE
        # The page must also fit the message limit: it ends before the record that would
        # overflow it (and always holds one, which the payload and output caps keep small).
        budget = self.settings.max_page_bytes
        after = page_token or None
        page: list[pb.CommandRecord] = []
        scanned = 0
        last = ""
        finishing = self._log.finishing
        full = False
        while not full and scanned < _LIST_SCAN_LIMIT:
            chunk = self._log.scan(after, 1000)
            if not chunk:
                return page, ""
            for key, value in chunk:
                record = (
                    self._active.get(key)
                    or finishing.get(key)
                    or pb.CommandRecord.FromString(value)
                )
                if (not wanted or record.state in wanted) and (
                    not node_id or record.node_id == node_id
                ):
                    cost = entry_size(record)
                    if page and cost > budget:
                        full = True  # resume at this record: the token is the one before it
                        break
                    budget -= cost
                    page.append(record)
                scanned += 1
                last = key
                if len(page) == size:
                    full = True
                    break
            after = last
        more = bool(self._log.scan(after, 1))
        return page, last if more else ""

    # ------------------------------------------------------------ submit

    async def submit(
        self, specs: Specs, actor: str = "", trace: traces.TraceContext | None = None
    ) -> pb.SubmitCommandsResponse:
        """Validate, de-duplicate, place, persist ``actor``'s batch (with its ``trace``)."""
        self._validate_batch(specs)
        answers: list[tuple[pb.CommandRecord, bool]] = []  # (record, duplicate)
        new: list[pb.CommandRecord] = []
        seen = self._known_keys(specs)
        for i, spec in enumerate(specs):
            key = spec.idempotency_key
            existing = seen.get(key) if key else None
            if existing is not None:
                if not same_spec(existing.spec, spec):
                    raise AlreadyExists(
                        f"commands[{i}].idempotency_key: {key!r} is already used by "
                        f"command {existing.id!r} with a different spec",
                        existing.id,
                    )
                answers.append((existing, True))
                continue
            record = self._new_record(spec)
            if key:
                seen[key] = record
            new.append(record)
            answers.append((record, False))
        if len(self._active) + len(new) > self.settings.queue_capacity:
            raise QueueFull(
                f"command queue full ({self.settings.queue_capacity} active commands); retry later",
                retry_after=1.0,
            )
        placed = self._place([(r, frozenset()) for r in new])
        now = time.monotonic()
        for record in new:
            self._active[record.id] = record
            self._submitted_at[record.id] = now
        if trace is not None:
            traces.stamp(trace, new)
        try:
            commit = await self._log.save(new, actor) if new else None
        except BaseException:
            for record in new:
                self._forget(record)
            raise
        if trace is not None:
            traces.committed(trace, new)
        if failpoints.ACTIVE:
            await failpoints.hit_async("commands.before_dispatch")
        # Durable: only now may the commands flow to nodes.
        live: dict[str, bool] = {}  # one registry look-up per node, not per command
        for record, placement in zip(new, placed, strict=True):
            self._enqueue(record, placement, live)
        metrics.COMMAND_QUEUE_DEPTH.set(len(self._dispatch))
        response = pb.SubmitCommandsResponse(
            index=commit.last_event_index if commit else self._store.last_event_index
        )
        add = response.results.add  # built in place: no per-result message copy
        for record, duplicate in answers:
            add(
                id=record.id,
                state=record.state,
                node_id=record.node_id,
                reason=record.reason,
                duplicate=duplicate,
            )
        if failpoints.ACTIVE:
            await failpoints.hit_async("commands.before_reply")
        return response

    def _known_keys(self, specs: Sequence[pb.CommandSpec]) -> dict[str, pb.CommandRecord]:
        """The commands that already exist under the batch's idempotency keys, by key.

        In memory first; the rest are read from the store in one read txn for the batch.
        """
        known: dict[str, pb.CommandRecord] = {}
        missing: list[str] = []
        for spec in specs:
            key = spec.idempotency_key
            if key and key not in known:
                record = self._active.get(key) or self._log.finishing.get(key)
                if record is not None:
                    known[key] = record
                else:
                    missing.append(key)
        if missing:
            missing = list(dict.fromkeys(missing))
            for key, stored in zip(missing, self._log.read_many(missing), strict=True):
                if stored is not None:
                    known[key] = stored
        return known

    def _validate_batch(self, specs: Sequence[pb.CommandSpec]) -> None:
        if not specs:
            raise InvalidArgument("commands", "the batch is empty")
        if len(specs) > self.settings.max_batch_size:
            raise InvalidArgument(
                "commands",
                f"batch of {len(specs)} exceeds the limit of {self.settings.max_batch_size}",
            )
        for i, spec in enumerate(specs):
            self._validate_spec(spec, f"commands[{i}]")

    def _validate_spec(self, spec: pb.CommandSpec, at: str) -> None:
        validate_spec(spec, at, self.settings.max_payload_size)
        if spec.target_node:
            validate_node_id(spec.target_node, f"{at}.target_node")
            try:
                self._nodes.get(spec.target_node)
            except NotFound:
                raise NotFound(f"{at}.target_node: node {spec.target_node!r} not found") from None

    def _new_record(self, spec: pb.CommandSpec, agent_id: str = "") -> pb.CommandRecord:
        ts = now_ms()
        record = pb.CommandRecord(
            id=spec.idempotency_key or f"{self._id_prefix}{next(self._id_counter):08x}",
            state=PENDING,
            created_ms=ts,
            updated_ms=ts,
            agent_id=agent_id,
        )
        stored = record.spec
        stored.CopyFrom(spec)
        if not stored.timeout_ms:
            stored.timeout_ms = int(self.settings.default_timeout * 1000)
        if not stored.max_attempts:
            stored.max_attempts = self.settings.default_max_attempts
        return record

    # ------------------------------------------------------------ internal submit (agents)

    async def submit_internal(self, spec: pb.CommandSpec, agent_id: str) -> pb.CommandRecord:
        """Submit one command on behalf of the core (agent start/stop), already validated."""
        record = self._new_record(spec, agent_id)
        (placement,) = self._place([(record, frozenset())])
        self._active[record.id] = record
        self._submitted_at[record.id] = time.monotonic()
        await self._log.save([record])
        self._enqueue(record, placement, {})
        return record

    def _enqueue(
        self, record: pb.CommandRecord, placement: tuple[str, int], live: dict[str, bool]
    ) -> None:
        """Queue a just-committed record for its node, or to wait for one.

        ``live`` caches, per node, whether it is still up (the batch's look-ups).
        """
        node, slot = placement
        if node:
            up = live.get(node)
            if up is None:
                up = live[node] = self._node_live(node)
            if not up:
                # The node went down while the commit was in flight: place it again instead.
                self._scheduler.release(node, record.spec.placement.request, self._spread(record))
                record.attempt -= 1
                record.state = PENDING
                record.node_id = ""
                record.reason = f"node {node} went down"
                node = ""
                self._log.save_later([record])
        if node:
            self._dispatch.push(record, node, slot)
        else:
            self._push_pending(record)
        self._set_deadline(record)

    # ------------------------------------------------------------ placement

    def _spread(self, record: pb.CommandRecord) -> str:
        return record.spec.placement.spread_key

    def _place(
        self, items: Sequence[tuple[pb.CommandRecord, frozenset[str]]]
    ) -> list[tuple[str, int]]:
        """Place records (reserving capacity); returns (node, slot) per record, ("", -1) if none."""
        if not items:
            return []
        requests = placement_requests(items)
        decisions = self._scheduler.place_batch(requests)
        # Nodes of failed attempts are avoided, unless nothing else fits.
        second = [i for i, d in enumerate(decisions) if not d.node_id and requests[i].exclude]
        if second:
            retried = self._scheduler.place_batch(
                [dataclasses.replace(requests[i], exclude=frozenset()) for i in second]
            )
            for i, decision in zip(second, retried, strict=True):
                decisions[i] = decision
        chosen: list[tuple[str, int]] = []
        ts = now_ms()
        for (record, _), decision in zip(items, decisions, strict=True):
            node = decision.node_id or ""
            record.updated_ms = ts
            if node:
                record.state = PLACED
                record.node_id = node
                record.reason = ""
                record.attempt += 1  # an attempt starts when a node is chosen
            else:
                record.state = PENDING
                record.node_id = ""
                record.reason = decision.reason
            chosen.append((node, decision.slot))
        return chosen

    def _push_pending(self, record: pb.CommandRecord) -> None:
        self._dispatch.push_pending(record)
        self._pending_dirty = True

    def _place_pending(self) -> None:
        """Try to place commands waiting for capacity (called from the ticker)."""
        self._pending_dirty = False
        waiting = self._dispatch.pending_count()
        if not waiting:
            return
        ids = self._dispatch.pop_pending(min(waiting, self.settings.max_batch_size))
        records = [self._active[i] for i in ids if i in self._active]
        before = {r.id: r.reason for r in records}
        nodes = self._place([(r, frozenset(r.tried_nodes)) for r in records])
        changed: list[pb.CommandRecord] = []
        for record, (node, slot) in zip(records, nodes, strict=True):
            if node:
                self._dispatch.push(record, node, slot)
                self._set_deadline(record)
                changed.append(record)
            else:
                self._dispatch.push_pending(record)
                if before[record.id] != record.reason:
                    changed.append(record)
        if changed:
            self._log.save_later(changed)
        if len(ids) == self.settings.max_batch_size and any(node for node, _ in nodes):
            self._pending_dirty = True  # more may fit: go on next tick

    # ------------------------------------------------------------ dispatch

    def _node_payload(self, record: pb.CommandRecord) -> bytes | None:
        """The payload the node receives, when it is not the stored one (see node_payloads)."""
        build = self.node_payloads.get(record.spec.kind)
        return None if build is None else build(record)

    def _dispatched(self, records: list[pb.CommandRecord]) -> None:
        """The dispatcher sent ``records`` to their nodes: start their clocks, save."""
        now = time.monotonic()
        submitted_at = self._submitted_at
        observe = metrics.COMMAND_SUBMIT_TO_DISPATCH.observe
        stages, heap, seq = self._stage, self._deadlines, self._seq  # _set_deadline, inlined
        for record in records:
            rid = record.id
            stages[rid] = stage = stages.get(rid, 0) + 1
            seq += 1
            heapq.heappush(heap, (now + record.spec.timeout_ms / 1000.0, seq, rid, stage))
            if record.attempt == 1:
                started = submitted_at.get(rid)
                if started is not None:
                    observe(now - started)
        self._seq = seq
        self._log.save_later(records)
        metrics.COMMAND_QUEUE_DEPTH.set(len(self._dispatch))
        if traces.tracer is not None:
            traces.tracer.dispatched(records)

    def session_opened(self, node: pb.Node, session: Session) -> None:
        """Re-send what the node may have missed, then whatever is queued for it."""
        self._dispatch.session_opened(node, session)

    # ------------------------------------------------------------ node reports

    def handle_reports(self, node_id: str, message: pb.NodeMessage) -> None:
        """Acks and results from a node's stream (already authenticated to node_id)."""
        changed: list[pb.CommandRecord] = []
        # Reports are matched by command and node, not attempt: a node runs a command at
        # most once, so a late report of an earlier attempt on the same node is the answer.
        if message.acks:
            stale = apply_acks(self._active, message.acks, node_id, now_ms(), changed)
            if stale:
                metrics.STALE_REPORTS.labels(kind="ack").inc(stale)
            if changed:
                self._log.save_later(changed)
        for result in message.results:
            record = self._active.get(result.command_id)
            if (
                record is None
                or record.node_id != node_id
                or record.state not in (DISPATCHED, ACKED)
            ):
                metrics.STALE_REPORTS.labels(kind="result").inc()
                continue
            # Capped before it is kept: a node must not fill the store or overflow a list page.
            error = cap_result(record, result, self.settings.max_output_size)
            if result.success:
                self._finish(record, SUCCEEDED, "")
            elif record.agent_id:
                # The agent service re-places a replica whose start failed, on any node.
                self._finish(record, FAILED, error or "failed on the node")
            else:
                # A target_node command retries on its node (with a higher attempt number,
                # which nodes run again); the others move to another node while they can.
                self._retry_or_finish(record, FAILED, error or "failed on the node")

    # ------------------------------------------------------------ cancel / wait

    async def cancel(self, command_id: str, actor: str = "") -> pb.CommandRecord:
        record = self._active.get(command_id)
        if record is None:
            final = self.get(command_id)  # NOT_FOUND if unknown
            raise FailedPrecondition(
                f"command {command_id!r} is already {STATE_NAMES.get(final.state, '?')}"
            )
        node_id = record.node_id
        was_inflight = record.state in (DISPATCHED, ACKED)
        self._finish(record, CANCELLED, "cancelled by request", save=False)
        if was_inflight:
            self._dispatch.send_cancel(node_id, [command_id])
        await self._log.save([record], actor)
        return record

    def wait(self, ids: Sequence[str], timeout: float | None) -> AsyncIterator[pb.CommandRecord]:
        """Yield each command's record once it is final (final ones at once); a timeout
        ends with a marker record (see :meth:`CommandWaiters.wait`).

        Raises Unavailable ("server stopping") when the server stops first.
        """
        self._waiters.check_open()
        if not ids:
            raise InvalidArgument("ids", "must not be empty")
        if len(ids) > MAX_WAIT_IDS:
            raise InvalidArgument("ids", f"at most {MAX_WAIT_IDS} ids")
        records = [self.get(i) for i in dict.fromkeys(ids)]  # NOT_FOUND before streaming
        finishing = self._log.finishing  # final in memory, not yet on disk: wait for it
        in_flight = frozenset(r.id for r in records if finishing.get(r.id) is r)
        return self._waiters.wait(records, timeout, in_flight)

    # ------------------------------------------------------------ node changes

    def node_updated(self, node: pb.Node) -> None:
        if node.status in (pb.NODE_STATUS_DOWN, pb.NODE_STATUS_REMOVED):
            self._node_lost(node.id, f"node {node.id} went down")
        self._pending_dirty = True

    def node_usage(self, node: pb.Node) -> None:
        """Usage changes are the scheduler's business; commands need nothing per heartbeat."""

    def node_removed(self, node: pb.Node) -> None:
        self._node_lost(node.id, f"node {node.id} was removed")
        self._dispatch.node_removed(node.id)

    def _node_lost(self, node_id: str, reason: str) -> None:
        """Commands on a lost node: queued ones are placed again, in-flight ones retried."""
        queued, inflight = self._dispatch.take_node(node_id)
        moved: list[pb.CommandRecord] = []
        for command_id in queued:
            record = self._active.get(command_id)
            if record is None:
                continue
            self._scheduler.release(node_id, record.spec.placement.request, self._spread(record))
            record.attempt -= 1  # it never reached the node: that attempt did not start
            record.state = PENDING
            record.node_id = ""
            record.reason = reason
            self._push_pending(record)
            moved.append(record)
        for command_id in inflight:
            record = self._active.get(command_id)
            if record is not None and record.node_id == node_id:
                self._retry_or_finish(record, FAILED, reason, already_left=True)
        if moved:
            self._log.save_later(moved)

    # ------------------------------------------------------------ transitions

    def _retry_or_finish(
        self, record: pb.CommandRecord, final_state: int, reason: str, already_left: bool = False
    ) -> None:
        """An attempt failed: place it again while attempts remain, else finish it."""
        node_id = record.node_id
        self._leave_node(record, already_left)
        if record.attempt < record.spec.max_attempts:
            if node_id and not record.spec.target_node:
                record.tried_nodes.append(node_id)
            record.state = PENDING
            record.node_id = ""
            record.reason = f"retrying after: {reason}"
            record.updated_ms = now_ms()
            self._push_pending(record)
            self._set_deadline(record)
            self._log.save_later([record])
            metrics.COMMAND_RETRIES.inc()
            return
        record.node_id = node_id
        self._finish(record, final_state, reason, left=True)

    def _leave_node(self, record: pb.CommandRecord, already_left: bool = False) -> None:
        node_id = record.node_id
        if not node_id:
            return
        self._scheduler.release(node_id, record.spec.placement.request, self._spread(record))
        if not already_left:
            self._dispatch.leave(node_id, record.id)
        self._pending_dirty = True

    def _finish(
        self,
        record: pb.CommandRecord,
        state: int,
        reason: str,
        *,
        save: bool = True,
        left: bool = False,
    ) -> None:
        if not left:
            if record.state == PENDING:
                self._dispatch.discard(record.id)
            else:
                self._leave_node(record)
        ts = now_ms()
        record.state = state  # type: ignore[assignment]
        record.reason = reason
        record.updated_ms = ts
        record.finished_ms = ts
        self._active.pop(record.id, None)
        self._log.finishing[record.id] = record
        self._stage.pop(record.id, None)
        started = self._submitted_at.pop(record.id, None)
        if started is not None:
            metrics.COMMAND_SUBMIT_TO_FINAL.observe(time.monotonic() - started)
        self._processed[state].inc()
        for hook in self.on_final:
            hook(record)
        if save:
            self._log.save_later([record])

    def _forget(self, record: pb.CommandRecord) -> None:
        """Undo a submission whose commit failed."""
        self._active.pop(record.id, None)
        self._submitted_at.pop(record.id, None)
        if record.node_id:
            self._scheduler.release(
                record.node_id, record.spec.placement.request, self._spread(record)
            )

    # ------------------------------------------------------------ deadlines

    def _set_deadline(self, record: pb.CommandRecord) -> None:
        """Start the clock of the record's current stage (pending, placed or dispatched)."""
        stage = self._stage.get(record.id, 0) + 1
        self._stage[record.id] = stage
        self._seq += 1
        deadline = time.monotonic() + record.spec.timeout_ms / 1000.0
        heapq.heappush(self._deadlines, (deadline, self._seq, record.id, stage))

    def _expire(self) -> None:
        now = time.monotonic()
        heap = self._deadlines
        while heap and heap[0][0] <= now:
            _, _, command_id, stage = heapq.heappop(heap)
            if self._stage.get(command_id) != stage:
                continue
            record = self._active.get(command_id)
            if record is None:
                continue
            timeout_s = record.spec.timeout_ms / 1000.0
            if record.state == PENDING:
                reason = f"no feasible node within {timeout_s:g}s: {record.reason}"
                self._finish(record, TIMED_OUT, reason)
                continue
            if record.state == PLACED:
                reason = f"not dispatched to node {record.node_id} within {timeout_s:g}s"
            else:
                reason = f"no result from node {record.node_id} within {timeout_s:g}s"
                self._dispatch.send_cancel(record.node_id, [command_id])
            self._retry_or_finish(record, TIMED_OUT, reason)

    async def _tick(self) -> None:
        """Deadlines, waiting commands, and nodes whose stream had no room last time."""
        self._expire()
        if self._pending_dirty:
            self._place_pending()
        self._dispatch.mark_backlog()
        metrics.COMMAND_QUEUE_DEPTH.set(len(self._dispatch))

    async def prune_finished(self) -> int:
        """Drop finished commands older than final_retention; returns how many."""
        horizon = now_ms() - int(self.settings.final_retention * 1000)
        return await self._log.prune_finished(horizon, self.settings.max_batch_size)
