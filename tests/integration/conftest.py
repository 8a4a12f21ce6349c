"""Fixtures that start the real ``nexus-fast`` process (and ``nexus-node`` fleets).

Everything listens on 127.0.0.1 on free ports, keeps its data in a temporary
directory, and is stopped at teardown even when the test failed.

Auth modes: a test marked ``AUTH_MODES`` (or a module with ``pytestmark = AUTH_MODES``)
runs twice, against an open server and with ``auth_required = true``: TLS on all three
ports, client certificates required (mTLS), nodes known by certificate (CN = node id,
O = nexus-node) or, for ``nexus-node`` fleets, by a token per node, operators by a
bearer token. The clients a test gets from its server (``server.channel()``, ``server.http()``,
``server.ws_url()``, fleets) carry the matching credentials, so the test body is the same.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from nexus_fast.benchmark.procs import free_ports
from nexus_fast.node.channel import ClientAuth, channel_credentials
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc
from nexus_fast.security.tokens import issue_token
from nexus_fast.security.tools import issue_certificate
from nexus_fast.security.tools import main as credentials_main

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration ``integration`` (``-m "not integration"``).

    The hook sees the whole session's items, so it marks only those in this folder.
    """
    for item in items:
        if item.path.resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)


AUTH_MODES = pytest.mark.parametrize("auth_mode", ["open", "auth"], indirect=True)
"""``pytestmark = AUTH_MODES``: every test of the module runs open and with auth on."""

OPERATOR_CERT = "viewer-handshake"  # see TestPki.operator_auth


def _pem(cert: x509.Certificate, key: Any) -> tuple[bytes, bytes]:
    return (
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )


@dataclass
class TestPki:
    """A development PKI written by ``nexus-fast certs`` (in process), for one session.

    Operators authenticate with a bearer token (role operator). mTLS makes every client
    present a certificate, so the operator's channel presents a *viewer* certificate: the
    handshake passes, and a write succeeds only because the token, not the certificate,
    names the operator. Nodes present their own certificate (CN = node id), issued on
    demand; a ``nexus-node`` fleet presents ``node-fleet`` for the handshake and sends a
    token per node (``--node-token-secret``).
    """

    __test__ = False  # not a test class, despite the name

    root: Path
    operator_token: str = ""
    _node_certs: dict[str, tuple[bytes, bytes]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def create(cls, root: Path) -> TestPki:
        argv = ["certs", "--out", str(root), "--node", "fleet", "--viewer", "handshake"]
        with contextlib.redirect_stdout(io.StringIO()):  # its "wrote ..." line is for humans
            assert credentials_main(argv) == 0
        pki = cls(root)
        pki.operator_token = issue_token("ops", "operator", 6 * 3600, secret=pki.secret)
        return pki

    @property
    def secret(self) -> bytes:
        return (self.root / "jwt.secret").read_bytes().strip()

    @property
    def ca(self) -> Path:
        return self.root / "ca.pem"

    def settings(self) -> dict[str, str]:
        """The ``[security]`` keys of an auth-on server (TOML values)."""
        return {
            "auth_required": "true",
            "tls_enabled": "true",
            "http_tls": "true",
            "tls_cert_file": f'"{self.root / "server.pem"}"',
            "tls_key_file": f'"{self.root / "server-key.pem"}"',
            "tls_ca_file": f'"{self.ca}"',
            "jwt_secret_file": f'"{self.root / "jwt.secret"}"',
        }

    def operator_auth(self) -> ClientAuth:
        return ClientAuth(
            tls_ca=str(self.ca),
            tls_cert=str(self.root / f"{OPERATOR_CERT}.pem"),
            tls_key=str(self.root / f"{OPERATOR_CERT}-key.pem"),
            token=self.operator_token,
        )

    def fleet_args(self) -> list[str]:
        return [
            "--tls-ca", str(self.ca),
            "--tls-cert", str(self.root / "node-fleet.pem"),
            "--tls-key", str(self.root / "node-fleet-key.pem"),
            "--node-token-secret", str(self.root / "jwt.secret"),
        ]  # fmt: skip

    def node_cert(self, node_id: str) -> tuple[bytes, bytes]:
        """(certificate PEM, key PEM) of a node certificate: CN = node_id, O = nexus-node."""
        with self._lock:
            hit = self._node_certs.get(node_id)
            if hit is None:
                ca = (
                    x509.load_pem_x509_certificate(self.ca.read_bytes()),
                    serialization.load_pem_private_key(
                        (self.root / "ca-key.pem").read_bytes(), None
                    ),
                )
                cert, key = issue_certificate(node_id, ca, organization="nexus-node")  # type: ignore[arg-type]
                hit = self._node_certs[node_id] = _pem(cert, key)
            return hit

    def client_ssl(self) -> ssl.SSLContext:
        """For HTTPS and WSS: trusts the CA, presents the handshake certificate."""
        return self.operator_auth().ssl_context()


def with_auth(config_text: str, settings: dict[str, str]) -> str:
    """``config_text`` with its ``[security]`` keys replaced (or a ``[security]`` table added)."""
    head, sep, rest = config_text.partition("[security]\n")
    if not sep:
        return config_text + "\n[security]\n" + "".join(f"{k} = {v}\n" for k, v in settings.items())
    body, nxt, tail = rest.partition("\n[")
    for key, value in settings.items():
        body, n = re.subn(rf"^{key}\s*=.*$", f"{key} = {value}", body, flags=re.M)
        if not n:
            body += f"\n{key} = {value}"
    return head + sep + body + nxt + tail


class ServerProcess:
    """A real nexus-fast process on free loopback ports.

    With ``pki`` the server runs with auth on (see the module docstring) and every client
    helper here carries the operator's credentials.
    """

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        config: Path | None = None,
        same_ports_as: ServerProcess | None = None,
        pki: TestPki | None = None,
        **env: str,
    ) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.config = config or REPO / "configs" / "development.toml"
        self.pki = pki
        if pki is not None:
            secure = log_path.with_suffix(".auth.toml")
            secure.write_text(with_auth(self.config.read_text(), pki.settings()))
            self.config = secure
        if same_ports_as is not None:
            # A restart on the same ports: clients (nexus-node) reconnect by themselves.
            self.grpc_port = same_ports_as.grpc_port
            self.ws_port = same_ports_as.ws_port
            self.http_port = same_ports_as.http_port
        else:
            self.grpc_port, self.ws_port, self.http_port = free_ports(3)
        self.extra_env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def grpc_target(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"{'https' if self.pki else 'http'}://{HOST}:{self.http_port}"

    @property
    def auth(self) -> ClientAuth:
        """The operator's client credentials (empty when auth is off)."""
        return self.pki.operator_auth() if self.pki else ClientAuth()

    def ws_url(self, query: str = "") -> str:
        return f"{'wss' if self.pki else 'ws'}://{HOST}:{self.ws_port}/v1/events{query}"

    def ws_options(self) -> dict[str, Any]:
        """``ssl`` context and ``Authorization`` header for a WebSocket client."""
        if self.pki is None:
            return {"ssl": None, "headers": {}}
        return {"ssl": self.pki.client_ssl(), "headers": self.auth.http_headers()}

    def http(self, path: str, timeout: float = 5.0) -> tuple[int, bytes, dict[str, str]]:
        """GET ``path`` as the operator (HTTPS, handshake certificate and token with auth)."""
        if self.pki is None:
            return http_get(self.http_base + path, timeout)
        return http_get(
            self.http_base + path, timeout, self.pki.client_ssl(), self.auth.http_headers()
        )

    def fleet_args(self) -> list[str]:
        """``nexus-node`` options for this server's auth mode."""
        return self.pki.fleet_args() if self.pki else []

    def command(self, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "nexus_fast.cli",
            "--config",
            str(self.config),
            "--host",
            HOST,
            "--grpc-port",
            str(self.grpc_port),
            "--ws-port",
            str(self.ws_port),
            "--http-port",
            str(self.http_port),
            "--db-path",
            str(self.data_dir),
            *extra,
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "NEXUS_LOG_FORMAT": "json",
                "NEXUS_NODE_TIMEOUT": "3s",
                "NEXUS_HEARTBEAT_INTERVAL": "0.5s",
                "NEXUS_PRUNING_INTERVAL": "0.2s",
                # Longer than stop()'s 20 s: a server that waits out its drain instead of
                # exiting once nothing is in flight fails the test rather than passing slowly.
                "NEXUS_SHUTDOWN_TIMEOUT": "30s",
                "NEXUS_DB_CACHE_SIZE": "256MB",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 30.0) -> ServerProcess:
        self.launch()
        self.wait_ready(timeout)
        return self

    def launch(self) -> None:
        """Start the process without waiting for it (several at once: the cluster tests)."""
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=REPO
        )
        log.close()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if self.http("/ready")[0] == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"server not ready within {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the server and wait; returns its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"server ignored signal {sig} for {timeout}s:\n{self.log()}"
            ) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def channel(self) -> grpc.Channel:
        """A blocking channel as the operator (TLS, handshake certificate, token with auth)."""
        if self.pki is None:
            return grpc.insecure_channel(self.grpc_target)
        return grpc.secure_channel(self.grpc_target, self._credentials(self.auth))

    def aio_channel(self) -> grpc.aio.Channel:
        """The same as :meth:`channel`, for grpc.aio."""
        if self.pki is None:
            return grpc.aio.insecure_channel(self.grpc_target)
        return grpc.aio.secure_channel(self.grpc_target, self._credentials(self.auth))

    def node_channel(self, node_id: str) -> grpc.Channel:
        """A blocking channel as node ``node_id``: its own certificate with auth (mTLS)."""
        if self.pki is None:
            return grpc.insecure_channel(self.grpc_target)
        cert, key = self.pki.node_cert(node_id)
        creds = grpc.ssl_channel_credentials(self.pki.ca.read_bytes(), key, cert)
        return grpc.secure_channel(self.grpc_target, creds)

    @staticmethod
    def _credentials(auth: ClientAuth) -> grpc.ChannelCredentials:
        return channel_credentials(auth)


def run_module(module: str, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run ``python -m MODULE ARGS`` from the repository (a real entry point), output kept."""
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
    )


def http_get(
    url: str,
    timeout: float = 5.0,
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes, dict[str, str]]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


@pytest.fixture
def auth_mode(request: pytest.FixtureRequest) -> str:
    """``open`` unless a module parametrises it (``pytestmark = AUTH_MODES``)."""
    return str(getattr(request, "param", "open"))


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A development PKI written by ``nexus-fast certs`` (one per module; the auth tests')."""
    from .auth_util import make_pki  # auth_util imports this module

    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls(pki: Path) -> ssl.SSLContext:
    """A client context trusting :func:`pki`'s CA, presenting no certificate."""
    from .auth_util import client_ssl

    return client_ssl(pki)


@pytest.fixture(scope="session")
def test_pki(tmp_path_factory: pytest.TempPathFactory) -> TestPki:
    return TestPki.create(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def server_factory(
    tmp_path: Path, auth_mode: str, request: pytest.FixtureRequest
) -> Iterator[type]:
    """Build servers on fresh ports (with auth on in auth mode); all are killed at teardown."""
    started: list[ServerProcess] = []
    pki: TestPki | None = request.getfixturevalue("test_pki") if auth_mode == "auth" else None

    class Factory:
        @staticmethod
        def create(
            data_dir: Path | None = None,
            config: Path | None = None,
            same_ports_as: ServerProcess | None = None,
            **env: str,
        ) -> ServerProcess:
            server = ServerProcess(
                data_dir or tmp_path / "data",
                tmp_path / f"server-{len(started)}.log",
                config,
                same_ports_as,
                pki,
                **env,
            )
            started.append(server)
            return server

    yield Factory
    for server in started:
        server.kill()


@pytest.fixture
def server(server_factory: type) -> ServerProcess:
    return server_factory.create().start()


@pytest.fixture
def control(server: ServerProcess) -> Iterator[pb_grpc.ControlServiceStub]:
    with server.channel() as channel:
        yield pb_grpc.ControlServiceStub(channel)


@pytest.fixture
def node_stub(server: ServerProcess) -> Iterator[pb_grpc.NodeServiceStub]:
    with server.channel() as channel:
        yield pb_grpc.NodeServiceStub(channel)


class Fleet:
    """A ``nexus-node`` process simulating many nodes."""

    def __init__(self, target: str, nodes: int, log_path: Path, *extra: str) -> None:
        self.log_path = log_path
        log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nexus_fast.node",
                "--target",
                target,
                "--nodes",
                str(nodes),
                "--status-interval",
                "1",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        log.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture
def fleet_factory(tmp_path: Path) -> Iterator[type]:
    fleets: list[Fleet] = []

    class Factory:
        @staticmethod
        def create(server: ServerProcess | str, nodes: int, *extra: str) -> Fleet:
            """A fleet against ``server`` (its credentials in auth mode) or a bare target."""
            if isinstance(server, ServerProcess):
                target, extra = server.grpc_target, (*server.fleet_args(), *extra)
            else:
                target = server
            fleet = Fleet(target, nodes, tmp_path / f"fleet-{len(fleets)}.log", *extra)
            fleets.append(fleet)
            return fleet

    yield Factory
    for fleet in fleets:
        if fleet.proc.poll() is None:
            fleet.proc.kill()
            fleet.proc.wait()


def wait_for(predicate, timeout: float, interval: float = 0.1, message: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s: {message} (last={last!r})")


def list_all_nodes(
    control: pb_grpc.ControlServiceStub, statuses: tuple[int, ...] = ()
) -> list[pb.Node]:
    nodes: list[pb.Node] = []
    token = ""
    while True:
        response = control.ListNodes(
            pb.ListNodesRequest(statuses=statuses, page_size=5000, page_token=token), timeout=10
        )
        nodes.extend(response.nodes)
        token = response.next_page_token
        if not token:
            return nodes
