"""``nexus-fast certs`` and ``nexus-fast token`` (called in-process; the integration tests
run them as commands)."""

from __future__ import annotations

import ipaddress
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.x509.oid import NameOID

from nexus_fast.config import SecurityConfig
from nexus_fast.security.identity import Authenticator
from nexus_fast.security.tools import main


def test_certs_writes_private_files_naming_their_principals(tmp_path: Path) -> None:
    out = tmp_path / "pki"
    assert main(["certs", "--out", str(out), "--node", "n1", "n2", "--viewer", "bob"]) == 0
    assert stat.S_IMODE(out.stat().st_mode) == 0o700
    names = {p.name for p in out.iterdir()}
    assert {"ca.pem", "server.pem", "server-key.pem", "node-n1.pem", "node-n2-key.pem",
            "viewer-bob.pem", "viewer-bob-key.pem", "jwt.secret", "nexus.toml"} <= names  # fmt: skip
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    server = x509.load_pem_x509_certificate((out / "server.pem").read_bytes())
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert ipaddress.ip_address("127.0.0.1") in san.get_values_for_type(x509.IPAddress)
    auth = Authenticator(SecurityConfig())
    node = auth.from_pem((out / "node-n1.pem").read_bytes())
    assert (node.role, node.node_id) == ("node", "n1")
    bob = x509.load_pem_x509_certificate((out / "viewer-bob.pem").read_bytes())
    assert bob.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == "nexus-viewer"


def test_token_uses_the_server_defaults(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "secret"
    secret.write_text("k" * 40 + "\n")
    assert main(["token", "--secret-file", str(secret), "--sub", "node:n1", "--role", "node",
                 "--ttl", "15m"]) == 0  # fmt: skip
    token = capsys.readouterr().out.strip()
    principal = Authenticator(SecurityConfig(jwt_secret_file=str(secret))).from_token(token)
    assert principal.node_id == "n1" and principal.expires_at is not None

    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "ed.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "ed.pub").write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    assert main(["token", "--private-key-file", str(tmp_path / "ed.pem"), "--sub", "alice",
                 "--role", "operator"]) == 0  # fmt: skip
    token = capsys.readouterr().out.strip()
    config = SecurityConfig(jwt_public_key_file=str(tmp_path / "ed.pub"))
    assert Authenticator(config).from_token(token).role == "operator"
    assert main(["token", "--secret-file", str(secret), "--sub", "a", "--role", "viewer",
                 "--ttl", "soon"]) == 2  # fmt: skip
