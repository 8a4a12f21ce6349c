"""Tests for nexus_fast.config: parsing, precedence, validation errors, shipped configs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from nexus_fast.config import (
    ENV_OVERRIDES,
    Config,
    ConfigError,
    DatabaseConfig,
    format_duration,
    format_size,
    load_config,
    parse_duration,
    parse_size,
)

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
KB, MB, GB = 1024, 1024**2, 1024**3


def write(tmp_path: Path, text: str, name: str = "nexus.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def load_error(*args: object, **kwargs: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load_config(*args, **kwargs)  # type: ignore[arg-type]
    return info.value


# --------------------------------------------------------------------------- parsing tables


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("250ms", 0.25),
        ("30s", 30.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1.5s", 1.5),
        ("0s", 0.0),
        ("0", 0.0),
        ("45", 45.0),
        (" 10s ", 10.0),
        (12, 12.0),
        (0.5, 0.5),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)
    assert isinstance(parse_duration(text), float)


@pytest.mark.parametrize("bad", ["", "s", "10x", "1h30m", "ten", "10 sec", "-1s", -3, "nan"])
def test_parse_duration_rejects_malformed_and_negative(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@pytest.mark.parametrize("bad", [True, None, [1]])
def test_parse_duration_rejects_wrong_types(bad: object) -> None:
    with pytest.raises(TypeError):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1024", 1024),
        ("512KB", 512 * KB),
        ("64MB", 64 * MB),
        ("1GB", GB),
        ("8GB", 8 * GB),
        ("1KiB", KB),
        ("2MiB", 2 * MB),
        ("3GiB", 3 * GB),
        ("100B", 100),
        ("64mb", 64 * MB),
        ("1.5GB", 3 * GB // 2),
        (4096, 4096),
    ],
)
def test_parse_size(text: object, size: int) -> None:
    assert parse_size(text) == size
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize("bad", ["", "GB", "12XB", "-1MB", -1, "1 G B", "1e3"])
def test_parse_size_rejects_malformed(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize("bad", [True, 1.5, None])
def test_parse_size_rejects_wrong_types(bad: object) -> None:
    with pytest.raises(TypeError):
        parse_size(bad)


def test_parse_size_binary_short_units_and_exponent_opt_in() -> None:
    # The node spec's units (Ki, Mi, ..., P) live here now; exponents only when asked for.
    assert parse_size("4Ki") == 4 * KB
    assert parse_size("2gi") == 2 * GB
    assert parse_size("1P") == 1024 * 1024 * GB
    assert parse_size("1e3", exponent=True) == 1000
    assert parse_size("1.5e1MB", exponent=True) == 15 * MB
    with pytest.raises(ValueError):
        parse_size("1e3")


def test_parse_size_rejects_infinite_numbers() -> None:
    # float("9" * 400) is inf; int(inf) used to escape as OverflowError.
    with pytest.raises(ValueError):
        parse_size("9" * 400)
    with pytest.raises(ValueError):
        parse_size("1e400", exponent=True)


def test_format_helpers_round_trip() -> None:
    for text in ("250ms", "30s", "5m", "6h", "1d"):
        assert format_duration(parse_duration(text)) == text
    for text in ("512KB", "64MB", "8GB", "1500B"):
        assert format_size(parse_size(text)) == text


# --------------------------------------------------------------------------- defaults & shape


def test_defaults_without_file_or_env() -> None:
    cfg = load_config(env={})
    assert cfg == Config()
    assert cfg.server.grpc_port == 50053
    assert cfg.server.websocket_port == 8081
    assert cfg.server.http_port == 8082
    assert cfg.server.max_message_size == 4 * MB
    assert cfg.server.shutdown_timeout == 10.0
    assert cfg.database.cache_size == GB
    assert cfg.database.max_map_size == 64 * GB
    assert cfg.performance.node_down_retention == 86400.0
    assert cfg.performance.event_buffer_size == 65536
    assert cfg.logging.level == "info"
    assert cfg.logging.format == "text"
    assert cfg.security.tls_enabled is False


def test_config_is_frozen() -> None:
    cfg = load_config(env={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.server.grpc_port = 1  # type: ignore[misc]


def test_to_dict_is_json_and_masks_token() -> None:
    cfg = load_config(env={}, overrides={"security.auth_token": "s3cret"})
    data = cfg.to_dict()
    text = json.dumps(data)
    assert "s3cret" not in text
    assert data["security"]["auth_token"] == "***"
    assert data["performance"]["node_timeout"] == 30.0
    assert data["database"]["cache_size"] == GB
    assert set(data) == {
        "server",
        "database",
        "monitoring",
        "security",
        "performance",
        "logging",
        "scheduler",
        "commands",
        "events",
        "agents",
        "nodes",
        "tracing",
        "cluster",
    }
    assert load_config(env={}).to_dict()["security"]["auth_token"] == ""


def test_resolved_backup_path() -> None:
    assert DatabaseConfig(path="/d").resolved_backup_path() == Path("/d/backups")
    assert DatabaseConfig(path="/d", backup_path="/b").resolved_backup_path() == Path("/b")


# --------------------------------------------------------------------------- precedence


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        '[server]\ngrpc_port = 1001\nwebsocket_port = 1002\nhttp_port = 1003\nhost = "10.0.0.1"\n',
    )
    env = {"NEXUS_GRPC_PORT": "2001", "NEXUS_WS_PORT": "2002"}
    cfg = load_config(path, env=env, overrides={"server.grpc_port": 3001})
    assert cfg.server.grpc_port == 3001  # flag beats env and file
    assert cfg.server.websocket_port == 2002  # env beats file
    assert cfg.server.http_port == 1003  # file beats default
    assert cfg.server.host == "10.0.0.1"
    assert cfg.server.max_connections == 10000  # default
    assert cfg.sources["server.grpc_port"] == "command line"
    assert cfg.sources["server.websocket_port"] == "NEXUS_WS_PORT"
    assert cfg.sources["server.http_port"] == str(path)
    assert "server.max_connections" not in cfg.sources


def test_none_overrides_are_skipped(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\ngrpc_port = 1001\n")
    cfg = load_config(path, env={}, overrides={"server.grpc_port": None})
    assert cfg.server.grpc_port == 1001


def test_env_strings_are_parsed_per_field_type() -> None:
    env = {
        "NEXUS_HOST": "0.0.0.0",
        "NEXUS_HTTP_PORT": "9000",
        "NEXUS_DB_PATH": "/tmp/x",
        "NEXUS_DB_CACHE_SIZE": "2GB",
        "NEXUS_LOG_FORMAT": "json",
        "NEXUS_LOG_LEVEL": "DEBUG",
        "NEXUS_MAX_CONNECTIONS": "50",
        "NEXUS_WORKER_THREADS": "8",
        "NEXUS_TLS_ENABLED": "no",
        "NEXUS_NODE_TIMEOUT": "1m",
        "NEXUS_HEARTBEAT_INTERVAL": "10",
        "NEXUS_PRUNING_INTERVAL": "500ms",
        "NEXUS_SHUTDOWN_TIMEOUT": "2s",
    }
    cfg = load_config(env=env)
    assert cfg.server.host == "0.0.0.0"
    assert cfg.server.http_port == 9000
    assert cfg.database.path == "/tmp/x"
    assert cfg.database.cache_size == 2 * GB
    assert cfg.logging.format == "json"
    assert cfg.logging.level == "debug"
    assert cfg.server.max_connections == 50
    assert cfg.server.worker_threads == 8
    assert cfg.security.tls_enabled is False
    assert cfg.performance.node_timeout == 60.0
    assert cfg.performance.heartbeat_interval == 10.0
    assert cfg.performance.pruning_interval == 0.5
    assert cfg.server.shutdown_timeout == 2.0


@pytest.mark.parametrize(
    ("text", "expected"),
    [("true", True), ("1", True), ("yes", True), ("YES", True), ("false", False), ("0", False)],
)
def test_env_bool_parsing(text: str, expected: bool) -> None:
    cert_env = {"NEXUS_TLS_ENABLED": text}
    if expected:
        with pytest.raises(ConfigError) as info:
            load_config(env=cert_env)
        assert info.value.key == "security.tls_cert_file"  # proves the bool parsed as True
    else:
        assert load_config(env=cert_env).security.tls_enabled is False


def test_env_table_targets_real_keys_and_unrelated_vars_ignored() -> None:
    fields = Config().to_dict()
    for var, key in ENV_OVERRIDES.items():
        section, _, name = key.partition(".")
        assert var.startswith("NEXUS_")
        assert name in fields[section], key
    assert len(set(ENV_OVERRIDES.values())) == len(ENV_OVERRIDES)
    assert load_config(env={"NEXUS_NO_EXTENSIONS": "1", "NEXUS_BOGUS": "x"}) == Config()


def test_event_env_overrides() -> None:
    cfg = load_config(
        env={
            "NEXUS_MAX_MESSAGE_SIZE": "64KB",
            "NEXUS_EVENT_BUFFER_SIZE": "1024",
            "NEXUS_EVENTS_RETENTION_COUNT": "10",
            "NEXUS_EVENTS_RETENTION_AGE": "1h",
            "NEXUS_EVENTS_BOOKMARK_INTERVAL": "250ms",
            "NEXUS_EVENTS_SUBSCRIBER_BUFFER": "100",
            "NEXUS_EVENTS_MAX_SUBSCRIPTIONS": "3",
        }
    )
    assert cfg.server.max_message_size == 64 * 1024
    assert cfg.performance.event_buffer_size == 1024
    assert cfg.events.retention_count == 10
    assert cfg.events.retention_age == 3600.0
    assert cfg.events.bookmark_interval == 0.25
    assert cfg.events.subscriber_buffer == 100
    assert cfg.events.max_subscriptions == 3
    with pytest.raises(ConfigError) as info:
        load_config(env={"NEXUS_EVENT_BUFFER_SIZE": "1000"})
    assert info.value.key == "performance.event_buffer_size"


def test_string_overrides_are_parsed_like_env() -> None:
    cfg = load_config(env={}, overrides={"server.grpc_port": "7000", "database.cache_size": "2GB"})
    assert cfg.server.grpc_port == 7000
    assert cfg.database.cache_size == 2 * GB


# --------------------------------------------------------------------------- error classes


def test_error_message_format_for_env_port() -> None:
    err = load_error(env={"NEXUS_GRPC_PORT": "70000"})
    assert str(err) == (
        "invalid configuration: server.grpc_port = 70000 (from NEXUS_GRPC_PORT): "
        "expected an integer port in 1..65535"
    )
    assert (err.key, err.value, err.source) == ("server.grpc_port", "70000", "NEXUS_GRPC_PORT")
    assert err.expected == "an integer port in 1..65535"


def test_unknown_section(tmp_path: Path) -> None:
    path = write(tmp_path, "[servr]\nhost = 'x'\n")
    err = load_error(path, env={})
    assert err.key == "[servr]"
    assert "unknown section" in str(err)
    assert "[server]" in str(err)
    assert str(path) in str(err)


def test_unknown_key_suggests_closest(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\ngrpc_prot = 1\n")
    err = load_error(path, env={})
    assert err.key == "server.grpc_prot"
    assert err.value == 1
    assert "unknown key" in str(err)
    assert "did you mean 'server.grpc_port'" in str(err)
    assert "server.grpc_port" in err.expected


def test_unknown_override_key() -> None:
    err = load_error(env={}, overrides={"performance.node_timout": "5s"})
    assert err.key == "performance.node_timout"
    assert err.source == "command line"
    assert "unknown key" in str(err) and "performance.node_timeout" in str(err)


def test_unknown_key_without_close_match(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "[logging]\nzzzzzzzzzzzz = 1\n"), env={})
    assert "unknown key" in str(err)
    assert "did you mean" not in str(err)


def test_section_must_be_table(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "server = 5\n"), env={})
    assert err.key == "server"
    assert "table" in err.expected


@pytest.mark.parametrize(
    ("toml", "key", "expected_word"),
    [
        ("[server]\ngrpc_port = true\n", "server.grpc_port", "integer"),  # bool is not an int
        ('[server]\ngrpc_port = "50053"\n', "server.grpc_port", "integer"),  # file is strict
        ("[server]\nmax_connections = 1.5\n", "server.max_connections", "integer"),
        ("[server]\nhost = 1\n", "server.host", "string"),
        ('[monitoring]\nmetrics_enabled = "yes"\n', "monitoring.metrics_enabled", "boolean"),
        ("[performance]\nnode_timeout = true\n", "performance.node_timeout", "duration"),
        ("[database]\ncache_size = 1.5\n", "database.cache_size", "size"),
    ],
)
def test_wrong_types(tmp_path: Path, toml: str, key: str, expected_word: str) -> None:
    err = load_error(write(tmp_path, toml), env={})
    assert err.key == key
    assert expected_word in err.expected
    assert key in str(err)


def test_toml_int_is_fine_for_durations(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "[performance]\nnode_timeout = 60\n"), env={})
    assert cfg.performance.node_timeout == 60.0


@pytest.mark.parametrize("port", [0, 65536, -1, 70000])
def test_port_out_of_range(tmp_path: Path, port: int) -> None:
    err = load_error(write(tmp_path, f"[server]\nhttp_port = {port}\n"), env={})
    assert (err.key, err.value) == ("server.http_port", port)
    assert "1..65535" in err.expected


def test_negative_duration(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, '[server]\nshutdown_timeout = "-5s"\n'), env={})
    assert (err.key, err.value) == ("server.shutdown_timeout", "-5s")
    assert "duration" in err.expected
    err = load_error(write(tmp_path, "[database]\nsync_interval = -1\n"), env={})
    assert (err.key, err.value) == ("database.sync_interval", -1)


def test_malformed_duration_and_size_from_env() -> None:
    err = load_error(env={"NEXUS_NODE_TIMEOUT": "30 seconds"})
    assert (err.key, err.value, err.source) == (
        "performance.node_timeout",
        "30 seconds",
        "NEXUS_NODE_TIMEOUT",
    )
    assert 'node_timeout = "30 seconds"' in str(err)  # values with spaces are quoted
    err = load_error(env={"NEXUS_DB_CACHE_SIZE": "12XB"})
    assert (err.key, err.value) == ("database.cache_size", "12XB")
    assert "size" in err.expected


def test_bad_enum() -> None:
    err = load_error(env={"NEXUS_LOG_LEVEL": "verbose"})
    assert err.key == "logging.level"
    assert "debug, info, warning, error, critical" in err.expected
    err = load_error(env={}, overrides={"logging.format": "xml"})
    assert err.key == "logging.format" and "text, json" in err.expected


def test_bad_env_int_and_bool() -> None:
    assert load_error(env={"NEXUS_WORKER_THREADS": "four"}).key == "server.worker_threads"
    assert load_error(env={"NEXUS_WORKER_THREADS": "257"}).expected == "an integer in 1..256"
    assert load_error(env={"NEXUS_MAX_CONNECTIONS": "0"}).key == "server.max_connections"
    err = load_error(env={"NEXUS_TLS_ENABLED": "maybe"})
    assert (err.key, err.value) == ("security.tls_enabled", "maybe")


def test_size_minimums(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, '[database]\ncache_size = "512KB"\n'), env={})
    assert err.key == "database.cache_size" and "1MB" in err.expected
    err = load_error(write(tmp_path, "[server]\nmax_message_size = 100\n"), env={})
    assert err.key == "server.max_message_size" and "1KB" in err.expected


def test_toml_syntax_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[server\ngrpc_port = \n")
    err = load_error(path, env={})
    assert err.key == str(path)
    assert "invalid TOML" in str(err)
    assert "TOML" in err.expected


def test_missing_config_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    err = load_error(path, env={})
    assert err.key == str(path)
    assert "not found" in str(err)


def test_power_of_two(tmp_path: Path) -> None:
    err = load_error(write(tmp_path, "[performance]\nevent_buffer_size = 65535\n"), env={})
    assert (err.key, err.value) == ("performance.event_buffer_size", 65535)
    assert "power of two" in err.expected
    for ok in (1, 2, 1024, 1 << 20):
        text = f"[performance]\nevent_buffer_size = {ok}\n"
        assert load_config(write(tmp_path, text), env={}).performance.event_buffer_size == ok


def test_heartbeat_must_be_below_node_timeout(tmp_path: Path) -> None:
    err = load_error(env={"NEXUS_HEARTBEAT_INTERVAL": "30s"})
    assert (err.key, err.value, err.source) == (
        "performance.heartbeat_interval",
        "30s",
        "NEXUS_HEARTBEAT_INTERVAL",
    )
    assert "node_timeout" in err.expected
    # Lowering node_timeout below the default heartbeat is caught too.
    err = load_error(write(tmp_path, '[performance]\nnode_timeout = "3s"\n'), env={})
    assert err.key == "performance.heartbeat_interval"
    cfg = load_config(env={"NEXUS_HEARTBEAT_INTERVAL": "29s"})
    assert cfg.performance.heartbeat_interval == 29.0


def test_zero_node_timeout_rejected() -> None:
    err = load_error(env={"NEXUS_NODE_TIMEOUT": "0s"})
    assert err.key == "performance.node_timeout" and "positive" in err.expected


def test_distinct_ports() -> None:
    err = load_error(env={"NEXUS_HTTP_PORT": "50053"})
    assert err.key == "server.http_port" and "server.grpc_port" in err.expected


def test_max_map_size_at_least_cache_size(tmp_path: Path) -> None:
    path = write(tmp_path, '[database]\ncache_size = "8GB"\nmax_map_size = "4GB"\n')
    err = load_error(path, env={})
    assert err.key == "database.max_map_size" and "8GB" in err.expected


# --------------------------------------------------------------------------- TLS


def test_tls_requires_cert_and_key_paths() -> None:
    err = load_error(env={"NEXUS_TLS_ENABLED": "true"})
    assert err.key == "security.tls_cert_file"
    assert "tls_enabled" in err.expected


def test_tls_files_must_exist(tmp_path: Path) -> None:
    cert = tmp_path / "server.crt"
    key = tmp_path / "server.key"
    cert.write_text("cert")
    env = {
        "NEXUS_TLS_ENABLED": "1",
        "NEXUS_TLS_CERT_FILE": str(cert),
        "NEXUS_TLS_KEY_FILE": str(key),
    }
    err = load_error(env=env)
    assert (err.key, err.value, err.source) == (
        "security.tls_key_file",
        str(key),
        "NEXUS_TLS_KEY_FILE",
    )
    assert "existing file" in err.expected

    key.write_text("key")
    cfg = load_config(env=env)
    assert cfg.security.tls_enabled and not cfg.security.mtls_enabled

    missing_ca = {**env, "NEXUS_TLS_CA_FILE": str(tmp_path / "ca.crt")}
    assert load_error(env=missing_ca).key == "security.tls_ca_file"
    (tmp_path / "ca.crt").write_text("ca")
    assert load_config(env=missing_ca).security.mtls_enabled


def test_ca_without_tls_is_rejected(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("ca")
    err = load_error(env={"NEXUS_TLS_CA_FILE": str(ca)})
    assert err.key == "security.tls_ca_file" and "tls_enabled" in err.expected


# --------------------------------------------------------------------------- shipped configs


@pytest.mark.parametrize("name", ["development", "staging", "production"])
def test_shipped_configs_load(name: str) -> None:
    cfg = load_config(CONFIGS / f"{name}.toml", env={})
    assert cfg.security.tls_enabled is False
    assert cfg.logging.level == "info"


def test_development_is_all_defaults_written_out() -> None:
    path = CONFIGS / "development.toml"
    cfg = load_config(path, env={})
    assert cfg == Config()
    # Every key is written explicitly (not merely defaulted).
    assert set(cfg.sources) == {
        f"{section}.{key}" for section, keys in Config().to_dict().items() for key in keys
    }


def test_staging_and_production_values() -> None:
    staging = load_config(CONFIGS / "staging.toml", env={})
    assert staging.server.host == "0.0.0.0"
    assert staging.logging.format == "json"
    assert staging.database.path == "/var/lib/nexus-fast"
    assert staging.database.backup_interval == 3600.0

    prod = load_config(CONFIGS / "production.toml", env={})
    assert prod.server.host == "0.0.0.0"
    assert prod.logging.format == "json"
    assert prod.database.path == "/var/lib/nexus-fast"
    assert prod.database.cache_size == 8 * GB
    assert prod.database.backup_interval == 6 * 3600.0
    assert prod.database.resolved_backup_path() == Path("/var/lib/nexus-fast/backups")
    assert "tls_cert_file" in (CONFIGS / "production.toml").read_text()


def test_float_weights_parse_and_are_range_checked() -> None:
    cfg = load_config(env={}, overrides={"scheduler.weight_most_allocated": "2.5"})
    assert cfg.scheduler.weight_most_allocated == 2.5
    for bad in ("-1", "nan", "inf", "heavy", "101"):
        with pytest.raises(ConfigError) as info:
            load_config(env={}, overrides={"scheduler.weight_spread": bad})
        assert "scheduler.weight_spread" in str(info.value) and "a number" in str(info.value)


def test_readme_documents_every_environment_override() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [var for var in ENV_OVERRIDES if f"`{var}`" not in readme]
    assert not missing, f"README configuration table lacks {missing}"


def test_tracing_endpoint_must_be_an_otlp_grpc_url(tmp_path: Path) -> None:
    assert load_config(env={}).tracing.enabled is False  # off by default
    cfg = load_config(env={"NEXUS_TRACING_ENDPOINT": "https://otel.example.com:4317"})
    assert cfg.tracing.endpoint == "https://otel.example.com:4317"
    err = load_error(write(tmp_path, '[tracing]\nendpoint = "otel:4317"\n'), env={})
    assert err.key == "tracing.endpoint" and "http://127.0.0.1:4317" in str(err)
    err = load_error(None, env={"NEXUS_TRACING_SAMPLE_RATIO": "1.5"})
    assert err.key == "tracing.sample_ratio" and err.source == "NEXUS_TRACING_SAMPLE_RATIO"
