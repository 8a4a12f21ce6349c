"""Hot reload against the real server: the config file changed (watched) or SIGHUP.

Live keys apply without a restart and the behaviour shows it (a DEBUG line appears, a
command gets the new default timeout); a restart-only key is named and kept; a broken file
is refused with the start-up's one-line error while the server keeps serving; a rotated TLS
certificate is what a new connection gets on every port; the log file rotates into
``max_files`` files.
"""

from __future__ import annotations

import json
import queue
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from nexus_fast.config import ConfigError, load_config
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc
from nexus_fast.security.tokens import issue_token
from nexus_fast.security.tools import cert_pem, issue_certificate, key_pem

from .conftest import HOST, REPO, ServerProcess, TestPki, http_get

BASE = """\
[logging]
level = "{level}"
{logging}
[commands]
default_timeout = "{timeout}"

[server]
max_connections = {max_connections}
"""


def write_config(
    path: Path, level: str = "info", timeout: str = "30s", conns: int = 10000, logging: str = ""
) -> None:
    # Write then rename, as editors and config management do: never a half-written file.
    tmp = path.with_suffix(".tmp")
    text = BASE.format(level=level, timeout=timeout, max_connections=conns, logging=logging)
    tmp.write_text(text)
    tmp.replace(path)


def wait_for(what: str, check: Callable[[], Any], timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def effective(server: ServerProcess) -> dict[str, Any]:
    status, body, _ = server.http("/api/v1/config")
    assert status == 200, body
    config: dict[str, Any] = json.loads(body)["config"]
    return config


def log_lines(server: ServerProcess) -> list[dict[str, Any]]:
    text = server.log_path.read_text(errors="replace")
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


def lines_matching(server: ServerProcess, msg: str) -> list[dict[str, Any]]:
    return [line for line in log_lines(server) if msg in line["msg"]]


def ws_connect_once(server: ServerProcess) -> None:
    """Open and close one WebSocket connection (logged at DEBUG by the server)."""
    from websockets.sync.client import connect

    with connect(server.ws_url(), open_timeout=5):
        pass


def submitted_timeout_ms(server: ServerProcess) -> int:
    """Submit a command naming no timeout; the server fills in its default."""
    with server.channel() as channel:
        reply = pb_grpc.ControlServiceStub(channel).SubmitCommands(
            pb.SubmitCommandsRequest(commands=[pb.CommandSpec(kind="echo")]), timeout=10
        )
    status, body, _ = server.http(f"/api/v1/commands/{reply.results[0].id}")
    assert status == 200, body
    return int(json.loads(body)["spec"]["timeout_ms"])


def reload_events(server: ServerProcess) -> list[dict[str, Any]]:
    status, body, _ = server.http("/api/v1/events?topics=system&limit=100")
    assert status == 200, body
    events = json.loads(body)["events"]
    return [e for e in events if e["type"] == "config.reloaded"]


def test_config_file_change_applies_live_keys_and_names_restart_keys(
    server_factory: type, tmp_path: Path
) -> None:
    config = tmp_path / "nexus.toml"
    write_config(config)
    server: ServerProcess = server_factory.create(config=config).start()
    before = effective(server)
    assert before["commands"]["default_timeout"] == {
        "value": 30.0,
        "source": "file",
        "from": str(config),
    }
    assert before["server"]["grpc_port"]["source"] == "command line"
    assert before["logging"]["format"] == {
        "value": "json",
        "source": "env",
        "from": "NEXUS_LOG_FORMAT",
    }
    assert submitted_timeout_ms(server) == 30_000
    ws_connect_once(server)
    assert not lines_matching(server, "websocket client"), "DEBUG line at level info"

    # Live keys: the log level and a timeout; and one key that needs a restart.
    write_config(config, level="debug", timeout="7s", conns=500)
    wait_for("the reload", lambda: effective(server)["commands"]["default_timeout"]["value"] == 7)
    assert submitted_timeout_ms(server) == 7_000
    ws_connect_once(server)
    wait_for("a DEBUG line", lambda: lines_matching(server, "websocket client"))
    restart = lines_matching(server, "need a restart")
    assert len(restart) == 1 and restart[0]["keys"] == ["server.max_connections"]
    assert effective(server)["server"]["max_connections"]["value"] == 10000  # kept
    assert json.loads(server.http("/api/v1/config")[1])["restart_pending"] == [
        "server.max_connections"
    ]
    events = reload_events(server)
    assert events, "no config.reloaded event"
    payload = events[-1]["payload"]
    assert set(payload["changed"]) == {"logging.level", "commands.default_timeout"}
    assert payload["restart_required"] == ["server.max_connections"]
    assert payload["trigger"] == "file change"

    # A broken file: the start-up's one-line error, and the running config stays.
    config.write_text(BASE.format(level="debug", timeout="-5s", max_connections=500, logging=""))
    with pytest.raises(ConfigError) as refused_at_start:  # what `nexus-fast` prints, after
        load_config(config, env={})  # "nexus-fast: ", and exits 2 (tests/unit/test_reload.py)
    expected = str(refused_at_start.value)
    rejected = wait_for("the rejection", lambda: lines_matching(server, expected))
    assert rejected[0]["level"] == "error" and rejected[0]["kept"] == "running configuration"
    assert "\n" not in expected and "default_timeout" in expected
    assert effective(server)["commands"]["default_timeout"]["value"] == 7
    assert server.http("/ready")[0] == 200
    assert submitted_timeout_ms(server) == 7_000
    assert server.stop() == 0


def test_sighup_reloads_and_the_log_file_rotates_into_max_files(
    server_factory: type, tmp_path: Path
) -> None:
    # The server watches the directory of the path it was given; the file behind this
    # symlink lives elsewhere, so only SIGHUP can make the server read the change.
    real = tmp_path / "real" / "nexus.toml"
    real.parent.mkdir()
    log_file = tmp_path / "logs" / "nexus.log"
    log_file.parent.mkdir()
    to_file = f'file = "{log_file}"\nfile_rotation = "size"\nmax_file_size = "1KB"\nmax_files = 3\n'
    write_config(real, logging=to_file)
    link = tmp_path / "conf" / "nexus.toml"
    link.parent.mkdir()
    link.symlink_to(real)
    server: ServerProcess = server_factory.create(config=link).start()
    write_config(real, level="debug", timeout="9s", logging=to_file)
    time.sleep(0.5)
    assert effective(server)["commands"]["default_timeout"]["value"] == 30  # not seen
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)
    wait_for("the reload", lambda: effective(server)["commands"]["default_timeout"]["value"] == 9)
    assert effective(server)["logging"]["level"]["value"] == "debug"
    assert submitted_timeout_ms(server) == 9_000
    assert reload_events(server)[-1]["payload"]["trigger"] == "SIGHUP"
    for _ in range(20):  # two DEBUG lines each (now that the level is debug), ~120 bytes each
        ws_connect_once(server)
    assert server.stop() == 0

    files = sorted(p.name for p in log_file.parent.iterdir())
    assert files == ["nexus.log", "nexus.log.1", "nexus.log.2"]
    debug = 0
    for path in log_file.parent.iterdir():
        lines = [json.loads(line) for line in path.read_text().splitlines()]  # whole events
        assert lines, path
        debug += sum(1 for line in lines if line["level"] == "debug")
        # A file rolls over before the line that would take it past max_file_size.
        assert path.stat().st_size <= 1024 or len(lines) == 1, path
    assert debug > 10
    # The lines went to the file, not to stderr.
    assert not [line for line in server.log().splitlines() if line.startswith("{")]


def _pem_files(tmp: Path, name: str, pair: Any) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.pem", tmp / f"{name}.key"
    cert.write_bytes(cert_pem(pair[0]))
    key.write_bytes(key_pem(pair[1]))
    return cert, key


# What each port hears first after the handshake: gRPC the HTTP/2 preface (it answers with
# SETTINGS), the WebSocket and HTTP ports an upgrade request (101 or 404: some bytes).
_HELLO = {
    "h2": b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    None: b"GET /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
    b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Sec-WebSocket-Version: 13\r\n\r\n",
}


def handshake(port: int, ca: Path, client: tuple[Path, Path], alpn: str | None) -> int | None:
    """A new TLS connection to ``port`` presenting ``client``: the serial number of the
    server's certificate, or None when the server refused the client certificate."""
    context = ssl.create_default_context(cafile=str(ca))
    context.load_cert_chain(*client)
    if alpn:
        context.set_alpn_protocols([alpn])
    with socket.create_connection((HOST, port), timeout=5) as raw:
        try:
            with context.wrap_socket(raw, server_hostname=HOST) as tls:
                der = tls.getpeercert(binary_form=True)
                # TLS 1.3 servers refuse a client certificate after the client's handshake
                # ends: only a round trip tells.
                tls.sendall(_HELLO[alpn])
                if not tls.recv(64):
                    return None
        except (ssl.SSLError, ConnectionError):
            return None
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def test_tls_certificate_and_client_ca_rotate_for_new_connections(
    server_factory: type, tmp_path: Path
) -> None:
    old_ca, new_ca = issue_certificate("old-ca", None), issue_certificate("new-ca", None)
    ca_file = tmp_path / "ca.pem"  # the server's certificates all come from old_ca
    ca_file.write_bytes(cert_pem(old_ca[0]))
    first, second = (issue_certificate("127.0.0.1", old_ca, server=True) for _ in range(2))
    old_client = _pem_files(tmp_path, "old-client", issue_certificate("operator", old_ca))
    new_client = _pem_files(tmp_path, "new-client", issue_certificate("operator", new_ca))
    live_cert, live_key = _pem_files(tmp_path, "server", first)
    client_ca = tmp_path / "client-ca.pem"
    client_ca.write_bytes(cert_pem(old_ca[0]))
    config = tmp_path / "nexus.toml"
    config.write_text(
        "[security]\ntls_enabled = true\nhttp_tls = true\n"
        f'tls_cert_file = "{live_cert}"\ntls_key_file = "{live_key}"\n'
        f'tls_ca_file = "{client_ca}"\n'
    )
    server = start_tls(server_factory.create(config=config), ca_file, old_client)
    ports = {"h2": server.grpc_port, None: server.ws_port, "http/1.1": server.http_port}

    def serials(client: tuple[Path, Path]) -> list[int | None]:
        return [handshake(port, ca_file, client, alpn if alpn != "http/1.1" else None)
                for alpn, port in ports.items()]  # fmt: skip

    assert serials(old_client) == [first[0].serial_number] * 3
    assert serials(new_client) == [None] * 3  # not signed by a trusted CA
    # An open gRPC connection made before the rotation keeps working after it.
    creds = grpc.ssl_channel_credentials(
        ca_file.read_bytes(), old_client[1].read_bytes(), old_client[0].read_bytes()
    )
    channel = grpc.secure_channel(server.grpc_target, creds)
    pb_grpc.ControlServiceStub(channel).ListNodes(pb.ListNodesRequest(), timeout=5)

    # Rotate the server's pair (the watcher sees the files; SIGHUP in case it saw only the
    # first write, when the new key did not match the old certificate and was refused).
    live_key.write_bytes(key_pem(second[1]))
    live_cert.write_bytes(cert_pem(second[0]))
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)
    wait_for("the new certificate", lambda: serials(old_client) == [second[0].serial_number] * 3)
    pb_grpc.ControlServiceStub(channel).ListNodes(pb.ListNodesRequest(), timeout=5)
    channel.close()

    # Replace the client CA: clients of the new one are trusted on every port. gRPC drops
    # the old CA; WSS/HTTPS add CAs to their context and drop none until a restart
    # (docs/security.md).
    client_ca.write_bytes(cert_pem(new_ca[0]))
    wait_for("the new client CA", lambda: serials(new_client) == [second[0].serial_number] * 3)
    assert serials(old_client)[0] is None
    changed = [e["payload"]["changed"] for e in reload_events_tls(server, ca_file, new_client)]
    assert ["security.tls_cert_file"] in changed
    assert server.stop() == 0


def start_tls(
    server: ServerProcess,
    ca: Path | None,
    client: tuple[Path, Path] | None = None,
    without_env: tuple[str, ...] = (),
    timeout: float = 30.0,
) -> ServerProcess:
    """Start ``server`` without the fixture's ``without_env`` variables (they beat the file);
    with ``ca`` (and a ``client`` certificate), a TLS server made without the test PKI:
    readiness is asked over HTTPS."""
    env = {k: v for k, v in server.env().items() if k not in without_env}
    with server.log_path.open("ab") as log:
        server.proc = subprocess.Popen(
            server.command(), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO
        )
    context = _client_context(ca, client) if ca else None
    url = f"{'https' if ca else 'http'}://{HOST}:{server.http_port}/ready"
    wait_for("readiness", lambda: _ready(url, context, server), timeout)
    return server


def _client_context(ca: Path, client: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca))
    if client:
        context.load_cert_chain(*client)
    return context


def _ready(url: str, context: ssl.SSLContext | None, server: ServerProcess) -> bool:
    assert server.proc is not None
    if server.proc.poll() is not None:
        raise AssertionError(f"server exited:\n{server.log()}")
    try:
        return http_get(url, 2, context)[0] == 200
    except OSError:
        return False


def reload_events_tls(
    server: ServerProcess, ca: Path, client: tuple[Path, Path]
) -> list[dict[str, Any]]:
    url = f"https://{HOST}:{server.http_port}/api/v1/events?topics=system&limit=100"
    status, body, _ = http_get(url, 5, _client_context(ca, client))
    assert status == 200, body
    return [e for e in json.loads(body)["events"] if e["type"] == "config.reloaded"]


@pytest.mark.parametrize("auth_mode", ["auth"], indirect=True)
def test_config_view_is_for_operators_and_shows_no_secret(
    server_factory: type, tmp_path: Path, test_pki: TestPki
) -> None:
    config = tmp_path / "nexus.toml"
    config.write_text("[security]\nauth_token = 'a-static-secret-token'\n")
    server: ServerProcess = server_factory.create(config=config).start()
    status, body, _ = server.http("/api/v1/config")  # as the operator
    assert status == 200, body
    sections = json.loads(body)["config"]["security"]
    assert sections["auth_token"]["value"] == "redacted"
    assert sections["auth_token"]["source"] == "file"
    assert sections["jwt_secret_file"]["value"].endswith("jwt.secret")  # the path, not the key
    assert b"a-static-secret-token" not in body
    assert test_pki.secret not in body
    viewer = issue_token("watcher", "viewer", 600, secret=test_pki.secret)
    url = server.http_base + "/api/v1/config"
    headers = {"Authorization": f"Bearer {viewer}"}
    assert http_get(url, 5, test_pki.client_ssl(), headers)[0] == 403
    assert server.stop() == 0


def test_limits_and_node_timing_reload_live(server_factory: type, tmp_path: Path) -> None:
    config = tmp_path / "nexus.toml"
    settings = (
        '[performance]\nheartbeat_interval = "{hb}"\nnode_timeout = "{timeout}"\n'
        "[security.limits]\nrequests_per_second = {rate}\nburst = {burst}\n"
    )
    config.write_text(settings.format(hb="5s", timeout="30s", rate=1000, burst=2000))
    liveness = ("NEXUS_HEARTBEAT_INTERVAL", "NEXUS_NODE_TIMEOUT")  # the fixture's beat the file
    server = start_tls(server_factory.create(config=config), None, without_env=liveness)
    assert all(server.http("/api/v1/nodes")[0] == 200 for _ in range(5))
    outbound: queue.SimpleQueue[pb.NodeMessage | None] = queue.SimpleQueue()

    def messages() -> Iterator[pb.NodeMessage]:
        while (message := outbound.get()) is not None:
            yield message

    with server.channel() as channel:
        stub = pb_grpc.NodeServiceStub(channel)
        registered = stub.Register(pb.RegisterRequest(node_id="n1"), timeout=10)
        assert registered.config.heartbeat_interval_ms == 5000
        outbound.put(pb.NodeMessage(node_id="n1", session_epoch=registered.session_epoch))
        stream = stub.Connect(messages(), timeout=30)
        first = next(stream)
        assert first.config.heartbeat_interval_ms == 5000
        tmp = config.with_suffix(".tmp")
        tmp.write_text(settings.format(hb="1s", timeout="4s", rate=0.1, burst=3))
        tmp.replace(config)
        # The connected node is told the new timing on its open stream.
        pushed = next(stream)
        assert pushed.config.heartbeat_interval_ms == 1000
        assert pushed.config.node_timeout_ms == 4000
        outbound.put(None)
        stream.cancel()
    # The same reload cut the request budget to a burst of 3.
    statuses = [server.http("/api/v1/nodes")[0] for _ in range(6)]
    assert 429 in statuses, statuses
    assert server.http("/ready")[0] == 200  # probes are never limited
    assert server.stop() == 0
