"""Time travel (issue 14, acceptance item 3): ``replay --until-index N`` equals the state
recorded at N, for several N.

A history is made through the real API (nodes register, commands are submitted and one
cancelled, a node is drained, one made ineligible, one removed, an agent deployed); after
each step the test records the event index and the state the live JSON API answers, read
once the index has been still for a moment and checked unchanged after. Then, with the server
still running, ``nexus-fast replay`` rebuilds each recorded moment from the event log,
printed as JSON and served over HTTP.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from nexus_fast.benchmark.procs import free_ports
from nexus_fast.data_cli import load_snapshot, snapshot_json
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import HOST, REPO, ServerProcess, http_get, run_module, wait_for

# Heartbeats change memory only (never an event): a replay shows them as of the last event.
_MEMORY_ONLY = ("usage", "last_heartbeat_ms")


def get_json(server: ServerProcess, path: str) -> Any:
    status, body, _ = server.http(path)
    assert status == 200, (path, status, body)
    return json.loads(body)


def comparable(state: dict[str, Any]) -> dict[str, Any]:
    nodes = [{k: v for k, v in n.items() if k not in _MEMORY_ONLY} for n in state["nodes"]]
    return {**state, "nodes": nodes}


def diff(got: dict[str, Any], want: dict[str, Any]) -> list[str]:
    """Where two states differ: kind, id, field, replayed value, recorded value."""
    out = []
    for kind in ("nodes", "commands", "agents"):
        mine = {e["id"]: e for e in got[kind]}
        theirs = {e["id"]: e for e in comparable(want)[kind]}
        for key in sorted(mine.keys() | theirs.keys()):
            a, b = mine.get(key, {}), theirs.get(key, {})
            out += [
                f"{kind} {key} {f}: {a.get(f)!r} != {b.get(f)!r}"
                for f in a | b
                if a.get(f) != b.get(f)
            ]
    return out


class Recorder:
    """Records (index, state) moments of a live server."""

    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.command_ids: list[str] = []  # submitted by the test
        self.moments: list[tuple[int, dict[str, Any]]] = []

    def list_commands(self) -> list[str]:
        """Every command id (agent start/stop commands too), over gRPC: HTTP has no list."""
        with self.server.channel() as channel:
            page = pb_grpc.ControlServiceStub(channel).ListCommands(
                pb.ListCommandsRequest(page_size=1000)
            )
        assert not page.next_page_token
        return [c.id for c in page.commands]

    def index(self) -> int:
        detail = get_json(self.server, "/health/detailed")
        return int(detail["components"]["store"]["last_event_index"])

    def record(self) -> int:
        for _ in range(50):
            # Later transitions are committed a moment after memory changes (without
            # holding anything up): read once the log has been still for a while.
            before = self.index()
            time.sleep(0.3)
            if self.index() != before:
                continue
            state = {
                "nodes": get_json(self.server, "/api/v1/nodes?limit=1000")["nodes"],
                "commands": [
                    get_json(self.server, f"/api/v1/commands/{i}") for i in self.list_commands()
                ],
                "agents": get_json(self.server, "/api/v1/agents?limit=1000")["agents"],
            }
            if self.index() == before:
                self.moments.append((before, state))
                return before
        raise AssertionError("the server kept writing while the state was read")


def replay_json(data_dir: Path, *args: str) -> dict[str, Any]:
    result = run_module("nexus_fast.cli", "replay", "--db-path", str(data_dir), "-o", "json", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return dict(json.loads(result.stdout))


def test_replay_until_index_equals_the_recorded_state(server_factory: type) -> None:
    server: ServerProcess = server_factory.create(NEXUS_NODE_TIMEOUT="120s").start()
    rec = Recorder(server)
    with server.channel() as channel:
        nodes = pb_grpc.NodeServiceStub(channel)
        control = pb_grpc.ControlServiceStub(channel)
        for i in range(3):
            nodes.Register(
                pb.RegisterRequest(
                    node_id=f"rp-{i}",
                    address=f"10.0.0.{i}:7000",
                    labels={"zone": "ab"[i % 2]},
                    capacity=pb.Resources(cpu=8, memory=1 << 30),
                )
            )
        rec.record()
        specs = [pb.CommandSpec(kind="echo", payload=b"x" * n) for n in (3, 2000, 10)]
        result = control.SubmitCommands(pb.SubmitCommandsRequest(commands=specs))
        rec.command_ids += [r.id for r in result.results]
        rec.record()
        control.DrainNode(pb.DrainNodeRequest(node_id="rp-1", drain=True, reason="disk"))
        control.SetNodeEligibility(pb.SetNodeEligibilityRequest(node_id="rp-2", eligible=False))
        control.CancelCommand(pb.CancelCommandRequest(id=rec.command_ids[0]))
        rec.record()
        control.DeployAgent(pb.DeployAgentRequest(spec=pb.AgentSpec(name="web", replicas=2)))
        rec.record()
        control.RemoveNode(pb.RemoveNodeRequest(node_id="rp-1"))
        rec.record()

    indices = [index for index, _ in rec.moments]
    assert indices == sorted(set(indices)), indices  # every step wrote events
    # The command line once; the loop calls the same functions in this process (faster).
    cli = replay_json(server.data_dir, "--until-index", str(indices[1]))
    assert cli == snapshot_json(load_snapshot(server.data_dir, indices[1]))
    for index, state in rec.moments:
        replayed = snapshot_json(load_snapshot(server.data_dir, index))
        assert replayed["index"] == index
        got = comparable({k: replayed[k] for k in ("nodes", "commands", "agents")})
        assert got == comparable(state), f"state at event {index} differs: {diff(got, state)}"

    # The big payload (left out of its events) comes back from the stored record.
    last = snapshot_json(load_snapshot(server.data_dir))
    big = next(c for c in last["commands"] if c["id"] == rec.command_ids[1])
    assert (
        big["spec"]["payload"]
        == get_json(server, f"/api/v1/commands/{big['id']}")["spec"]["payload"]
    )

    # --until-time: the last event at or before that moment.
    at = load_snapshot(server.data_dir, indices[2]).time_ms
    by_time = snapshot_json(load_snapshot(server.data_dir, until_time_ms=at))
    assert by_time["time_ms"] == at and by_time["index"] >= indices[2]

    # Too far: one line naming the end of the log, exit 1.
    result = run_module(
        "nexus_fast.cli", "replay", "--db-path", str(server.data_dir), "--until-index", "99999"
    )
    assert result.returncode == 1 and "the log ends at" in result.stderr, result.stderr

    serve_and_compare(server, indices[3], rec.moments[3][1])


def serve_and_compare(server: ServerProcess, index: int, state: dict[str, Any]) -> None:
    """``replay --serve``: the same shapes as the live JSON API, read-only."""
    (port,) = free_ports(1)
    args = ["--db-path", str(server.data_dir), "--until-index", str(index), "--serve", str(port)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "nexus_fast.cli", "replay", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    base = f"http://{HOST}:{port}"
    try:
        wait_for(lambda: _up(base), 20, message="replay --serve listening")
        nodes = json.loads(http_get(f"{base}/api/v1/nodes")[1])
        agents = json.loads(http_get(f"{base}/api/v1/agents")[1])
        assert nodes["next_page_token"] == "" and agents["next_page_token"] == ""
        assert comparable(
            {"nodes": nodes["nodes"], "commands": [], "agents": agents["agents"]}
        ) == (comparable({**state, "commands": []}))
        for command in state["commands"]:
            status, body, _ = http_get(f"{base}/api/v1/commands/{command['id']}")
            assert status == 200 and json.loads(body) == command
        page = json.loads(http_get(f"{base}/api/v1/commands?limit=1")[1])
        assert len(page["commands"]) == 1 and page["next_page_token"]
        status, body, _ = http_get(f"{base}/api/v1/nodes/nope")
        assert status == 404 and json.loads(body)["error"]["code"] == "not_found"
        status, _, _ = http_get(f"{base}/api/v1/nodes?limit=0")
        assert status == 400
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0, out


def _up(base: str) -> bool:
    try:
        return http_get(f"{base}/api/v1/replay", 1.0)[0] == 200
    except OSError:
        return False
