"""A 1000-node nexus-node fleet against the real server: ready, down, restart."""

from __future__ import annotations

import re
import signal

import grpc
import pytest

from nexus_fast.node.channel import ClientAuth, channel_credentials
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import AUTH_MODES, ServerProcess, list_all_nodes, wait_for

FLEET = 1000
pytestmark = AUTH_MODES


def nodes_total(server: ServerProcess, status: str) -> float:
    _, body, _ = server.http("/metrics")
    match = re.search(rf'^nexus_nodes_total{{status="{status}"}} (\S+)$', body.decode(), re.M)
    return float(match.group(1)) if match else -1.0


def test_thousand_nodes_ready_then_down_then_known_after_restart(
    server_factory: type, fleet_factory: type
) -> None:
    server: ServerProcess = server_factory.create(NEXUS_HEARTBEAT_INTERVAL="1s").start()
    fleet = fleet_factory.create(server, FLEET, "--labels", "zone=a,pool=sim")
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)

        def connected_ready() -> int:
            ready = list_all_nodes(control, (pb.NODE_STATUS_READY,))
            return sum(1 for n in ready if n.connected)

        wait_for(lambda: connected_ready() == FLEET, 60, 0.5, "all nodes ready and connected")
        ready = list_all_nodes(control, (pb.NODE_STATUS_READY,))
        assert all(n.labels["pool"] == "sim" and n.labels["zone"] == "a" for n in ready)
        assert nodes_total(server, "ready") == FLEET

        # Stop the proxy without deregistering: the nodes must time out.
        assert fleet.stop(signal.SIGTERM) == 0, fleet.log()
        wait_for(
            lambda: len(list_all_nodes(control, (pb.NODE_STATUS_DOWN,))) == FLEET,
            20,
            0.25,
            "all nodes down",
        )
        # node_timeout is 3 s: each node went down only after 3 s without a message, by the
        # server's own stamps (whole ms).
        down = list_all_nodes(control, (pb.NODE_STATUS_DOWN,))
        silent_ms = [n.status_changed_ms - n.last_heartbeat_ms for n in down]
        assert min(silent_ms) >= 3000 - 1, sorted(silent_ms)[:5]
        assert nodes_total(server, "down") == FLEET
        assert nodes_total(server, "ready") == 0

    assert server.stop() == 0
    again = server_factory.create(data_dir=server.data_dir).start()
    with again.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        known = list_all_nodes(control)
        assert len(known) == FLEET
        assert all(n.status == pb.NODE_STATUS_DOWN for n in known)
        assert nodes_total(again, "down") == FLEET

        # The fleet comes back: every node is ready again, with a new session epoch.
        fleet = fleet_factory.create(again, FLEET, "--labels", "zone=a,pool=sim")
        wait_for(
            lambda: len(list_all_nodes(control, (pb.NODE_STATUS_READY,))) == FLEET,
            60,
            0.5,
            "fleet back",
        )
        assert all(n.session_epoch == 2 for n in list_all_nodes(control))
        assert fleet.stop() == 0
    assert again.stop() == 0


def test_the_auth_variant_really_needs_its_credentials(
    server_factory: type, fleet_factory: type
) -> None:
    """Guards the auth variant of these modules: without the fixture's credentials the same
    calls fail, so the suite's auth runs prove authenticated clients work."""
    server: ServerProcess = server_factory.create().start()
    with grpc.insecure_channel(server.grpc_target) as channel:
        control = pb_grpc.ControlServiceStub(channel)
        if server.pki is None:
            assert list_all_nodes(control) == []
            return
        with pytest.raises(grpc.RpcError) as info:
            list_all_nodes(control)  # plaintext against the TLS port
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # The handshake certificate alone names a viewer: it reads, but only the operator's
    # token lets the suite's clients write.
    operator = server.auth
    handshake = ClientAuth(operator.tls_ca, operator.tls_cert, operator.tls_key)
    with grpc.secure_channel(server.grpc_target, channel_credentials(handshake)) as channel:
        control = pb_grpc.ControlServiceStub(channel)
        assert list_all_nodes(control) == []
        with pytest.raises(grpc.RpcError) as info:
            control.SubmitCommands(
                pb.SubmitCommandsRequest(commands=[pb.CommandSpec(kind="run")]), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # A fleet with the shared node certificate but no per-node tokens may not register its
    # nodes: the certificate's CN is "fleet", not their ids.
    fleet = fleet_factory.create(server.grpc_target, 2, *server.fleet_args()[:6])
    wait_for(lambda: "PERMISSION_DENIED" in fleet.log(), 20, 0.2, "registration refused")
    with server.channel() as channel:
        assert list_all_nodes(pb_grpc.ControlServiceStub(channel)) == []
    fleet.stop()
