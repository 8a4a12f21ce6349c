"""Nodes act only as themselves: the session epoch (public) never takes a live stream.

A real ``nexus-node`` process holds the stream; an intruder connects with its id and epoch
and is refused (auth off and on); the real node keeps executing commands; a legit restart
of nexus-node (old process frozen, so its stream is half-dead) takes over; the refusal and
the takeover are events with their actor; commands carry their submitter's name.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .auth_util import SecureServer, bearer, client_ssl, running, secure_server, token, ws, ws_op
from .conftest import ServerProcess, list_all_nodes, wait_for

# Fast heartbeats so "silent for two intervals" (a half-dead stream) comes quickly.
FAST = {"NEXUS_HEARTBEAT_INTERVAL": "0.5s", "NEXUS_NODE_TIMEOUT": "30s"}


def _node(control: pb_grpc.ControlServiceStub, metadata: object = None) -> pb.Node:
    nodes = list_all_nodes(control) if metadata is None else None
    if nodes is None:
        nodes = list(control.ListNodes(pb.ListNodesRequest(), metadata=metadata).nodes)
    assert len(nodes) == 1, nodes
    return nodes[0]


def _intrude(channel: grpc.Channel, node: pb.Node, metadata: object = None) -> grpc.RpcError:
    """Connect as ``node`` with its public epoch; returns the error the stream ends with."""
    stub = pb_grpc.NodeServiceStub(channel)
    first = pb.NodeMessage(node_id=node.id, session_epoch=node.session_epoch)
    call = stub.Connect(iter([first]), metadata=metadata, timeout=10)
    with pytest.raises(grpc.RpcError) as caught:
        for _ in call:
            pass
    return caught.value


def _run_command(
    control: pb_grpc.ControlServiceStub, node_id: str, metadata: object = None
) -> None:
    response = control.SubmitCommands(
        pb.SubmitCommandsRequest(commands=[pb.CommandSpec(kind="echo", target_node=node_id)]),
        metadata=metadata,
        timeout=10,
    )
    ids = [r.id for r in response.results]
    done = list(control.WaitCommands(pb.WaitCommandsRequest(ids=ids, timeout_ms=15000),
                                     metadata=metadata, timeout=20))  # fmt: skip
    assert [r.state for r in done] == [pb.COMMAND_STATE_SUCCEEDED], done


def _events(control: pb_grpc.ControlServiceStub, metadata: object = None) -> list[pb.Event]:
    """Every event so far: read from index 0 until a bookmark or the deadline (caught up)."""
    out: list[pb.Event] = []
    call = control.WatchEvents(pb.WatchEventsRequest(after_index=0), metadata=metadata, timeout=3)
    try:
        for batch in call:
            if not batch.events:
                break
            out.extend(batch.events)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise
    finally:
        call.cancel()
    assert out
    return out


def test_intruder_refused_auth_off_and_restart_takes_over(
    server_factory: type, fleet_factory: type
) -> None:
    server: ServerProcess = server_factory.create(**FAST).start()
    target = server.grpc_target
    fleet = fleet_factory.create(target, 1, "--id-prefix", "real-")
    with grpc.insecure_channel(target) as channel, grpc.insecure_channel(target) as intruder:
        control = pb_grpc.ControlServiceStub(channel)
        wait_for(lambda: list_all_nodes(control) and _node(control).connected, 20, message="up")
        node = _node(control)

        error = _intrude(intruder, node)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
        after = _node(control)
        assert after.connected and after.session_epoch == node.session_epoch
        _run_command(control, node.id)  # the real node still has its stream and works
        assert fleet.proc.poll() is None, fleet.log()

        refused = [e for e in _events(control) if e.type == "node.takeover_refused"]
        assert refused and refused[0].key == node.id and refused[0].actor == "anonymous"
        assert refused[0].details["call"] == "Connect"
        assert "node takeover refused" in server.log()

        # A legit restart: the old process freezes (its stream half-dead, silent), a new
        # nexus-node with the same id registers; once the old stream is silent for two
        # heartbeat intervals, the new one takes over and works.
        fleet.proc.send_signal(signal.SIGSTOP)
        try:
            restarted = fleet_factory.create(target, 1, "--id-prefix", "real-")
            wait_for(
                lambda: (
                    _node(control).session_epoch > node.session_epoch and _node(control).connected
                ),
                30,
                message="restarted node took over",
            )
            _run_command(control, node.id)
            assert restarted.proc.poll() is None, restarted.log()
        finally:
            fleet.proc.send_signal(signal.SIGKILL)
            fleet.proc.wait()
        superseded = [e for e in _events(control) if e.type == "node.superseded"]
        assert superseded and superseded[-1].actor == "anonymous", superseded
        assert superseded[-1].details["old_epoch"] == str(node.session_epoch)
        assert "node stream superseded" in server.log()


# ---------------------------------------------------------------- auth on (tokens over TLS)


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[SecureServer]:
    with running(secure_server(tmp_path_factory.mktemp("takeover-auth"), pki, **FAST)) as process:
        yield process


def test_second_principal_refused_auth_on(
    secure: SecureServer, pki: Path, fleet_factory: type
) -> None:
    node_token = token(pki, "node:sec-00000", "node")
    alice = bearer(token(pki, "alice", "operator"))
    mallory = bearer(token(pki, "mallory", "admin"))  # may call NodeService, is not the node
    fleet = fleet_factory.create(secure.grpc_target, 1, "--id-prefix", "sec-",
                                 "--tls-ca", str(pki / "ca.pem"), "--token", node_token)  # fmt: skip
    credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes())
    with grpc.secure_channel(secure.grpc_target, credentials) as channel:
        control = pb_grpc.ControlServiceStub(channel)
        wait_for(lambda: _nodes_connected(control, alice), 20, message=f"node up\n{fleet.log()}")
        node = _node(control, alice)
        assert node.id == "sec-00000"

        error = _intrude(channel, node, mallory)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error
        again = pb_grpc.NodeServiceStub(channel).Register
        with pytest.raises(grpc.RpcError) as caught:
            again(pb.RegisterRequest(node_id=node.id), metadata=mallory, timeout=10)
        assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

        after = _node(control, alice)
        assert after.connected and after.session_epoch == node.session_epoch
        _run_command(control, node.id, alice)
        assert fleet.proc.poll() is None, fleet.log()

        bob = token(pki, "bob", "operator")
        with ws(secure, client_ssl(pki), headers={"Authorization": f"Bearer {bob}"}) as conn:
            reply = ws_op(conn, {"op": "submit", "commands": [{"kind": "echo"}]})
            assert reply["type"] == "submitted", reply
        events = _events(control, alice)
        assert any(e.topic == "command" and e.actor == "bob" for e in events)
        refused = [e for e in events if e.type == "node.takeover_refused"]
        assert {(e.actor, e.details["owner"]) for e in refused} == {("mallory", "node:sec-00000")}
        submitted = [e for e in events if e.topic == "command" and e.actor == "alice"]
        assert submitted, [(e.type, e.actor) for e in events if e.topic == "command"]
        # Transitions the server and the node drive are not alice's doing.
        assert any(e.type == "command.succeeded" and e.actor == "" for e in events)
        registered = [e for e in events if e.type == "node.registered"]
        assert registered[0].actor == "node:sec-00000"


def _nodes_connected(control: pb_grpc.ControlServiceStub, metadata: object) -> bool:
    nodes = control.ListNodes(pb.ListNodesRequest(), metadata=metadata, timeout=5).nodes
    return len(nodes) == 1 and nodes[0].connected
