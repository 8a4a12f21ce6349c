"""Bearer tokens against the real server (TLS, no client certificates): every port refuses
bad tokens, roles and node identity are enforced, browsers are held to their origin."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import ssl
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .auth_util import (
    SecureServer,
    bearer,
    client_ssl,
    grpc_channel,
    http,
    nexus_cli,
    running,
    secure_server,
    token,
    ws,
    ws_op,
    ws_refused,
)
from .conftest import REPO


@pytest.fixture(scope="module")
def rsa_key(pki: Path) -> rsa.RSAPrivateKey:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    (pki / "jwt-rsa.pub").write_bytes(public)
    return key


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, pki: Path, rsa_key: rsa.RSAPrivateKey
) -> Iterator[SecureServer]:
    extra = f'jwt_public_key_file = "{pki / "jwt-rsa.pub"}"\njwt_leeway = "0s"\n'
    with running(secure_server(tmp_path_factory.mktemp("auth-tokens"), pki, extra)) as process:
        yield process


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(**extra: object) -> dict[str, object]:
    now = int(time.time())
    claims: dict[str, object] = {"sub": "mallory", "role": "admin", "iss": "nexus-fast",
                                 "aud": "nexus-fast", "iat": now, "exp": now + 600}  # fmt: skip
    claims.update(extra)
    return claims


def _hand_signed(alg: str, claims: dict[str, object], key: bytes | None) -> str:
    signing = f"{_b64(json.dumps({'alg': alg, 'typ': 'JWT'}).encode())}."
    signing += _b64(json.dumps(claims).encode())
    mac = hmac.new(key, signing.encode(), hashlib.sha256).digest() if key else b""
    return f"{signing}.{_b64(mac)}"


def _bad_tokens(pki: Path, key: rsa.RSAPrivateKey) -> dict[str, str]:
    secret = (pki / "jwt.secret").read_bytes().strip()
    public_pem = (pki / "jwt-rsa.pub").read_bytes()
    good = jwt.encode(_claims(), secret)
    head, body, sig = good.split(".")
    now = int(time.time())
    return {
        "alg none": _hand_signed("none", _claims(), None),
        "HS256 keyed with the RSA public key": _hand_signed("HS256", _claims(), public_pem),
        "expired": jwt.encode(_claims(iat=now - 100, exp=now - 50), secret),
        "not yet valid": jwt.encode(_claims(nbf=now + 300), secret),
        "wrong aud": jwt.encode(_claims(aud="other"), secret),
        "wrong iss": jwt.encode(_claims(iss="other"), key, algorithm="RS256"),
        "tampered signature": f"{head}.{body}.{sig[:-3]}{'AAA' if sig[-3:] != 'AAA' else 'BBB'}",
        "garbage": "Zm9v.YmFy.YmF6",
    }


BAD = [
    "alg none",
    "HS256 keyed with the RSA public key",
    "expired",
    "not yet valid",
    "wrong aud",
    "wrong iss",
    "tampered signature",
    "garbage",
]


@pytest.mark.parametrize("case", ["no credentials", *BAD])
def test_bad_credentials_are_refused_on_every_port(
    server: SecureServer, pki: Path, rsa_key: rsa.RSAPrivateKey, tls: ssl.SSLContext, case: str
) -> None:
    value = _bad_tokens(pki, rsa_key).get(case)
    metadata = bearer(value) if value else ()
    headers = {"Authorization": f"Bearer {value}"} if value else {}
    with grpc_channel(server, pki) as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ControlServiceStub(channel).ListNodes(
                pb.ListNodesRequest(), metadata=metadata, timeout=5
            )
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, info.value.details()
        with pytest.raises(grpc.RpcError) as stream_info:
            list(
                pb_grpc.ControlServiceStub(channel).WatchEvents(
                    pb.WatchEventsRequest(), metadata=metadata, timeout=5
                )
            )
        assert stream_info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    status, body = http(server, "/api/v1/nodes", headers)
    assert status == 401 and body["error"]["code"] == "unauthenticated"
    assert ws_refused(server, tls, headers=headers) == 401
    if value:
        assert ws_refused(server, tls, query=f"?access_token={value}") == 401


def test_refusals_name_the_reason(
    server: SecureServer, pki: Path, rsa_key: rsa.RSAPrivateKey
) -> None:
    bad = _bad_tokens(pki, rsa_key)
    expected = {
        "alg none": "algorithm",
        "expired": "expired",
        "not yet valid": "not yet valid",
        "wrong aud": "audience",
        "wrong iss": "issuer",
        "tampered signature": "signature",
    }
    with grpc_channel(server, pki) as channel:
        stub = pb_grpc.ControlServiceStub(channel)
        for case, words in expected.items():
            with pytest.raises(grpc.RpcError) as info:
                stub.ListNodes(pb.ListNodesRequest(), metadata=bearer(bad[case]), timeout=5)
            assert words in (info.value.details() or ""), (case, info.value.details())
    # Tokens are never written to the log, not even from a refused upgrade's query string.
    secret = (pki / "jwt.secret").read_bytes().strip()
    marked = jwt.encode(_claims(sub="log-canary", exp=int(time.time()) - 60), secret)
    assert ws_refused(server, client_ssl(pki), query=f"?access_token={marked}") == 401
    with grpc_channel(server, pki) as channel, pytest.raises(grpc.RpcError):
        pb_grpc.ControlServiceStub(channel).ListNodes(
            pb.ListNodesRequest(), metadata=bearer(marked), timeout=5
        )
    assert http(server, "/api/v1/nodes", {"Authorization": f"Bearer {marked}"})[0] == 401
    log = server.log_path.read_text()
    assert marked not in log and marked.split(".")[1] not in log


def test_good_tokens_work_and_public_probes_need_none(
    server: SecureServer, pki: Path, rsa_key: rsa.RSAPrivateKey, tls: ssl.SSLContext
) -> None:
    operator = token(pki, "alice", "operator")
    rs_viewer = jwt.encode(_claims(sub="bob", role="viewer"), rsa_key, algorithm="RS256")
    with grpc_channel(server, pki) as channel:
        stub = pb_grpc.ControlServiceStub(channel)
        for value in (operator, rs_viewer):
            stub.ListNodes(pb.ListNodesRequest(), metadata=bearer(value), timeout=5)
        # Streams keep their own serializers (WatchEvents sends pre-encoded batches) and
        # async-generator handlers (reflection) work behind the interceptor.
        events = stub.WatchEvents(
            pb.WatchEventsRequest(after_index=0), metadata=bearer(operator), timeout=5
        )
        assert next(events).events[0].type == "system.started"
        events.cancel()
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            metadata=bearer(rs_viewer),
            timeout=5,
        )
        services = next(reflection).list_services_response.service
        assert "nexus.fabric.v1.ControlService" in {s.name for s in services}
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert http(server, "/api/v1/nodes", {"Authorization": f"Bearer {operator}"})[0] == 200
    assert http(server, "/live")[0] == 200 and http(server, "/health")[0] == 200
    assert http(server, "/health/detailed")[0] == 401
    # Tokens are never taken from cookies.
    assert http(server, "/api/v1/nodes", {"Cookie": f"access_token={operator}"})[0] == 401
    with ws(server, tls, query=f"?access_token={operator}") as conn:
        assert ws_op(conn, {"op": "ping"})["type"] == "pong"


def test_viewer_reads_but_may_not_submit(
    server: SecureServer, pki: Path, tls: ssl.SSLContext
) -> None:
    viewer = token(pki, "bob", "viewer")
    spec = pb.CommandSpec(kind="echo", payload=b"x")
    with grpc_channel(server, pki) as channel:
        stub = pb_grpc.ControlServiceStub(channel)
        stub.ListCommands(pb.ListCommandsRequest(), metadata=bearer(viewer), timeout=5)
        with pytest.raises(grpc.RpcError) as info:
            stub.SubmitCommands(
                pb.SubmitCommandsRequest(commands=[spec]), metadata=bearer(viewer), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "command.write" in (info.value.details() or "")
    with ws(server, tls, headers={"Authorization": f"Bearer {viewer}"}) as conn:
        reply = ws_op(conn, {"op": "subscribe", "topics": ["command"]})
        assert reply["type"] != "error", reply
        denied = ws_op(conn, {"op": "submit", "commands": [{"kind": "echo"}]})
        assert denied["type"] == "error" and denied["code"] == "permission_denied"
        assert ws_op(conn, {"op": "ping"})["type"] == "pong"  # the connection stays


def test_node_principal_may_not_call_control_service(server: SecureServer, pki: Path) -> None:
    node = token(pki, "node:n1", "node")
    with grpc_channel(server, pki) as channel:
        stub = pb_grpc.ControlServiceStub(channel)
        for call in (
            lambda: stub.ListNodes(pb.ListNodesRequest(), metadata=bearer(node), timeout=5),
            lambda: stub.SubmitCommands(
                pb.SubmitCommandsRequest(commands=[pb.CommandSpec(kind="x")]),
                metadata=bearer(node),
                timeout=5,
            ),
            lambda: stub.GetClusterStatus(
                pb.GetClusterStatusRequest(), metadata=bearer(node), timeout=5
            ),
        ):
            with pytest.raises(grpc.RpcError) as info:
                call()
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert http(server, "/api/v1/nodes", {"Authorization": f"Bearer {node}"})[0] == 403


def _connect_as(
    stub: pb_grpc.NodeServiceStub, node_id: str, epoch: int, value: str
) -> grpc.RpcError:
    first = pb.NodeMessage(node_id=node_id, session_epoch=epoch, heartbeat=pb.Heartbeat())
    with pytest.raises(grpc.RpcError) as info:
        for _ in stub.Connect(iter([first]), metadata=bearer(value), timeout=5):
            pass
    return info.value


def test_nodes_act_only_as_themselves(server: SecureServer, pki: Path) -> None:
    node_a, node_b = token(pki, "node:node-a", "node"), token(pki, "node:node-b", "node")
    with grpc_channel(server, pki) as channel:
        stub = pb_grpc.NodeServiceStub(channel)
        request = pb.RegisterRequest(node_id="node-b", address="10.0.0.2:1")
        registered = stub.Register(request, metadata=bearer(node_b), timeout=5)
        with pytest.raises(grpc.RpcError) as info:
            stub.Register(request, metadata=bearer(node_a), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "node-a" in (info.value.details() or "")
        with pytest.raises(grpc.RpcError) as info:
            stub.Deregister(
                pb.DeregisterRequest(node_id="node-b", session_epoch=registered.session_epoch),
                metadata=bearer(node_a),
                timeout=5,
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        # Connecting with B's id and its (public) session epoch is refused for A.
        error = _connect_as(stub, "node-b", registered.session_epoch, node_a)
        assert error.code() == grpc.StatusCode.PERMISSION_DENIED, error.details()
        # An operator is not a node either.
        operator = token(pki, "alice", "operator")
        with pytest.raises(grpc.RpcError) as info:
            stub.Register(request, metadata=bearer(operator), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # B is untouched by all of that.
    with grpc_channel(server, pki) as channel:
        node = pb_grpc.ControlServiceStub(channel).GetNode(
            pb.GetNodeRequest(node_id="node-b"),
            metadata=bearer(token(pki, "root", "admin")),
            timeout=5,
        )
        assert node.session_epoch == registered.session_epoch


def test_browser_origin_and_host_checks(
    server: SecureServer, pki: Path, tls: ssl.SSLContext
) -> None:
    operator = token(pki, "alice", "operator")
    auth = {"Authorization": f"Bearer {operator}"}
    assert ws_refused(server, tls, headers=auth, origin="https://evil.example") == 403
    own = f"http://127.0.0.1:{server.http_port}"
    with ws(server, tls, headers=auth, origin=own) as conn:
        assert ws_op(conn, {"op": "ping"})["type"] == "pong"
    status, body = http(server, "/api/v1/nodes", {**auth, "Origin": "https://evil.example"})
    assert status == 403 and body["error"]["code"] == "forbidden_origin"
    assert http(server, "/api/v1/nodes", {**auth, "Origin": own})[0] == 200


def test_production_config_refuses_to_start_in_one_line(tmp_path: Path) -> None:
    done = nexus_cli("--config", str(REPO / "configs" / "production.toml"),
                     "--db-path", str(tmp_path / "data"))  # fmt: skip
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "security.auth_required" in lines[0] and "TLS" in lines[0] and "JWT key" in lines[0]
    assert not (tmp_path / "data").exists()


def test_open_api_warns_once(server_factory: type, tmp_path: Path) -> None:
    process = server_factory.create().start()
    process.stop()
    warnings = [line for line in process.log().splitlines() if "the API is open" in line]
    assert len(warnings) == 1, warnings
    assert json.loads(warnings[0])["level"] == "warning"
