"""Agents: long-running workloads placed by the scheduler, started and stopped by commands.

The agent service places each replica itself and holds the replica's resource
reservation for as long as it runs (a command's reservation ends with the
command; an agent's must not). It then sends ``agent.start`` to the chosen
node as a command with a fixed target. Nodes report agent states in their
heartbeat messages. A node that goes down makes its agents ``lost``; they are
placed again elsewhere.

``pending -> running -> stopped | failed``, and ``lost -> pending`` again.

The opaque spec (up to ``agents.max_spec_bytes``) is stored ONCE per deployment, under
``spec/<name>/<created_ms>`` in the ``agents`` database, and held once in memory. Replica
records, their events, and the ``agent.start`` command records carry no spec bytes (only
``spec_size``); the node-bound ``agent.start`` payload is built from the agent at dispatch
(:attr:`CommandService.node_payloads`). So a deployment costs one spec plus small records,
not replicas x spec. Only :meth:`AgentService.get` returns the spec bytes.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from nexus_fast.clock import now_ms
from nexus_fast.codec.json import agent_start_payload, agent_stop_payload
from nexus_fast.codec.protowire import event
from nexus_fast.core import acting
from nexus_fast.core.commands import FINAL_STATES, SUCCEEDED, CommandService
from nexus_fast.core.nodes import entry_size, page_budget, validate_labels, validate_resources
from nexus_fast.core.periodic import Periodic
from nexus_fast.core.scheduler import PlacementRequest, Scheduler
from nexus_fast.errors import FailedPrecondition, InvalidArgument, NotFound
from nexus_fast.logs import get_logger
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store.base import CommitResult, Delete, Put, StateStore
from nexus_fast.telemetry import metrics

log = get_logger("agents")

AGENTS_DB: Final = "agents"
PENDING: Final = pb.AGENT_STATE_PENDING
RUNNING: Final = pb.AGENT_STATE_RUNNING
STOPPED: Final = pb.AGENT_STATE_STOPPED
FAILED: Final = pb.AGENT_STATE_FAILED
LOST: Final = pb.AGENT_STATE_LOST
FINAL: Final = frozenset({STOPPED, FAILED})
STATE_NAMES: Final[dict[int, str]] = {
    PENDING: "pending",
    RUNNING: "running",
    STOPPED: "stopped",
    FAILED: "failed",
    LOST: "lost",
}
# Node-reported states we accept (AgentStatus.state).
_REPORTED: Final = {"running": RUNNING, "stopped": STOPPED, "failed": FAILED}
MAX_REPLICAS: Final = 1000
MAX_SPEC_SIZE: Final = 256 * 1024
_SPEC_PREFIX: Final = b"spec/"  # agent ids are DNS labels + "-N": never start with this
# An agent whose start keeps failing is given up after this many placements.
MAX_PLACEMENTS: Final = 5
_TICK: Final = 1.0
_NAME_RE: Final = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class AgentSettings:
    """Limits of a deployment (config [agents]) and of a ListAgents page."""

    max_spec_bytes: int = MAX_SPEC_SIZE
    max_replicas: int = MAX_REPLICAS
    # Bytes of agents one ListAgents page may carry (page_budget(server.max_message_size)).
    max_page_bytes: int = page_budget(4 * 1024 * 1024)


def _spec_key(name: str, created_ms: int) -> bytes:
    return _SPEC_PREFIX + f"{name}/{created_ms:016x}".encode()


class AgentService:
    """Every agent, in memory and in the ``agents`` database; runs on the loop only."""

    def __init__(
        self,
        store: StateStore,
        scheduler: Scheduler,
        commands: CommandService,
        settings: AgentSettings | None = None,
    ) -> None:
        self._store = store
        self._scheduler = scheduler
        self._commands = commands
        self.settings = settings or AgentSettings()
        # Replicas without their spec bytes; those are in _specs, once per deployment.
        self._agents: dict[str, pb.Agent] = {}
        self._specs: dict[tuple[str, int], bytes] = {}
        # Which agent a start/stop command belongs to, so its outcome can be applied.
        self._command_agent: dict[str, tuple[str, str]] = {}
        self._ticker = Periodic("agents", self._tick, log)
        self._dirty = False
        commands.on_final.append(self._command_finished)
        commands.node_payloads["agent.start"] = self._start_payload
        metrics.AGENTS.source = self.state_counts

    # ------------------------------------------------------------ start / stop

    def load(self) -> int:
        inline: list[Put | Delete] = []
        for key, value in self._store.scan(AGENTS_DB):
            if key.startswith(_SPEC_PREFIX):
                name, _, created = key[len(_SPEC_PREFIX) :].decode().rpartition("/")
                self._specs[(name, int(created, 16))] = value
                continue
            agent = pb.Agent.FromString(value)
            if agent.spec.spec:
                # Written before specs were stored once: keep the spec under its own key.
                ref = (agent.name, agent.created_ms)
                if ref not in self._specs:
                    self._specs[ref] = agent.spec.spec
                    inline.append(Put(AGENTS_DB, _spec_key(*ref), agent.spec.spec))
                agent.spec_size = len(agent.spec.spec)
                agent.spec.spec = b""
            self._agents[agent.id] = agent
            if agent.state in (PENDING, RUNNING) and agent.node_id:
                if self._scheduler.slot_of(agent.node_id) is not None:
                    self._scheduler.reserve(
                        agent.node_id, agent.spec.request, agent.spec.placement.spread_key
                    )
                else:
                    agent.state = LOST
            if agent.state in (PENDING, LOST) and not agent.stop_requested:
                self._dirty = True
        # Start/stop commands still in flight keep telling us how their agent fares.
        for record in self._commands.active_records():
            owner = self._agents.get(record.agent_id)
            # Not those of an earlier deployment under the same id (see deploy).
            if owner is not None and record.created_ms >= owner.created_ms:
                self._command_agent[record.id] = (record.agent_id, record.spec.target_node)
        if inline:
            self._store.commit(inline).add_done_callback(_log_failure)
        return len(self._agents)

    def start(self) -> None:
        self._ticker.start(_TICK)

    async def stop(self) -> None:
        await self._ticker.stop()

    # ------------------------------------------------------------ queries

    def state_counts(self) -> dict[str, int]:
        counts = dict.fromkeys(STATE_NAMES.values(), 0)
        for agent in self._agents.values():
            counts[STATE_NAMES[agent.state]] += 1
        return counts

    def get(self, agent_id: str) -> pb.Agent:
        """One replica, with its spec bytes (a copy: the replica itself holds none)."""
        if not agent_id:
            raise InvalidArgument("id", "must not be empty")
        agent = self._agents.get(agent_id)
        if agent is None:
            raise NotFound(f"agent {agent_id!r} not found")
        full = pb.Agent()
        full.CopyFrom(agent)
        full.spec.spec = self._specs.get((agent.name, agent.created_ms), b"")
        return full

    def list_agents(
        self, name: str = "", states: Iterable[int] = (), page_size: int = 0, page_token: str = ""
    ) -> tuple[list[pb.Agent], str]:
        wanted = set(states)
        for state in wanted:
            if state not in STATE_NAMES:
                raise InvalidArgument("states", f"unknown agent state {state}")
        if page_size > 5000:
            raise InvalidArgument("page_size", "must be 0..5000")
        size = page_size or 500
        budget = self.settings.max_page_bytes
        page: list[pb.Agent] = []
        for agent_id in sorted(self._agents):
            if page_token and agent_id <= page_token:
                continue
            agent = self._agents[agent_id]
            if (name and agent.name != name) or (wanted and agent.state not in wanted):
                continue
            if len(page) == size:
                return page, page[-1].id
            # The page must fit the message limit too (it always takes one agent).
            cost = entry_size(agent)
            if page and cost > budget:
                return page, page[-1].id
            budget -= cost
            page.append(agent)
        return page, ""

    # ------------------------------------------------------------ deploy / stop

    async def deploy(self, spec: pb.AgentSpec, actor: str = "") -> list[pb.Agent]:
        """Create the replicas, place them, persist, then send their start commands.

        The replicas returned (and stored) carry no spec bytes: see the module docstring.
        ``actor`` (who deployed) goes on the replicas' events.
        """
        self._validate(spec)
        live = [a for a in self._agents.values() if a.name == spec.name and a.state not in FINAL]
        if live:
            raise FailedPrecondition(
                f"agent {spec.name!r} is already deployed ({len(live)} replicas not stopped); "
                "stop it first"
            )
        ts = now_ms()
        shared = pb.AgentSpec()
        shared.CopyFrom(spec)
        shared.spec = b""
        shared.replicas = spec.replicas or 1
        agents = []
        for replica in range(shared.replicas):
            agent = pb.Agent(
                id=f"{spec.name}-{replica}",
                name=spec.name,
                replica=replica,
                state=PENDING,
                created_ms=ts,
                updated_ms=ts,
                spec_size=len(spec.spec),
            )
            agent.spec.CopyFrom(shared)
            agents.append(agent)
        self._place(agents)
        # Start/stop commands of an earlier deployment under the same ids must not act on
        # these replicas when they finish (a late stop result would stop the new one).
        ids = {a.id for a in agents}
        for command_id in [c for c, (a, _) in self._command_agent.items() if a in ids]:
            del self._command_agent[command_id]
        for agent in agents:
            self._agents[agent.id] = agent
        # The spec once, in the same commit as the replicas; specs of earlier deployments
        # under this name that no replica refers to any more go in that commit too.
        ref = (spec.name, ts)
        self._specs[ref] = spec.spec
        ops: list[Put | Delete] = [Put(AGENTS_DB, _spec_key(*ref), spec.spec)]
        used = {a.created_ms for a in self._agents.values() if a.name == spec.name}
        for old in [r for r in self._specs if r[0] == spec.name and r[1] not in used]:
            del self._specs[old]
            ops.append(Delete(AGENTS_DB, _spec_key(*old)))
        await self._save(agents, ops, actor)
        await self._send_starts([a for a in agents if a.node_id])
        return agents

    async def stop_agent(self, name: str, actor: str = "") -> list[pb.Agent]:
        """Stop every replica of ``name``: unplaced ones at once, others via agent.stop.

        ``actor`` (who asked) goes on the replicas' events.
        """
        if not name:
            raise InvalidArgument("name", "must not be empty")
        replicas = [a for a in self._agents.values() if a.name == name]
        if not replicas:
            raise NotFound(f"agent {name!r} not found")
        ts = now_ms()
        to_stop: list[pb.Agent] = []
        changed: list[pb.Agent] = []
        for agent in replicas:
            if agent.state in FINAL or agent.stop_requested:
                continue
            agent.stop_requested = True
            agent.updated_ms = ts
            changed.append(agent)
            if agent.node_id and agent.state in (PENDING, RUNNING):
                to_stop.append(agent)
            else:
                self._end(agent, STOPPED, "stopped before it was placed")
        if changed:
            await self._save(changed, actor=actor)
        for agent in to_stop:
            record = await self._commands.submit_internal(
                pb.CommandSpec(
                    kind="agent.stop",
                    payload=agent_stop_payload(agent),
                    target_node=agent.node_id,
                ),
                agent.id,
            )
            self._command_agent[record.id] = (agent.id, agent.node_id)
        return replicas

    def _validate(self, spec: pb.AgentSpec) -> None:
        if not _NAME_RE.match(spec.name):
            raise InvalidArgument(
                "spec.name", "must be 1..63 lower-case letters, digits and '-' (DNS label)"
            )
        limits = self.settings
        if spec.replicas > limits.max_replicas:
            raise InvalidArgument(
                "spec.replicas",
                f"{spec.replicas} exceeds the limit of {limits.max_replicas} (agents.max_replicas)",
            )
        if len(spec.spec) > limits.max_spec_bytes:
            raise InvalidArgument(
                "spec.spec",
                f"{len(spec.spec)} bytes exceeds the limit of {limits.max_spec_bytes} "
                "(agents.max_spec_bytes)",
            )
        validate_resources(spec.request, "spec.request")
        validate_labels(spec.placement.label_selector, "spec.placement.label_selector")
        if spec.placement.spread_key:
            validate_labels({spec.placement.spread_key: ""}, "spec.placement.spread_key")

    # ------------------------------------------------------------ placement

    def _place(self, agents: Sequence[pb.Agent]) -> None:
        decisions = self._scheduler.place_batch(
            [
                PlacementRequest(
                    request=a.spec.request,
                    label_selector=dict(a.spec.placement.label_selector),
                    spread_key=a.spec.placement.spread_key,
                    target_node="",
                    exclude=frozenset(),
                )
                for a in agents
            ]
        )
        ts = now_ms()
        for agent, decision in zip(agents, decisions, strict=True):
            agent.updated_ms = ts
            if decision.node_id:
                agent.node_id = decision.node_id
                agent.state = PENDING
                agent.placements += 1
                agent.message = f"starting on {decision.node_id}"
            else:
                agent.node_id = ""
                agent.message = f"waiting for a node: {decision.reason}"

    async def _send_starts(self, agents: Sequence[pb.Agent]) -> None:
        for agent in agents:
            # The record keeps the payload without the spec ("spec": ""), a reference by
            # agent id; the node gets the full one, built at dispatch by _start_payload.
            record = await self._commands.submit_internal(
                pb.CommandSpec(
                    kind="agent.start",
                    payload=agent_start_payload(agent),
                    target_node=agent.node_id,
                ),
                agent.id,
            )
            self._command_agent[record.id] = (agent.id, agent.node_id)

    def _start_payload(self, record: pb.CommandRecord) -> bytes | None:
        """The ``agent.start`` payload the node receives: the agent with its spec."""
        agent = self._agents.get(record.agent_id)
        if agent is None or record.created_ms < agent.created_ms:
            return None  # of an earlier deployment: it keeps what it stored
        full = pb.Agent()
        full.CopyFrom(agent)
        full.spec.spec = self._specs.get((agent.name, agent.created_ms), b"")
        return agent_start_payload(full)

    async def _replace_waiting(self) -> None:
        """Place agents that are pending without a node, or lost."""
        self._dirty = False
        waiting = [
            a
            for a in self._agents.values()
            if not a.stop_requested and ((a.state == PENDING and not a.node_id) or a.state == LOST)
        ]
        if not waiting:
            return
        before = {a.id: (a.node_id, a.message) for a in waiting}
        for agent in waiting:
            agent.state = PENDING
        self._place(waiting)
        changed = [a for a in waiting if (a.node_id, a.message) != before[a.id]]
        if changed:
            await self._save(changed)
        await self._send_starts([a for a in waiting if a.node_id])

    # ------------------------------------------------------------ reports and outcomes

    def handle_reports(self, node_id: str, statuses: Sequence[pb.AgentStatus]) -> None:
        """Agent states reported by a node in its messages."""
        changed: list[pb.Agent] = []
        for status in statuses:
            agent = self._agents.get(status.agent_id)
            state = _REPORTED.get(status.state)
            if agent is None or agent.node_id != node_id or state is None:
                continue
            if state == agent.state or agent.state in FINAL:
                continue
            if state == RUNNING and agent.state != PENDING:
                continue
            if state == RUNNING:
                agent.state = RUNNING
                agent.message = status.message or f"running on {node_id}"
                agent.updated_ms = now_ms()
            else:
                self._end(agent, state, status.message or f"{status.state} on {node_id}")
            changed.append(agent)
        if changed:
            self._save_later(changed)

    def _command_finished(self, record: pb.CommandRecord) -> None:
        owner = self._command_agent.pop(record.id, None)
        if owner is None:
            return
        agent_id, node_id = owner
        agent = self._agents.get(agent_id)
        if agent is None or agent.node_id != node_id or agent.state in FINAL:
            return
        if record.spec.kind == "agent.start":
            if record.state == SUCCEEDED:
                if agent.state == PENDING:
                    agent.state = RUNNING
                    agent.message = f"running on {node_id}"
                    agent.updated_ms = now_ms()
                    self._save_later([agent])
                return
            # The start did not take: give the node's capacity back and place it again.
            if agent.placements >= MAX_PLACEMENTS:
                # _end releases the reservation (once: releasing here too took another's).
                self._end(agent, FAILED, f"start failed {agent.placements} times: {record.reason}")
            else:
                self._release(agent)
                agent.state = LOST
                agent.node_id = ""
                agent.message = f"start failed on {node_id}: {record.reason}"
                agent.updated_ms = now_ms()
                self._dirty = True
            self._save_later([agent])
        elif record.spec.kind == "agent.stop" and record.state in FINAL_STATES:
            # A stop that could not be delivered still ends the agent: its node is gone or
            # unreachable, and the reservation must not leak.
            self._end(agent, STOPPED, "stopped" if record.state == SUCCEEDED else record.reason)
            self._save_later([agent])

    def node_updated(self, node: pb.Node) -> None:
        if node.status in (pb.NODE_STATUS_DOWN, pb.NODE_STATUS_REMOVED):
            self._node_lost(node.id)
        elif node.status == pb.NODE_STATUS_READY:
            self._dirty = True

    def node_usage(self, node: pb.Node) -> None:
        """Nothing per heartbeat: agent states arrive in NodeMessage.agents."""

    def node_removed(self, node: pb.Node) -> None:
        self._node_lost(node.id)

    def session_opened(self, node: pb.Node, session: object) -> None:
        """Nothing to re-send: start/stop commands are redelivered by the command service."""

    def _node_lost(self, node_id: str) -> None:
        lost: list[pb.Agent] = []
        ts = now_ms()
        for agent in self._agents.values():
            if agent.node_id != node_id or agent.state in FINAL:
                continue
            self._release(agent)
            agent.node_id = ""
            agent.updated_ms = ts
            if agent.stop_requested:
                agent.state = STOPPED
                agent.message = f"node {node_id} went away while stopping"
            else:
                agent.state = LOST
                agent.message = f"node {node_id} went down"
            lost.append(agent)
        if lost:
            self._dirty = True
            self._save_later(lost)
            log.info("agents lost with their node", extra={"node": node_id, "count": len(lost)})

    def _release(self, agent: pb.Agent) -> None:
        if agent.node_id:
            self._scheduler.release(
                agent.node_id, agent.spec.request, agent.spec.placement.spread_key
            )

    def _end(self, agent: pb.Agent, state: int, message: str) -> None:
        self._release(agent)
        agent.state = state  # type: ignore[assignment]
        agent.message = message
        agent.updated_ms = now_ms()

    async def _tick(self) -> None:
        if self._dirty:
            await self._replace_waiting()

    # ------------------------------------------------------------ persistence

    def _save(
        self, agents: Sequence[pb.Agent], extra: Sequence[Put | Delete] = (), actor: str = ""
    ) -> asyncio.Future[CommitResult]:
        ts = now_ms()
        ops: list[Put | Delete] = list(extra)
        events = []
        for agent in agents:
            body = agent.SerializeToString()
            ops.append(Put(AGENTS_DB, agent.id.encode(), body))
            events.append(
                event("agent", f"agent.{STATE_NAMES[agent.state]}", agent.id, body, ts, actor)
            )
        return self._store.commit(ops, events, acting.records(lambda: _names(agents)))

    def _save_later(self, agents: Sequence[pb.Agent]) -> None:
        future = self._save(agents)
        future.add_done_callback(_log_failure)


def _names(agents: Sequence[pb.Agent]) -> str:
    return ",".join(sorted({a.name for a in agents}))


def _log_failure(future: asyncio.Future[CommitResult]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.error("agent state write failed", extra={"err": str(future.exception())})
