"""Client certificates against the real server (mTLS on gRPC, WSS and HTTPS): the handshake
refuses strangers on all three ports, and a certificate's CN and O name the principal."""

from __future__ import annotations

import ssl
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from websockets.exceptions import ConnectionClosed, InvalidHandshake

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc
from nexus_fast.security.tools import issue_certificate, write_private

from .auth_util import (
    SecureServer,
    bearer,
    client_ssl,
    grpc_channel,
    http,
    make_pki,
    running,
    token,
    write_config,
    ws,
    ws_op,
)
from .conftest import wait_for

PRINCIPALS = ("--node", "node-a", "node-b", "node-00000", "--operator", "alice", "--viewer", "bob",
              "--admin", "root")  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pki = make_pki(tmp_path_factory.mktemp("pki"), *PRINCIPALS)
    # Same CA, but a subject O that names no nexus role.
    ca = (
        x509.load_pem_x509_certificate((pki / "ca.pem").read_bytes()),
        serialization.load_pem_private_key((pki / "ca-key.pem").read_bytes(), None),
    )
    cert, key = issue_certificate("eve", ca, organization="acme")  # type: ignore[arg-type]
    write_private(pki / "stranger-eve.pem", cert.public_bytes(serialization.Encoding.PEM))
    write_private(
        pki / "stranger-eve-key.pem",
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return pki


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_pki(tmp_path_factory.mktemp("other-pki"), "--operator", "alice")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[SecureServer]:
    tmp = tmp_path_factory.mktemp("auth-mtls")
    # The file `nexus-fast certs` writes, as the quick start uses it.
    config = write_config(
        tmp / "auth.toml",
        (pki / "nexus.toml").read_text().split("[security]\n", 1)[1] + 'min_tls_version = "1.3"\n',
    )
    process = SecureServer(
        tmp / "data", tmp / "server.log", config, http_ssl=client_ssl(pki, "admin-root")
    )
    with running(process):
        yield process


def _grpc_fails_handshake(
    server: SecureServer, pki: Path, cert: str | None, ca: Path | None
) -> None:
    with grpc_channel(server, pki, cert, ca) as channel, pytest.raises(grpc.RpcError) as info:
        pb_grpc.ControlServiceStub(channel).ListNodes(pb.ListNodesRequest(), timeout=5)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value.details()


@pytest.mark.parametrize("who", ["no certificate", "another CA"])
def test_handshake_fails_on_all_three_ports(
    server: SecureServer, pki: Path, other_ca: Path, who: str
) -> None:
    cert, ca = (None, None) if who == "no certificate" else ("operator-alice", other_ca)
    _grpc_fails_handshake(server, pki, cert, ca)
    context = client_ssl(pki, cert, ca)
    # With TLS 1.3 the client learns of the refusal only when it sends or reads the upgrade
    # request: it gets no HTTP answer at all (InvalidMessage) or a dead socket, never a 101.
    refused = (ssl.SSLError, ConnectionError, InvalidHandshake, ConnectionClosed)
    with pytest.raises(refused), ws(server, context):
        pass
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionError)):
        http(server, "/live", context=context)


def test_tls_12_is_refused_when_13_is_required(server: SecureServer, pki: Path) -> None:
    context = client_ssl(pki, "admin-root")
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    with pytest.raises((urllib.error.URLError, ssl.SSLError)):
        http(server, "/live", context=context)


def test_certificate_names_the_principal(server: SecureServer, pki: Path) -> None:
    with grpc_channel(server, pki, "viewer-bob") as channel:
        stub = pb_grpc.ControlServiceStub(channel)
        stub.ListNodes(pb.ListNodesRequest(), timeout=5)
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitCommands(
                pb.SubmitCommandsRequest(commands=[pb.CommandSpec(kind="echo")]), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "bob" in (info.value.details() or "")
    with grpc_channel(server, pki, "operator-alice") as channel:
        stub = pb_grpc.ControlServiceStub(channel)
        reply = stub.SubmitCommands(
            pb.SubmitCommandsRequest(commands=[pb.CommandSpec(kind="echo")]), timeout=5
        )
        assert len(reply.results) == 1
        # A token wins over the certificate: a viewer token on alice's connection.
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitCommands(
                pb.SubmitCommandsRequest(commands=[pb.CommandSpec(kind="echo")]),
                metadata=bearer(token(pki, "bob", "viewer")),
                timeout=5,
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with grpc_channel(server, pki, "stranger-eve") as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ControlServiceStub(channel).ListNodes(pb.ListNodesRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "no role" in (info.value.details() or "")
    assert http(server, "/api/v1/nodes", context=client_ssl(pki, "viewer-bob"))[0] == 200
    assert http(server, "/api/v1/nodes", context=client_ssl(pki, "node-node-a"))[0] == 403
    assert http(server, "/api/v1/nodes", context=client_ssl(pki, "stranger-eve"))[0] == 401


def test_websocket_ops_follow_the_certificate(server: SecureServer, pki: Path) -> None:
    with ws(server, client_ssl(pki, "viewer-bob")) as conn:
        assert ws_op(conn, {"op": "subscribe", "topics": ["node"]})["type"] != "error"
        denied = ws_op(conn, {"op": "submit", "commands": [{"kind": "echo"}]})
        assert denied["code"] == "permission_denied" and "bob" in denied["message"]


def test_node_certificate_acts_only_as_its_node(server: SecureServer, pki: Path) -> None:
    with grpc_channel(server, pki, "node-node-a") as channel:
        stub = pb_grpc.NodeServiceStub(channel)
        own = stub.Register(pb.RegisterRequest(node_id="node-a", address="10.0.0.1:1"), timeout=5)
        assert own.session_epoch >= 1
        with pytest.raises(grpc.RpcError) as info:
            stub.Register(pb.RegisterRequest(node_id="node-b", address="10.0.0.9:1"), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        first = pb.NodeMessage(node_id="node-b", session_epoch=1, heartbeat=pb.Heartbeat())
        with pytest.raises(grpc.RpcError) as info:
            for _ in stub.Connect(iter([first]), timeout=5):
                pass
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ControlServiceStub(channel).ListNodes(pb.ListNodesRequest(), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED


def _run_one(stub: pb_grpc.ControlServiceStub, node_id: str) -> pb.CommandRecord:
    reply = stub.SubmitCommands(
        pb.SubmitCommandsRequest(commands=[pb.CommandSpec(kind="echo", target_node=node_id)]),
        timeout=5,
    )
    ids = [r.id for r in reply.results]
    records = list(
        stub.WaitCommands(pb.WaitCommandsRequest(ids=ids, timeout_ms=15_000), timeout=20)
    )
    assert len(records) == 1
    return records[0]


def test_real_node_over_mtls_keeps_its_stream_against_another_principal(
    server: SecureServer, pki: Path, fleet_factory: type
) -> None:
    """nexus-node with its own node certificate runs commands; node-a's certificate,
    presenting node-00000's id and its public session epoch, is refused and changes nothing."""
    fleet = fleet_factory.create(
        server.grpc_target, 1,
        "--tls-ca", str(pki / "ca.pem"),
        "--tls-cert", str(pki / "node-node-00000.pem"),
        "--tls-key", str(pki / "node-node-00000-key.pem"),
    )  # fmt: skip
    with grpc_channel(server, pki, "operator-alice") as channel:
        control = pb_grpc.ControlServiceStub(channel)

        def ready() -> bool:
            try:
                node = control.GetNode(pb.GetNodeRequest(node_id="node-00000"), timeout=5)
            except grpc.RpcError:
                return False
            return node.status == pb.NODE_STATUS_READY

        wait_for(ready, 20, message=f"node-00000 ready:\n{fleet.log()}\n{server.log()}")
        assert _run_one(control, "node-00000").state == pb.COMMAND_STATE_SUCCEEDED
        epoch = control.GetNode(pb.GetNodeRequest(node_id="node-00000"), timeout=5).session_epoch
        with grpc_channel(server, pki, "node-node-a") as intruder:
            stub = pb_grpc.NodeServiceStub(intruder)
            first = pb.NodeMessage(
                node_id="node-00000", session_epoch=epoch, heartbeat=pb.Heartbeat()
            )
            with pytest.raises(grpc.RpcError) as info:
                for _ in stub.Connect(iter([first]), timeout=5):
                    pass
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(grpc.RpcError) as info:
                stub.Register(
                    pb.RegisterRequest(node_id="node-00000", address="6.6.6.6:1"), timeout=5
                )
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        node = control.GetNode(pb.GetNodeRequest(node_id="node-00000"), timeout=5)
        assert node.session_epoch == epoch and node.status == pb.NODE_STATUS_READY
        assert _run_one(control, "node-00000").state == pb.COMMAND_STATE_SUCCEEDED
    assert fleet.proc.poll() is None, fleet.log()
