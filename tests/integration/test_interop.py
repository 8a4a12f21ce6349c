"""Interop friction a client in another language meets (issue 13): one JSON enum style, every
field present, integers as strings accepted, a marker for a timed-out WaitCommands, retries
of target_node commands, node.connected / node.disconnected events, and ALREADY_EXISTS for a
reused idempotency key. Real server, real gRPC and WebSocket clients."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from websockets.sync.client import ClientConnection, connect

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import ServerProcess, http_get, wait_for
from .events_util import ws_url
from .test_nodes_api import NodeStream, register

SUBMIT_RESULT_FIELDS = {"id", "state", "node_id", "reason", "duplicate"}


class WsClient:
    """A plain WebSocket JSON client (what a browser or Node.js ``ws`` user writes)."""

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.backlog: list[dict[str, Any]] = []  # events that arrived while awaiting a reply

    def ask(self, op: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
        """Send ``op`` with an id and return the reply carrying that id."""
        op_id = f"op-{time.monotonic_ns()}"
        self.conn.send(json.dumps({**op, "id": op_id}))
        deadline = time.monotonic() + timeout
        while True:
            frame = json.loads(self.conn.recv(timeout=max(0.01, deadline - time.monotonic())))
            if frame.get("id") == op_id:
                return frame  # type: ignore[no-any-return]
            if frame.get("type") == "events":
                self.backlog.extend(frame["events"])

    def events_until(self, done: Any, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Every event received (backlog first) until ``done(events)`` holds."""
        seen, self.backlog = self.backlog, []
        deadline = time.monotonic() + timeout
        while not done(seen):
            left = deadline - time.monotonic()
            assert left > 0, f"timed out; events so far: {[(e['type'], e['key']) for e in seen]}"
            frame = json.loads(self.conn.recv(timeout=left))
            if frame.get("type") == "events":
                seen.extend(frame["events"])
        return seen


@pytest.fixture
def ws(server: ServerProcess) -> Iterator[WsClient]:
    with connect(ws_url(server), open_timeout=5) as conn:
        yield WsClient(conn)


def store_stat(server: ServerProcess) -> dict[str, Any]:
    _, body, _ = http_get(server.http_base + "/health/detailed")
    return json.loads(body)["components"]["store"]  # type: ignore[no-any-return]


# ---------------------------------------------------------------- 1-3: WebSocket JSON


def test_ws_submitted_reply_and_event_payloads_share_one_json_style(
    server: ServerProcess, node_stub: pb_grpc.NodeServiceStub, ws: WsClient
) -> None:
    reply = register(node_stub, "n1")
    stream = NodeStream(node_stub, "n1", reply.session_epoch)
    try:
        # Integers as canonical proto3 JSON writes 64-bit ones: decimal strings.
        subscribed = ws.ask({"op": "subscribe", "topics": ["command", "node"], "after_index": "0"})
        assert subscribed["type"] == "subscribed" and subscribed["after_index"] == 0
        spec = {
            "idempotency_key": "interop-1",
            "kind": "echo",
            "target_node": "n1",
            "priority": "2",
            "timeout_ms": "30000",
            "max_attempts": "1",
        }
        submitted = ws.ask({"op": "submit", "commands": [spec]})
        assert submitted["type"] == "submitted", submitted
        (result,) = submitted["results"]
        # Every field, false and empty ones too, and the short lower-case enum name.
        assert result == {
            "id": "interop-1",
            "state": "placed",
            "node_id": "n1",
            "reason": "",
            "duplicate": False,
        }
        again = ws.ask({"op": "submit", "commands": [spec]})
        assert again["results"][0]["duplicate"] is True
        assert set(again["results"][0]) == SUBMIT_RESULT_FIELDS

        events = ws.events_until(lambda seen: any(e["type"] == "command.placed" for e in seen))
        node_event = next(e for e in events if e["topic"] == "node")
        assert node_event["payload"]["status"] == "ready"
        placed = next(e for e in events if e["type"] == "command.placed")
        payload = placed["payload"]
        # The reply and the event name the state the same way.
        assert payload["state"] == result["state"] == "placed"
        assert payload["spec"]["priority"] == 2 and payload["spec"]["timeout_ms"] == 30000
        assert payload["reason"] == "" and payload["tried_nodes"] == []  # empty ones present
    finally:
        stream.close()


def test_ws_after_index_accepts_strings_and_refuses_non_integers(
    ws: WsClient, control: pb_grpc.ControlServiceStub
) -> None:
    control.SubmitCommands(pb.SubmitCommandsRequest(commands=[pb.CommandSpec(kind="x")]))
    ok = ws.ask({"op": "subscribe", "topics": ["command"], "after_index": "1"})
    assert ok["type"] == "subscribed" and ok["after_index"] == 1
    for bad in ("1.5", "-1", "0x10", "", 1.5, True, -1):
        refused = ws.ask({"op": "subscribe", "after_index": bad})
        assert refused["type"] == "error" and refused["code"] == "bad_request", (bad, refused)
    ahead = ws.ask({"op": "subscribe", "after_index": "999999"})
    assert ahead["code"] == "invalid_argument"  # parsed as a number, then checked
    refused = ws.ask({"op": "submit", "commands": [{"kind": "x", "priority": "two"}]})
    assert refused["code"] == "invalid_argument" and "priority" in refused["message"]


# ---------------------------------------------------------------- 4: WaitCommands timeout


def test_wait_commands_timeout_ends_with_a_marker_naming_the_unfinished(
    control: pb_grpc.ControlServiceStub,
) -> None:
    nowhere = pb.Placement(label_selector={"zone": "nowhere"})
    specs = [
        pb.CommandSpec(kind="stuck", placement=nowhere),
        pb.CommandSpec(kind="done", placement=nowhere),
        pb.CommandSpec(kind="stuck-too", placement=nowhere),
    ]
    ids = [r.id for r in control.SubmitCommands(pb.SubmitCommandsRequest(commands=specs)).results]
    control.CancelCommand(pb.CancelCommandRequest(id=ids[1]))

    call = control.WaitCommands(pb.WaitCommandsRequest(ids=ids, timeout_ms=300), timeout=20)
    records = list(call)
    assert call.code() == grpc.StatusCode.OK
    assert [r.id for r in records[:-1]] == [ids[1]]
    assert records[0].state == pb.COMMAND_STATE_CANCELLED
    marker = records[-1]
    assert marker.id == "" and list(marker.wait_timed_out_ids) == [ids[0], ids[2]]
    assert marker == pb.CommandRecord(wait_timed_out_ids=[ids[0], ids[2]])  # nothing else set

    # All final in time: no marker.
    (only,) = control.WaitCommands(pb.WaitCommandsRequest(ids=[ids[1]], timeout_ms=300))
    assert only.id == ids[1]


# ---------------------------------------------------------------- 5: target_node retries


def test_target_node_failure_retries_on_the_same_node_until_max_attempts(
    node_stub: pb_grpc.NodeServiceStub, control: pb_grpc.ControlServiceStub
) -> None:
    reply = register(node_stub, "pinned")
    stream = NodeStream(node_stub, "pinned", reply.session_epoch)

    def next_command() -> pb.Command:
        while True:
            message = stream.next(10)
            assert isinstance(message, pb.ControlMessage), message
            if message.commands:
                (command,) = message.commands
                return command

    def fail(command: pb.Command) -> None:
        result = pb.CommandResult(
            command_id=command.id,
            attempt=command.attempt,
            success=False,
            error=f"boom {command.attempt}",
        )
        stream.send(pb.NodeMessage(results=[result]))

    try:
        spec = pb.CommandSpec(kind="echo", target_node="pinned", max_attempts=3)
        (submitted,) = control.SubmitCommands(pb.SubmitCommandsRequest(commands=[spec])).results
        first = next_command()
        assert (first.id, first.attempt) == (submitted.id, 1)
        fail(first)
        second = next_command()  # the same node, the next attempt
        assert (second.id, second.attempt) == (submitted.id, 2)
        fail(second)
        third = next_command()
        assert (third.id, third.attempt) == (submitted.id, 3)
        stream.send(
            pb.NodeMessage(results=[pb.CommandResult(command_id=third.id, attempt=3, success=True)])
        )
        wait_for(
            lambda: (
                control.GetCommand(pb.GetCommandRequest(id=submitted.id)).state
                == pb.COMMAND_STATE_SUCCEEDED
            ),
            10,
            message="succeeded on the third attempt",
        )
        record = control.GetCommand(pb.GetCommandRequest(id=submitted.id))
        assert record.attempt == 3 and record.node_id == "pinned"
        assert list(record.tried_nodes) == []  # it never left its node

        # Attempts used up: FAILED with the last reason, at max_attempts.
        spec = pb.CommandSpec(kind="echo", target_node="pinned", max_attempts=2)
        (submitted,) = control.SubmitCommands(pb.SubmitCommandsRequest(commands=[spec])).results
        fail(next_command())
        fail(next_command())
        wait_for(
            lambda: (
                control.GetCommand(pb.GetCommandRequest(id=submitted.id)).state
                == pb.COMMAND_STATE_FAILED
            ),
            10,
            message="failed after two attempts",
        )
        record = control.GetCommand(pb.GetCommandRequest(id=submitted.id))
        assert record.attempt == 2 and record.reason == "boom 2"
    finally:
        stream.close()


def test_reference_node_runs_a_retried_target_command_again(
    server: ServerProcess,
    fleet_factory: type,
    control: pb_grpc.ControlServiceStub,
    tmp_path: Path,
) -> None:
    record_file = tmp_path / "executions.jsonl"
    fleet = fleet_factory.create(
        server.grpc_target, 1, "--failure-rate", "1", "--record", str(record_file)
    )
    wait_for(
        lambda: any(n.connected for n in control.ListNodes(pb.ListNodesRequest()).nodes),
        30,
        message="node connected",
    )
    spec = pb.CommandSpec(kind="echo", target_node="node-00000", max_attempts=3)
    (submitted,) = control.SubmitCommands(pb.SubmitCommandsRequest(commands=[spec])).results
    (final,) = control.WaitCommands(
        pb.WaitCommandsRequest(ids=[submitted.id], timeout_ms=20_000), timeout=30
    )
    assert final.state == pb.COMMAND_STATE_FAILED and final.attempt == 3, (final, fleet.log())

    def attempts() -> list[int]:  # the node's own record, flushed every 200 ms
        if not record_file.exists():
            return []
        lines = record_file.read_text().splitlines()
        runs = [json.loads(line) for line in lines if line.strip()]
        return [r["attempt"] for r in runs if r["command_id"] == submitted.id]

    # Run again for each attempt (not answered from its de-dup cache).
    wait_for(lambda: attempts() == [1, 2, 3], 10, message=f"three runs, got {attempts()}")


# ---------------------------------------------------------------- 6: connection events


def test_node_connected_and_disconnected_events(
    server: ServerProcess, node_stub: pb_grpc.NodeServiceStub, ws: WsClient
) -> None:
    assert ws.ask({"op": "subscribe", "topics": ["node"], "after_index": 0})["type"] == (
        "subscribed"
    )
    reply = register(node_stub, "edge-1")
    stream = NodeStream(node_stub, "edge-1", reply.session_epoch)
    events = ws.events_until(lambda seen: any(e["type"] == "node.connected" for e in seen))
    connected = next(e for e in events if e["type"] == "node.connected")
    assert connected["key"] == "edge-1" and connected["payload"]["connected"] is True
    assert [e["type"] for e in events] == ["node.registered", "node.connected"]

    stream.close()
    events = ws.events_until(lambda seen: any(e["type"] == "node.disconnected" for e in seen))
    gone = next(e for e in events if e["type"] == "node.disconnected")
    assert gone["key"] == "edge-1" and gone["payload"]["connected"] is False
    assert gone["payload"]["status"] == "ready"  # a dropped stream is not (yet) a down node
    assert gone["index"] > connected["index"]


def test_connection_events_of_many_nodes_are_group_committed(
    server_factory: type, fleet_factory: type
) -> None:
    nodes = 300
    # A long node timeout: no node.down commits mix into the measurement.
    server = server_factory.create(NEXUS_NODE_TIMEOUT="120s").start()
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)

        def connected() -> int:
            return sum(
                n.connected for n in control.ListNodes(pb.ListNodesRequest(page_size=1000)).nodes
            )

        fleet = fleet_factory.create(server.grpc_target, nodes)
        wait_for(lambda: connected() == nodes, 60, 0.25, f"{nodes} nodes connected")
        before = store_stat(server)
        fleet.proc.kill()  # every stream drops at once
        fleet.proc.wait()
        wait_for(lambda: connected() == 0, 30, 0.25, "every stream closed")
        wait_for(
            lambda: store_stat(server)["last_event_index"] >= before["last_event_index"] + nodes,
            10,
            message="disconnect events durable",
        )
        after = store_stat(server)
        events = after["last_event_index"] - before["last_event_index"]
        txns = after["txn_count"] - before["txn_count"]
        print(f"{nodes} disconnects: {events} events in {txns} write txns")
        assert events == nodes  # one node.disconnected per node, nothing else
        assert txns < nodes  # batched: not one commit per node


# ---------------------------------------------------------------- 7: idempotency key reuse


def test_reused_idempotency_key_with_another_spec_is_already_exists(
    control: pb_grpc.ControlServiceStub, ws: WsClient
) -> None:
    spec = pb.CommandSpec(idempotency_key="job-42", kind="echo", payload=b"a", priority=1)
    (first,) = control.SubmitCommands(pb.SubmitCommandsRequest(commands=[spec])).results
    assert not first.duplicate
    # The same spec, also with 0 = "server default" for the filled-in fields: a duplicate.
    (again,) = control.SubmitCommands(pb.SubmitCommandsRequest(commands=[spec])).results
    assert again.duplicate and again.id == "job-42"

    other = pb.CommandSpec(idempotency_key="job-42", kind="echo", payload=b"b", priority=1)
    fresh = pb.CommandSpec(idempotency_key="job-43", kind="echo")
    with pytest.raises(grpc.RpcError) as err:
        control.SubmitCommands(pb.SubmitCommandsRequest(commands=[fresh, other]))
    assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "commands[1].idempotency_key" in err.value.details()
    assert "'job-42'" in err.value.details()
    # The batch was refused as a whole: the fresh command in it does not exist.
    with pytest.raises(grpc.RpcError) as missing:
        control.GetCommand(pb.GetCommandRequest(id="job-43"))
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    kept = control.GetCommand(pb.GetCommandRequest(id="job-42"))
    assert kept.spec.payload == b"a"

    refused = ws.ask(
        {"op": "submit", "commands": [{"idempotency_key": "job-42", "kind": "other"}]},
    )
    assert refused["type"] == "error" and refused["code"] == "already_exists"
    assert "job-42" in refused["message"]


def test_http_json_uses_the_same_enum_style(
    server: ServerProcess, control: pb_grpc.ControlServiceStub
) -> None:
    nowhere = pb.Placement(label_selector={"zone": "nowhere"})
    spec = pb.CommandSpec(kind="x", placement=nowhere)
    (result,) = control.SubmitCommands(pb.SubmitCommandsRequest(commands=[spec])).results
    status, body, _ = http_get(f"{server.http_base}/api/v1/commands/{result.id}")
    assert status == 200 and json.loads(body)["state"] == "pending"
    control.DeployAgent(pb.DeployAgentRequest(spec=pb.AgentSpec(name="w", replicas=1)))
    # The filter takes the name the JSON shows, and the full enum name.
    for state in ("pending", "AGENT_STATE_PENDING"):
        status, body, _ = http_get(f"{server.http_base}/api/v1/agents?state={state}")
        agents = json.loads(body)["agents"]
        assert status == 200 and [a["state"] for a in agents] == ["pending"], (state, body)
