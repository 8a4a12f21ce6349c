"""A throw-away certificate authority for tests: CA, server and client certificates."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from nexus_fast.security.tools import cert_pem, issue_certificate, key_pem


@dataclass(frozen=True)
class Pki:
    """PEM files written by :func:`write_pki`."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def write_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost and one client certificate."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = issue_certificate("nexus-test-ca", None)
    server = issue_certificate("127.0.0.1", ca, server=True)
    client = issue_certificate("nexus-test-client", ca)
    return Pki(
        ca=_write(directory / "ca.pem", cert_pem(ca[0])),
        server_cert=_write(directory / "server.pem", cert_pem(server[0])),
        server_key=_write(directory / "server-key.pem", key_pem(server[1])),
        client_cert=_write(directory / "client.pem", cert_pem(client[0])),
        client_key=_write(directory / "client-key.pem", key_pem(client[1])),
    )
