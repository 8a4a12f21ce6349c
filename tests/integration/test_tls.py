"""TLS and mTLS on the gRPC port of the real server, with certificates made here."""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from .conftest import ServerProcess


def _issue(
    name: str, issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None, ca: bool
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer[1] if issuer else key, hashes.SHA256())
    return cert, key


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, bytes | Path]:
    ca = _issue("nexus-test-ca", None, ca=True)
    server = _issue("127.0.0.1", ca, ca=False)
    client = _issue("operator", ca, ca=False)
    files: dict[str, bytes | Path] = {}
    for name, data in {
        "ca.pem": _pem(ca[0]),
        "server.pem": _pem(server[0]),
        "server.key": _key_pem(server[1]),
    }.items():
        (tmp_path / name).write_bytes(data)
        files[name] = tmp_path / name
    files["ca"] = _pem(ca[0])
    files["client_cert"] = _pem(client[0])
    files["client_key"] = _key_pem(client[1])
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
