"""TLS and mTLS on the gRPC port of the real server, with certificates made here."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus_fast.security.tools import cert_pem, issue_certificate, key_pem

from .conftest import ServerProcess


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, bytes | Path]:
    ca = issue_certificate("nexus-test-ca", None)
    server = issue_certificate("127.0.0.1", ca, server=True)
    client = issue_certificate("operator", ca)
    files: dict[str, bytes | Path] = {}
    for name, data in {
        "ca.pem": cert_pem(ca[0]),
        "server.pem": cert_pem(server[0]),
        "server.key": key_pem(server[1]),
    }.items():
        (tmp_path / name).write_bytes(data)
        files[name] = tmp_path / name
    files["ca"] = cert_pem(ca[0])
    files["client_cert"] = cert_pem(client[0])
    files["client_key"] = key_pem(client[1])
    return files


def _check(target: str, credentials: grpc.ChannelCredentials) -> int:
    with grpc.secure_channel(target, credentials) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
        return int(reply.status)


def test_tls_and_mtls(server_factory: type, pki: dict[str, bytes | Path]) -> None:
    tls: ServerProcess = server_factory.create(
        NEXUS_TLS_ENABLED="true",
        NEXUS_TLS_CERT_FILE=str(pki["server.pem"]),
        NEXUS_TLS_KEY_FILE=str(pki["server.key"]),
    ).start()
    ca = pki["ca"]
    assert isinstance(ca, bytes)
    assert _check(tls.grpc_target, grpc.ssl_channel_credentials(ca)) == (
        health_pb2.HealthCheckResponse.SERVING
    )
    # A plaintext client cannot talk to the TLS port.
    with grpc.insecure_channel(tls.grpc_target) as channel, pytest.raises(grpc.RpcError):
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
    assert tls.stop() == 0

    mtls: ServerProcess = server_factory.create(
        data_dir=tls.data_dir,
        NEXUS_TLS_ENABLED="true",
        NEXUS_TLS_CERT_FILE=str(pki["server.pem"]),
        NEXUS_TLS_KEY_FILE=str(pki["server.key"]),
        NEXUS_TLS_CA_FILE=str(pki["ca.pem"]),
    ).start()
    cert, key = pki["client_cert"], pki["client_key"]
    assert isinstance(cert, bytes) and isinstance(key, bytes)
    with_cert = grpc.ssl_channel_credentials(ca, private_key=key, certificate_chain=cert)
    assert _check(mtls.grpc_target, with_cert) == health_pb2.HealthCheckResponse.SERVING
    # Without a client certificate the handshake is refused.
    with pytest.raises(grpc.RpcError) as info:
        _check(mtls.grpc_target, grpc.ssl_channel_credentials(ca))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
