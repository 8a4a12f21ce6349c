"""Helpers for the auth tests: development PKI via the real CLI, secure servers, clients."""

from __future__ import annotations

import contextlib
import json
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
from websockets.exceptions import InvalidMessage, InvalidStatus
from websockets.sync.client import ClientConnection, connect

from .conftest import HOST, ServerProcess, http_get, run_module

SECRET_NAME = "jwt.secret"

S = TypeVar("S", bound=ServerProcess)


def nexus_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m nexus_fast.cli ARGS`` (the real entry point)."""
    return run_module("nexus_fast.cli", *args)


def make_pki(out: Path, *extra: str) -> Path:
    done = nexus_cli("certs", "--out", str(out), *extra)
    assert done.returncode == 0, done.stderr
    return out


def token(pki: Path, sub: str, role: str, ttl: str = "1h") -> str:
    done = nexus_cli("token", "--secret-file", str(pki / SECRET_NAME), "--sub", sub,
                     "--role", role, "--ttl", ttl)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def write_config(path: Path, security: str) -> Path:
    path.write_text("[security]\n" + security)
    return path


def token_security(pki: Path, extra: str = "") -> str:
    """``[security]`` settings: auth required over TLS, tokens signed with the PKI's secret."""
    return (
        f"""auth_required = true
tls_enabled = true
tls_cert_file = "{pki / "server.pem"}"
tls_key_file = "{pki / "server-key.pem"}"
jwt_secret_file = "{pki / SECRET_NAME}"
"""
        + extra
    )


def secure_server(tmp: Path, pki: Path, extra: str = "", **kw: Any) -> SecureServer:
    """A (not yet started) :class:`SecureServer` with :func:`token_security` plus ``extra``."""
    config = write_config(tmp / "auth.toml", token_security(pki, extra))
    return SecureServer(tmp / "data", tmp / "server.log", config, **kw)


@contextlib.contextmanager
def running(process: S) -> Iterator[S]:
    """The process started, and killed on the way out (module fixtures yield from it)."""
    try:
        process.start()
        yield process
    finally:
        process.kill()


class SecureServer(ServerProcess):
    """A ServerProcess whose readiness probe may need HTTPS and a client certificate."""

    def __init__(self, *args: Any, http_ssl: ssl.SSLContext | None = None, **kw: str) -> None:
        super().__init__(*args, **kw)
        self.http_ssl = http_ssl

    @property
    def http_base(self) -> str:
        return f"{'https' if self.http_ssl else 'http'}://{HOST}:{self.http_port}"

    def http(self, path: str, timeout: float = 5.0) -> tuple[int, bytes, dict[str, str]]:
        """GET ``path`` with :attr:`http_ssl` (no token); the readiness probe uses it."""
        return http_get(self.http_base + path, timeout, self.http_ssl)


def client_ssl(pki: Path, cert: str | None = None, ca: Path | None = None) -> ssl.SSLContext:
    """Trusts the server (``pki/ca.pem``); presents ``pki/<cert>.pem`` when given."""
    context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert is not None:
        base = ca or pki
        context.load_cert_chain(str(base / f"{cert}.pem"), str(base / f"{cert}-key.pem"))
    return context


def http(
    server: SecureServer,
    path: str,
    headers: dict[str, str] | None = None,
    context: ssl.SSLContext | None = None,
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(server.http_base + path, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5, context=context or server.http_ssl) as r:
            return r.status, _json(r.read())
    except urllib.error.HTTPError as err:
        return err.code, _json(err.read())


def _json(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def grpc_channel(
    server: ServerProcess, pki: Path, cert: str | None = None, ca: Path | None = None
) -> grpc.Channel:
    key = chain = None
    if cert is not None:
        base = ca or pki
        key = (base / f"{cert}-key.pem").read_bytes()
        chain = (base / f"{cert}.pem").read_bytes()
    credentials = grpc.ssl_channel_credentials((pki / "ca.pem").read_bytes(), key, chain)
    return grpc.secure_channel(server.grpc_target, credentials)


def bearer(value: str) -> Sequence[tuple[str, str]]:
    return (("authorization", f"Bearer {value}"),)


def ws_url(server: ServerProcess, query: str = "") -> str:
    return f"wss://{HOST}:{server.ws_port}/v1/events{query}"


@contextlib.contextmanager
def ws(
    server: ServerProcess,
    context: ssl.SSLContext,
    headers: dict[str, str] | None = None,
    query: str = "",
    origin: str | None = None,
) -> Iterator[ClientConnection]:
    # Rarely, on a loaded machine, the connection closes before the upgrade's response
    # (picows drops a peer whose upgrade it has not read within its 5 s handshake guard;
    # a refused upgrade can lose its response too, see ws_refused): a new connection is
    # tried, at most three in all. A response that comes back is never retried.
    for attempt in range(3):
        try:
            conn = connect(
                ws_url(server, query),
                ssl=context,
                additional_headers=headers,
                origin=origin,  # type: ignore[arg-type]
                open_timeout=15,  # shared CI machines: TLS handshakes can queue for seconds
            )
            break
        except InvalidMessage:
            if attempt == 2:
                raise
    with conn:
        yield conn


def ws_refused(server: ServerProcess, context: ssl.SSLContext, **kw: Any) -> int:
    """The HTTP status of a refused upgrade (fails the test if it is accepted).

    Rarely (about 1 in a few hundred here) a refused upgrade over TLS reaches the client as
    a closed connection without the response (picows closes right after writing it);
    :func:`ws` opens a new connection then, a 101 is never retried.
    """
    try:
        with ws(server, context, **kw):
            pass
    except InvalidStatus as exc:
        return exc.response.status_code
    raise AssertionError("the WebSocket upgrade was accepted")


def ws_op(conn: ClientConnection, message: dict[str, Any]) -> dict[str, Any]:
    conn.send(json.dumps({"id": "req-1", **message}))
    while True:
        reply = json.loads(conn.recv(timeout=5))
        if reply.get("id") == "req-1" or reply.get("type") == "error":
            return dict(reply)
