"""AgentService without sockets: a real LmdbStore, NodeRegistry, Scheduler and CommandService
wired as in ``server.py``. Node streams are read from ``Session.outbound``; the node's command
results and agent statuses go in through the services' ``handle_reports``, as the gRPC adapter
does. Reservations are checked on the scheduler (``reserved_of`` / ``tasks_of``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from nexus_fast.core import agents as agents_mod
from nexus_fast.core.agents import AGENTS_DB, AgentSettings
from nexus_fast.core.commands import COMMANDS_DB
from nexus_fast.core.nodes import Session
from nexus_fast.errors import FailedPrecondition, InvalidArgument, NotFound
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store.base import Put
from nexus_fast.store.lmdb_store import EVENTS_DB

from .fabric import (
    Fabric,
    commands_in,
    drain,
    fabric,
    res,
    run,
    wait_sent,
)

# Deadlines of 0.1-0.2 s need the 10 ms ticker (tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("fast_ticks")

PENDING = pb.AGENT_STATE_PENDING
RUNNING = pb.AGENT_STATE_RUNNING
STOPPED = pb.AGENT_STATE_STOPPED
FAILED = pb.AGENT_STATE_FAILED
LOST = pb.AGENT_STATE_LOST


def agent_spec(
    name: str, replicas: int = 1, cpu: float = 1.0, gpu: float = 0.0, **kw: Any
) -> pb.AgentSpec:
    return pb.AgentSpec(
        name=name, spec=b"image: x", request=res(cpu=cpu, gpu=gpu), replicas=replicas, **kw
    )


def agent_of(command: pb.Command) -> str:
    return str(orjson.loads(command.payload)["agent_id"])


async def next_command(session: Session, kind: str, timeout: float = 3.0) -> pb.Command:
    """The next command of ``kind`` on the node's stream (others are skipped)."""
    deadline = time.monotonic() + timeout
    while True:
        for command in await wait_sent(session, 1, max(0.0, deadline - time.monotonic())):
            if command.kind == kind:
                return command


def report_agents(f: Fabric, node_id: str, **states: str) -> None:
    """What the gRPC adapter does with NodeMessage.agents: {agent_id: state}."""
    f.agents.handle_reports(
        node_id,
        [pb.AgentStatus(agent_id=k.replace("_", "-"), state=v) for k, v in states.items()],
    )


def reserved_cpu(f: Fabric, node_id: str) -> float:
    return f.scheduler.reserved_of(node_id)["cpu"]


def stored_agent(f: Fabric, agent_id: str) -> pb.Agent | None:
    raw = f.store.get(AGENTS_DB, agent_id.encode())
    return pb.Agent.FromString(raw) if raw is not None else None


# ------------------------------------------------------------------ deploy


def test_deploy_places_replicas_and_sends_agent_start(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        s1 = await f.node("n1")
        s2 = await f.node("n2")
        assert s1 is not None and s2 is not None
        sessions = {"n1": s1, "n2": s2}
        agents = await f.agents.deploy(agent_spec("web", replicas=3, cpu=2))
        assert [a.id for a in agents] == ["web-0", "web-1", "web-2"]
        assert all(a.state == PENDING and a.node_id and a.placements == 1 for a in agents)
        assert {a.node_id for a in agents} == {"n1", "n2"}  # least-allocated spreads them
        for node_id in ("n1", "n2"):
            on_node = [a for a in agents if a.node_id == node_id]
            assert reserved_cpu(f, node_id) == 2 * len(on_node)
            starts = [await next_command(sessions[node_id], "agent.start") for _ in on_node]
            assert sorted(agent_of(c) for c in starts) == sorted(a.id for a in on_node)
            for c in starts:
                body = orjson.loads(c.payload)
                assert body["name"] == "web" and body["spec"] == "image: x"
                record = f.commands.get(c.id)
                assert record.spec.target_node == node_id and record.agent_id == agent_of(c)
        for a in agents:
            stored = stored_agent(f, a.id)
            assert stored is not None and stored.node_id == a.node_id

        # The node reports running (in its messages) -> RUNNING; others stay pending.
        a0, a1, a2 = agents
        report_agents(f, a0.node_id, web_0="running")
        assert f.agents.get("web-0").state == RUNNING
        assert f.agents.get("web-1").state == PENDING
        # A report from a node the agent is not on is ignored.
        other = "n2" if a1.node_id == "n1" else "n1"
        report_agents(f, other, web_1="running")
        assert f.agents.get("web-1").state == PENDING
        # The start command succeeding also means running.
        start_of = {r.agent_id: r.id for r in f.commands.active_records()}
        f.commands.handle_reports(
            a2.node_id,
            pb.NodeMessage(results=[pb.CommandResult(command_id=start_of["web-2"], success=True)]),
        )
        assert f.agents.get("web-2").state == RUNNING
        assert reserved_cpu(f, a2.node_id) >= 2  # the command ended; the agent's stays
        await f.flush()
        assert stored_agent(f, "web-0").state == RUNNING  # type: ignore[union-attr]
        assert stored_agent(f, "web-2").state == RUNNING  # type: ignore[union-attr]
        assert f.agents.state_counts()["running"] == 2
        page, token = f.agents.list_agents(name="web", page_size=2)
        assert [a.id for a in page] == ["web-0", "web-1"] and token == "web-1"
        page, token = f.agents.list_agents(page_size=2, page_token=token)
        assert [a.id for a in page] == ["web-2"] and token == ""
        page, _ = f.agents.list_agents(states=[RUNNING])
        assert [a.id for a in page] == ["web-0", "web-2"]
        await f.stop()

    run(main())


BAD_AGENTS: list[tuple[str, Callable[[], pb.AgentSpec]]] = [
    ("spec.name", lambda: agent_spec("")),
    ("spec.name", lambda: agent_spec("Upper")),
    ("spec.name", lambda: agent_spec("under_score")),
    ("spec.name", lambda: agent_spec("-lead")),
    ("spec.name", lambda: agent_spec("x" * 64)),
    ("spec.replicas", lambda: agent_spec("ok", replicas=1001)),
    ("spec.request.cpu", lambda: agent_spec("ok", cpu=-1)),
    ("spec.request.gpu", lambda: agent_spec("ok", gpu=float("nan"))),
    ("spec.spec", lambda: pb.AgentSpec(name="ok", spec=b"x" * (1024 * 1024 + 1))),
    (
        "spec.placement.label_selector",
        lambda: agent_spec("ok", placement=pb.Placement(label_selector={"bad key": "v"})),
    ),
]


@pytest.mark.parametrize(("field", "make"), BAD_AGENTS, ids=[f for f, _ in BAD_AGENTS])
def test_bad_agent_spec_names_the_field_and_changes_nothing(
    tmp_path: Path, field: str, make: Callable[[], pb.AgentSpec]
) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        await f.node("n1")
        with pytest.raises(InvalidArgument) as err:
            await f.agents.deploy(make())
        assert err.value.field.startswith(field), err.value.field
        assert f.store.count(AGENTS_DB) == 0 and f.store.count(COMMANDS_DB) == 0
        assert f.agents.list_agents() == ([], "")
        assert f.scheduler.tasks_of("n1") == 0
        await f.stop()

    run(main())


def test_deploy_of_a_live_name_is_refused_until_it_stopped(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        s1 = await f.node("n1")
        assert s1 is not None
        await f.agents.deploy(agent_spec("db", replicas=2, cpu=1))
        with pytest.raises(FailedPrecondition, match="db"):
            await f.agents.deploy(agent_spec("db", replicas=1, cpu=3))
        assert reserved_cpu(f, "n1") == 2
        assert f.store.count(AGENTS_DB) == 3  # two replicas and their one spec
        assert len(f.agents.list_agents()[0]) == 2
        await f.agents.stop_agent("db")
        report_agents(f, "n1", db_0="stopped", db_1="stopped")
        assert reserved_cpu(f, "n1") == 0
        again = await f.agents.deploy(agent_spec("db", replicas=1, cpu=3))
        assert [a.id for a in again] == ["db-0"] and again[0].state == PENDING
        assert reserved_cpu(f, "n1") == 3
        await f.stop()

    run(main())


# ------------------------------------------------------------------ node down


def test_node_down_makes_agents_lost_then_places_them_elsewhere(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        s1 = await f.node("n1")
        assert s1 is not None
        (agent,) = await f.agents.deploy(agent_spec("api", cpu=2))
        assert agent.node_id == "n1"
        await next_command(s1, "agent.start")
        report_agents(f, "n1", api_0="running")
        assert f.agents.get("api-0").state == RUNNING
        s2 = await f.node("n2")
        assert s2 is not None
        assert reserved_cpu(f, "n2") == 0

        await f.down("n1", keep=["n2"])
        assert reserved_cpu(f, "n1") == 0
        # LOST may last only until the next agent tick: read it from the durable event log.
        await f.flush()
        lost = [
            pb.Agent.FromString(e.payload)
            for e in (pb.Event.FromString(b) for _, b in f.store.events_since(0, 1000))
            if e.type == "agent.lost"
        ]
        assert len(lost) == 1
        assert lost[0].id == "api-0" and lost[0].state == LOST and lost[0].node_id == ""
        assert "n1" in lost[0].message

        start = await next_command(s2, "agent.start")
        assert agent_of(start) == "api-0"
        agent = f.agents.get("api-0")
        assert agent.state == PENDING and agent.node_id == "n2" and agent.placements == 2
        assert reserved_cpu(f, "n2") == 2 and reserved_cpu(f, "n1") == 0
        report_agents(f, "n2", api_0="running")
        assert f.agents.get("api-0").state == RUNNING
        # The old node speaking up again changes nothing.
        report_agents(f, "n1", api_0="stopped")
        assert f.agents.get("api-0").state == RUNNING
        await f.stop()

    run(main())


# ------------------------------------------------------------------ stop


def test_stop_sends_agent_stop_and_ends_when_it_succeeds(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        s1 = await f.node("n1")
        assert s1 is not None
        await f.agents.deploy(agent_spec("job", cpu=2))
        await f.agents.deploy(agent_spec("other", cpu=1))
        report_agents(f, "n1", job_0="running", other_0="running")
        assert reserved_cpu(f, "n1") == 3
        replicas = await f.agents.stop_agent("job")
        assert [a.id for a in replicas] == ["job-0"] and replicas[0].stop_requested
        assert f.agents.get("job-0").state == RUNNING  # until the node confirms
        stop = await next_command(s1, "agent.stop")
        assert agent_of(stop) == "job-0"
        assert f.commands.get(stop.id).spec.target_node == "n1"
        f.commands.handle_reports(
            "n1", pb.NodeMessage(results=[pb.CommandResult(command_id=stop.id, success=True)])
        )
        assert f.agents.get("job-0").state == STOPPED
        assert reserved_cpu(f, "n1") == 1  # only "other" holds capacity now
        # A late "running" from the node does not bring it back.
        report_agents(f, "n1", job_0="running")
        assert f.agents.get("job-0").state == STOPPED
        # Stopping again sends nothing.
        await f.agents.stop_agent("job")
        await asyncio.sleep(0.03)
        assert [c for c in commands_in(drain(s1)) if c.kind == "agent.stop"] == []
        await f.flush()
        assert stored_agent(f, "job-0").state == STOPPED  # type: ignore[union-attr]
        await f.stop()

    run(main())


def test_stop_ends_when_the_node_reports_stopped_and_releases_once(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        s1 = await f.node("n1")
        assert s1 is not None
        await f.agents.deploy(agent_spec("job", cpu=2))
        await f.agents.deploy(agent_spec("keep", cpu=1))
        report_agents(f, "n1", job_0="running", keep_0="running")
        await f.agents.stop_agent("job")
        stop = await next_command(s1, "agent.stop")
        report_agents(f, "n1", job_0="stopped")
        assert f.agents.get("job-0").state == STOPPED
        assert reserved_cpu(f, "n1") == 1
        f.commands.handle_reports(
            "n1", pb.NodeMessage(results=[pb.CommandResult(command_id=stop.id, success=True)])
        )
        assert f.agents.get("job-0").state == STOPPED
        assert reserved_cpu(f, "n1") == 1  # the stop result released nothing twice
        assert f.agents.get("keep-0").state == RUNNING
        await f.stop()

    run(main())


def test_stale_stop_result_does_not_end_a_redeployed_agent(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        s1 = await f.node("n1")
        assert s1 is not None
        await f.agents.deploy(agent_spec("svc", cpu=2))
        report_agents(f, "n1", svc_0="running")
        await f.agents.stop_agent("svc")
        stop = await next_command(s1, "agent.stop")
        report_agents(f, "n1", svc_0="stopped")  # the node confirms before the result
        (again,) = await f.agents.deploy(agent_spec("svc", cpu=2))
        assert again.node_id == "n1" and again.state == PENDING
        # Now the first deployment's stop result arrives.
        f.commands.handle_reports(
            "n1", pb.NodeMessage(results=[pb.CommandResult(command_id=stop.id, success=True)])
        )
        agent = f.agents.get("svc-0")
        assert agent.state == PENDING and not agent.stop_requested
        assert reserved_cpu(f, "n1") == 2
        report_agents(f, "n1", svc_0="running")
        assert f.agents.get("svc-0").state == RUNNING
        await f.stop()

    run(main())


def test_stop_of_an_unplaced_agent_ends_it_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        s1 = await f.node("n1")
        assert s1 is not None
        (agent,) = await f.agents.deploy(agent_spec("gpu-job", gpu=1))
        assert agent.state == PENDING and agent.node_id == ""
        assert "gpu" in agent.message
        await f.agents.stop_agent("gpu-job")
        assert f.agents.get("gpu-job-0").state == STOPPED
        assert f.commands.active_count == 0
        gpu = await f.node("gpu", gpu=1)
        assert gpu is not None
        await asyncio.sleep(0.05)
        assert commands_in(drain(gpu)) == []  # a stopped agent is never placed
        assert f.scheduler.tasks_of("gpu") == 0
        with pytest.raises(NotFound):
            await f.agents.stop_agent("ghost")
        with pytest.raises(InvalidArgument):
            await f.agents.stop_agent("")
        with pytest.raises(NotFound):
            f.agents.get("ghost-0")
        await f.stop()

    run(main())


# ------------------------------------------------------------------ failing starts


def test_failing_start_is_placed_again_then_failed_releasing_once(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        s1 = await f.node("n1")
        assert s1 is not None
        await f.agents.deploy(agent_spec("keep", cpu=1))
        keep_start = await next_command(s1, "agent.start")
        f.commands.handle_reports(
            "n1", pb.NodeMessage(results=[pb.CommandResult(command_id=keep_start.id, success=True)])
        )
        assert f.agents.get("keep-0").state == RUNNING
        assert f.scheduler.tasks_of("n1") == 1
        await f.agents.deploy(agent_spec("flaky", cpu=2))
        for attempt in range(1, agents_mod.MAX_PLACEMENTS + 1):
            start = await next_command(s1, "agent.start")
            while agent_of(start) != "flaky-0":
                start = await next_command(s1, "agent.start")
            assert f.agents.get("flaky-0").placements == attempt
            assert reserved_cpu(f, "n1") == 3
            f.commands.handle_reports(
                "n1",
                pb.NodeMessage(
                    results=[pb.CommandResult(command_id=start.id, success=False, error="oom")]
                ),
            )
        agent = f.agents.get("flaky-0")
        assert agent.state == FAILED and "oom" in agent.message
        assert str(agents_mod.MAX_PLACEMENTS) in agent.message
        # Exactly its own reservation went back: "keep" still holds 1 cpu and 1 task.
        assert reserved_cpu(f, "n1") == 1
        assert f.scheduler.tasks_of("n1") == 1
        await asyncio.sleep(0.05)
        assert f.agents.get("flaky-0").placements == agents_mod.MAX_PLACEMENTS
        await f.stop()

    run(main())


# ------------------------------------------------------------------ restart


def test_restart_restores_agents_with_their_reservations(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        s1 = await f.node("n1")
        assert s1 is not None
        await f.agents.deploy(agent_spec("web", replicas=2, cpu=2))
        report_agents(f, "n1", web_0="running", web_1="running")
        await f.agents.deploy(agent_spec("gpu-job", gpu=1))
        await f.agents.deploy(agent_spec("old", cpu=1))
        await f.agents.stop_agent("old")
        report_agents(f, "n1", old_0="stopped")
        await f.stop()

        g = await fabric(tmp_path)
        states = {a.id: (a.state, a.node_id) for a in g.agents.list_agents()[0]}
        assert states == {
            "web-0": (RUNNING, "n1"),
            "web-1": (RUNNING, "n1"),
            "gpu-job-0": (PENDING, ""),
            "old-0": (STOPPED, "n1"),
        }
        assert reserved_cpu(g, "n1") == 4  # the running ones, not the stopped one
        with pytest.raises(FailedPrecondition):
            await g.agents.deploy(agent_spec("web"))
        # The waiting one is placed once capacity appears.
        gpu = await g.node("gpu", gpu=1)
        assert gpu is not None
        start = await next_command(gpu, "agent.start")
        assert agent_of(start) == "gpu-job-0"
        assert g.agents.get("gpu-job-0").node_id == "gpu"
        assert g.scheduler.reserved_of("gpu")["gpu"] == 1
        # Stopping a restored agent releases its restored reservation.
        s = await g.node("n1")
        assert s is not None
        await g.agents.stop_agent("web")
        report_agents(g, "n1", web_0="stopped", web_1="stopped")
        assert reserved_cpu(g, "n1") == 0
        await g.stop()

    run(main())


# ------------------------------------------------------------------ size caps


def stored_bytes(f: Fabric) -> int:
    """Bytes of values in the databases a deployment writes (agents, commands, events)."""
    return sum(len(v) for db in (AGENTS_DB, COMMANDS_DB, EVENTS_DB) for _, v in f.store.scan(db))


def spec_keys(f: Fabric) -> list[bytes]:
    return [k for k, _ in f.store.scan(AGENTS_DB, prefix=b"spec/")]


def test_the_spec_is_stored_once_per_agent_and_reaches_every_node(tmp_path: Path) -> None:
    """A 200KB spec x 40 replicas used to be written 40 times in records, events and the
    agent.start commands (~3x replicas x spec); now once, and the node still gets it."""

    async def main() -> None:
        f = await fabric(tmp_path)
        s1 = await f.node("n1", cpu=64)
        assert s1 is not None
        blob = b"y" * (200 * 1024)
        before = stored_bytes(f)
        agents = await f.agents.deploy(
            pb.AgentSpec(name="big", spec=blob, request=res(cpu=1), replicas=40)
        )
        assert all(not a.spec.spec and a.spec_size == len(blob) for a in agents)
        starts = [await next_command(s1, "agent.start") for _ in agents]
        await f.flush()
        grown = stored_bytes(f) - before
        assert len(blob) <= grown < len(blob) + 40 * 4096, grown
        # The node gets the spec, built at dispatch; the command record keeps a reference.
        assert all(orjson.loads(c.payload)["spec"] == blob.decode() for c in starts)
        assert all(len(f.commands.get(c.id).spec.payload) < 256 for c in starts)
        # GetAgent returns the spec; lists and the stored replicas do not repeat it.
        assert f.agents.get("big-7").spec.spec == blob
        page, _ = f.agents.list_agents()
        assert len(page) == 40 and all(not a.spec.spec and a.spec_size for a in page)
        assert len(spec_keys(f)) == 1
        # A reconnecting node gets its in-flight starts again, with the spec.
        s2 = await f.node("n1", cpu=64)
        assert s2 is not None
        again = await next_command(s2, "agent.start")
        assert orjson.loads(again.payload)["spec"] == blob.decode()
        await f.stop()

    run(main())


def test_the_spec_survives_a_restart_and_is_sent_after_it(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        await f.node("n1", connect=False)
        await f.agents.deploy(pb.AgentSpec(name="web", spec=b"image: big", request=res(cpu=1)))
        await f.stop()

        g = await fabric(tmp_path)
        assert g.agents.get("web-0").spec.spec == b"image: big"
        s1 = await g.node("n1")
        assert s1 is not None
        start = await next_command(s1, "agent.start")
        assert orjson.loads(start.payload)["spec"] == "image: big"
        await g.stop()

    run(main())


def test_a_replica_stored_with_its_spec_inline_is_loaded_and_its_spec_kept(
    tmp_path: Path,
) -> None:
    """Records written before specs were stored once still load, and keep their spec."""

    async def main() -> None:
        f = await fabric(tmp_path)
        legacy = pb.Agent(id="old-0", name="old", state=STOPPED, created_ms=5)
        legacy.spec.CopyFrom(pb.AgentSpec(name="old", spec=b"image: legacy", replicas=1))
        await f.store.commit([Put(AGENTS_DB, b"old-0", legacy.SerializeToString())])
        await f.stop()

        g = await fabric(tmp_path)
        assert g.agents.get("old-0").spec.spec == b"image: legacy"
        assert g.agents.list_agents()[0][0].spec_size == len(b"image: legacy")
        await g.flush()
        assert spec_keys(g) == [b"spec/old/0000000000000005"]
        await g.stop()

    run(main())


def test_redeploying_drops_specs_no_replica_refers_to(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)  # no node: replicas wait, and stop at once
        await f.agents.deploy(pb.AgentSpec(name="x", spec=b"A", replicas=2))
        await f.agents.stop_agent("x")
        await asyncio.sleep(0.005)  # a later deployment (specs are keyed by created_ms)
        await f.agents.deploy(pb.AgentSpec(name="x", spec=b"B", replicas=1))
        # x-1 of the first deployment is still listed, with its own spec.
        assert f.agents.get("x-0").spec.spec == b"B"
        assert f.agents.get("x-1").spec.spec == b"A"
        assert len(spec_keys(f)) == 2
        await f.agents.stop_agent("x")
        await asyncio.sleep(0.005)
        await f.agents.deploy(pb.AgentSpec(name="x", spec=b"C", replicas=2))
        assert [f.agents.get(i).spec.spec for i in ("x-0", "x-1")] == [b"C", b"C"]
        assert len(spec_keys(f)) == 1
        await f.stop()

    run(main())


def test_spec_size_and_replica_limits_come_from_the_settings(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        f.agents.settings = AgentSettings(max_spec_bytes=100, max_replicas=3)
        with pytest.raises(InvalidArgument) as err:
            await f.agents.deploy(pb.AgentSpec(name="a", spec=b"x" * 101))
        assert err.value.field == "spec.spec" and "agents.max_spec_bytes" in str(err.value)
        with pytest.raises(InvalidArgument) as err:
            await f.agents.deploy(pb.AgentSpec(name="a", spec=b"x", replicas=4))
        assert err.value.field == "spec.replicas" and "agents.max_replicas" in str(err.value)
        # At the limits it deploys.
        deployed = await f.agents.deploy(pb.AgentSpec(name="a", spec=b"x" * 100, replicas=3))
        assert len(deployed) == 3
        await f.flush()
        assert len(spec_keys(f)) == 1
        await f.stop()

    run(main())


def test_agent_list_pages_end_before_the_byte_budget(tmp_path: Path) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        labels = {f"k{i}": "v" * 200 for i in range(10)}  # ~2KB per replica
        await f.agents.deploy(
            pb.AgentSpec(name="w", replicas=10, placement=pb.Placement(label_selector=labels))
        )
        one = f.agents.list_agents(page_size=1)[0][0].ByteSize()
        f.agents.settings = AgentSettings(max_page_bytes=3 * one + 30)
        seen: list[str] = []
        token = ""
        while True:
            page, token = f.agents.list_agents(page_token=token)
            assert 1 <= len(page) <= 3
            seen += [a.id for a in page]
            if not token:
                break
        assert seen == sorted(f"w-{i}" for i in range(10))
        await f.stop()

    run(main())
