"""Hot reload's parts without a server: which keys apply live, the merged config, the
effective-config view with its sources and redaction, rotated log files, and the
``reconfigure`` methods the reload calls on limits, roles and the scheduler."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from nexus_fast.cli import main as cli_main
from nexus_fast.config import Config, ConfigError, load_config
from nexus_fast.config_view import REDACTED, effective_config, is_secret_key
from nexus_fast.logs import ROOT_NAME, THIRD_PARTY_LOGGERS, configure_logging, get_logger
from nexus_fast.reload import LIVE_KEYS, apply_logging, changed_keys, classify, merge
from nexus_fast.security.limits import LimitExceeded, LimitsConfig, PrincipalLimits
from nexus_fast.security.permissions import Rbac
from nexus_fast.security.principal import Principal
from nexus_fast.security.rbac import parse_rbac
from nexus_fast.security.tls import GrpcCertificates, TlsMaterial
from nexus_fast.security.tools import cert_pem, issue_certificate, key_pem


def load(tmp_path: Path, text: str, name: str = "nexus.toml", **env: str) -> Config:
    path = tmp_path / name
    path.write_text(text)
    return load_config(path, env=env)


# --------------------------------------------------------------------------- classify


def test_live_and_restart_keys_are_split(tmp_path: Path) -> None:
    old = load(tmp_path, "[logging]\nlevel = 'info'\n")
    new = load(
        tmp_path,
        "[logging]\nlevel = 'debug'\n[commands]\ndefault_timeout = '7s'\n"
        "[server]\ngrpc_port = 50099\n[database]\npath = '/elsewhere'\n",
    )
    assert changed_keys(old, new) == [
        "server.grpc_port",
        "database.path",
        "logging.level",
        "commands.default_timeout",
    ]
    live, restart = classify(old, new, limits_live=False)
    assert live == ["logging.level", "commands.default_timeout"]
    assert restart == ["server.grpc_port", "database.path"]


def test_merge_keeps_restart_keys_and_their_sources(tmp_path: Path) -> None:
    old = load(tmp_path, "[server]\nmax_connections = 100\n", "old.toml")
    new = load(tmp_path, "[server]\nmax_connections = 5\n[commands]\ndefault_timeout = '7s'\n")
    live, restart = classify(old, new, limits_live=False)
    merged = merge(old, new, live)
    assert merged.server.max_connections == 100  # kept as it runs
    assert merged.commands.default_timeout == 7.0
    assert merged.sources["server.max_connections"].endswith("old.toml")
    assert merged.sources["commands.default_timeout"].endswith("nexus.toml")
    assert restart == ["server.max_connections"]


def test_limits_apply_live_only_when_they_were_on(tmp_path: Path) -> None:
    old = load(tmp_path, "[security.limits]\nrequests_per_second = 100\n", "old.toml")
    new = load(tmp_path, "[security.limits]\nrequests_per_second = 5\n")
    assert classify(old, new, limits_live=True) == (["security.limits"], [])
    assert classify(old, new, limits_live=False) == ([], ["security.limits"])


def test_tls_files_live_unless_tls_or_mtls_turns(tmp_path: Path) -> None:
    ca = issue_certificate("ca", None)
    server = issue_certificate("127.0.0.1", ca, server=True)
    (tmp_path / "a.pem").write_bytes(cert_pem(server[0]))
    (tmp_path / "a.key").write_bytes(key_pem(server[1]))
    (tmp_path / "b.pem").write_bytes(cert_pem(server[0]))
    (tmp_path / "ca.pem").write_bytes(cert_pem(ca[0]))
    tls = f"[security]\ntls_enabled = true\ntls_key_file = '{tmp_path / 'a.key'}'\n"
    old = load(tmp_path, tls + f"tls_cert_file = '{tmp_path / 'a.pem'}'\n", "old.toml")
    moved = load(tmp_path, tls + f"tls_cert_file = '{tmp_path / 'b.pem'}'\n")
    assert classify(old, moved, limits_live=False) == (["security.tls_cert_file"], [])
    mtls = load(
        tmp_path,
        tls + f"tls_cert_file = '{tmp_path / 'a.pem'}'\ntls_ca_file = '{tmp_path / 'ca.pem'}'\n",
        "mtls.toml",
    )
    assert classify(old, mtls, limits_live=False) == ([], ["security.tls_ca_file"])


def test_every_live_key_exists() -> None:
    known = {f"{section}.{key}" for section, keys in Config().to_dict().items() for key in keys}
    assert known >= LIVE_KEYS
    assert "server.grpc_port" not in LIVE_KEYS and "security.auth_required" not in LIVE_KEYS


# --------------------------------------------------------------------------- view


def test_effective_config_names_sources_and_redacts(tmp_path: Path) -> None:
    path = tmp_path / "nexus.toml"
    path.write_text("[security]\nauth_token = 'hunter2-very-secret'\n[logging]\nlevel = 'debug'\n")
    config = load_config(
        path,
        env={"NEXUS_NODE_TIMEOUT": "9s"},
        overrides={"server.grpc_port": "50100"},
    )
    view = effective_config(config, str(path))
    sections = view["config"]
    assert view["file"] == str(path)
    assert sections["logging"]["level"] == {"value": "debug", "source": "file", "from": str(path)}
    assert sections["performance"]["node_timeout"] == {
        "value": 9.0,
        "source": "env",
        "from": "NEXUS_NODE_TIMEOUT",
    }
    assert sections["server"]["grpc_port"] == {"value": 50100, "source": "command line"}
    assert sections["server"]["http_port"] == {"value": 8082, "source": "default"}
    assert sections["security"]["auth_token"]["value"] == REDACTED
    assert "hunter2" not in orjson.dumps(view).decode()
    assert sections["security"]["limits"]["value"]["enabled"] is False  # tables as objects


def test_secret_names() -> None:
    assert is_secret_key("security.auth_token")
    assert is_secret_key("tracing.api_key")
    assert not is_secret_key("security.jwt_secret_file")  # a path; its contents are never read
    assert not is_secret_key("server.grpc_port")


# --------------------------------------------------------------------------- logs


@pytest.fixture
def restore_loggers() -> Iterator[None]:
    names = (ROOT_NAME, *THIRD_PARTY_LOGGERS)
    saved = {n: (list(logging.getLogger(n).handlers), logging.getLogger(n).level) for n in names}
    yield
    configure_logging("info", "text", stream=io.StringIO())  # stops the file writer thread
    for name, (handlers, level) in saved.items():
        logging.getLogger(name).handlers[:] = handlers
        logging.getLogger(name).setLevel(level)


def test_log_file_rotates_into_max_files(tmp_path: Path, restore_loggers: None) -> None:
    log_file = tmp_path / "nexus.log"
    configure_logging("info", "json", file=str(log_file), max_bytes=1024, max_files=3)
    log = get_logger("test")
    for i in range(100):
        log.info("line", extra={"i": i, "pad": "x" * 40})
    configure_logging("info", "json", stream=io.StringIO())  # flushes and closes the file
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["nexus.log", "nexus.log.1", "nexus.log.2"]
    newest = [orjson.loads(line) for line in log_file.read_text().splitlines()]
    assert newest[-1]["i"] == 99 and newest[-1]["component"] == "test"
    assert all(p.stat().st_size <= 1024 for p in tmp_path.iterdir())


def test_level_and_destination_swap_at_once(tmp_path: Path, restore_loggers: None) -> None:
    out = io.StringIO()
    configure_logging("info", "json", stream=out)
    get_logger("test").debug("hidden")
    configure_logging("debug", "text", file=str(tmp_path / "a.log"))
    get_logger("test").debug("shown")
    configure_logging("info", "json", stream=out)
    assert out.getvalue() == ""
    text = (tmp_path / "a.log").read_text()
    assert "DEBUG test: shown" in text and "hidden" not in text


def test_unopenable_log_file_is_a_config_error(tmp_path: Path, restore_loggers: None) -> None:
    config = load(tmp_path, f"[logging]\nfile = '{tmp_path / 'missing' / 'x.log'}'\n")
    with pytest.raises(ConfigError) as info:
        apply_logging(config)
    assert str(info.value).startswith("invalid configuration: logging.file = ")
    assert "cannot open it" in str(info.value)


# --------------------------------------------------------------------------- reconfigure


def test_limits_reconfigure_keeps_what_is_held() -> None:
    now = [0.0]
    limits = PrincipalLimits(
        LimitsConfig(requests_per_second=1, burst=2, max_streams=2, total_streams=10),
        clock=lambda: now[0],
    )
    held = [limits.stream("p"), limits.stream("p")]
    limits.check_request("p")
    limits.check_request("p")
    with pytest.raises(Exception, match="rate"):
        limits.check_request("p")
    limits.reconfigure(
        LimitsConfig(requests_per_second=1000, burst=2000, max_streams=1, total_streams=10)
    )
    limits.check_request("p")  # the new burst has room
    assert all(slot.held for slot in held)  # over the new cap, nothing taken away
    with pytest.raises(LimitExceeded):
        limits.stream("p")
    held[0].release()
    held[1].release()
    limits.stream("p").release()


def test_rbac_reconfigure_changes_a_role() -> None:
    rbac = Rbac(parse_rbac({"roles": [{"name": "auditor", "permissions": ["node.read"]}]}))
    auditor = Principal("a", "auditor", "token")
    assert rbac.allows(auditor, "node.read") and not rbac.allows(auditor, "config.read")
    rbac.reconfigure(parse_rbac({"roles": [{"name": "auditor", "permissions": ["*.read"]}]}))
    assert rbac.allows(auditor, "config.read")
    assert not rbac.allows(Principal("v", "viewer", "token"), "config.read")
    assert rbac.allows(Principal("o", "operator", "token"), "config.read")


def test_grpc_certificates_hand_over_once(tmp_path: Path) -> None:
    ca = issue_certificate("ca", None)
    first, second = (issue_certificate("127.0.0.1", ca, server=True) for _ in range(2))
    material = TlsMaterial(cert_pem(first[0]), key_pem(first[1]), b"")
    certificates = GrpcCertificates(material)
    assert certificates._fetch() is None  # nothing new: keep the current certificate
    certificates.update(TlsMaterial(cert_pem(second[0]), key_pem(second[1]), b""))
    assert certificates._fetch() is not None
    assert certificates._fetch() is None
    assert certificates.material.cert == cert_pem(second[0])


def test_tls_material_refuses_a_mismatched_pair(tmp_path: Path) -> None:
    ca = issue_certificate("ca", None)
    first, second = (issue_certificate("127.0.0.1", ca, server=True) for _ in range(2))
    (tmp_path / "c.pem").write_bytes(cert_pem(first[0]))
    (tmp_path / "k.pem").write_bytes(key_pem(second[1]))
    config = load(
        tmp_path,
        f"[security]\ntls_enabled = true\ntls_cert_file = '{tmp_path / 'c.pem'}'\n"
        f"tls_key_file = '{tmp_path / 'k.pem'}'\n",
    )
    with pytest.raises(ValueError, match="not a usable certificate and key"):
        TlsMaterial.read(config.security)


def test_start_up_prints_the_line_a_reload_logs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for var in ("NEXUS_LOG_FORMAT", "NEXUS_LOG_LEVEL", "NEXUS_LOG_FILE"):
        monkeypatch.delenv(var, raising=False)
    path = tmp_path / "nexus.toml"
    path.write_text("[commands]\ndefault_timeout = '-5s'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert cli_main(["--config", str(path)]) == 2
    assert capsys.readouterr().err == f"nexus-fast: {info.value}\n"
