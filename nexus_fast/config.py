"""Configuration for nexus_fast: typed sections, TOML loading, env and flag overrides.

Precedence, highest first: ``overrides`` (CLI flags) > environment > TOML file > defaults.
Every value is validated at load time; any problem raises :class:`ConfigError` with a
one-line message naming the key, the offending value, where it came from and what was
expected. Durations are stored as float seconds and sizes as int bytes.

Constructing the dataclasses directly (e.g. in tests) bypasses validation on purpose, so
tests may use values such as port 0 that ``load_config`` rejects.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Final

from nexus_fast.cluster.config import ClusterConfig, check_cluster
from nexus_fast.config_spec import Spec as _Spec
from nexus_fast.config_spec import spec_field as _f
from nexus_fast.security.limits import LimitsConfig
from nexus_fast.security.rbac import RbacConfig, RbacError, RoleConfig, parse_rbac
from nexus_fast.units import (  # parsing lives there; re-exported here, where callers look
    GB,
    KB,
    MB,
    TB,
    format_duration,
    format_size,
    parse_duration,
    parse_size,
)

__all__ = [
    "ENV_OVERRIDES",
    "AgentsConfig",
    "ClusterConfig",
    "CommandsConfig",
    "Config",
    "ConfigError",
    "DatabaseConfig",
    "EventsConfig",
    "LimitsConfig",
    "LoggingConfig",
    "MonitoringConfig",
    "NodesConfig",
    "PerformanceConfig",
    "RbacConfig",
    "RoleConfig",
    "SchedulerConfig",
    "SecurityConfig",
    "ServerConfig",
    "TracingConfig",
    "format_duration",
    "format_size",
    "load_config",
    "parse_duration",
    "parse_size",
]

LOG_LEVELS: Final = ("debug", "info", "warning", "error", "critical")
LOG_FORMATS: Final = ("text", "json")
LOG_ROTATIONS: Final = ("size", "daily", "none")

# Sentinel for errors that have no single offending value (missing file, unknown section).
_NO_VALUE: Final = object()


class ConfigError(Exception):
    """Invalid configuration.

    Attributes:
        key: dotted key (``"server.grpc_port"``), section name, or config file path.
        value: the offending value as given (string for env vars), or None if not applicable.
        expected: what would have been accepted (for unknown keys: the closest known key).
        source: where the value came from (file path, env var name, ``"command line"``,
            ``"default"``), or None when the key is itself a file path.
        problem: set instead of "expected ..." for errors that are not about a value's shape
            (``"unknown key; did you mean 'server.grpc_port'?"``, ``"file not found"``).
    """

    def __init__(
        self,
        key: str,
        value: object,
        expected: str,
        source: str | None = None,
        *,
        problem: str | None = None,
    ) -> None:
        self.key = key
        self.value = None if value is _NO_VALUE else value
        self.expected = expected
        self.source = source
        self.problem = problem
        shown = "" if value is _NO_VALUE else f" = {_show(value)}"
        origin = f" (from {source})" if source else ""
        tail = problem or f"expected {expected}"
        super().__init__(f"invalid configuration: {key}{shown}{origin}: {tail}")


def _show(value: object) -> str:
    """Render a value for an error message on one line."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        # Quote only when needed so env values read naturally (grpc_port = 70000).
        if value == "" or any(c.isspace() for c in value) or '"' in value:
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
        return value
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class ServerConfig:
    """[server]: listeners and connection limits."""

    host: str = _f("127.0.0.1", "str")
    grpc_port: int = _f(50053, "port")
    websocket_port: int = _f(8081, "port")
    http_port: int = _f(8082, "port")
    max_connections: int = _f(10000, "int", min=1)
    worker_threads: int = _f(4, "int", min=1, max=256)
    # gRPC message length options are C ints, so the ceiling is 2GB - 1.
    max_message_size: int = _f(4 * MB, "size", min=KB, max=2 * GB - 1)
    shutdown_timeout: float = _f(10.0, "duration")
    # HTTP port: a connection must complete a request's headers this soon after connecting
    # or after its last response, and one address may hold this many connections at once.
    http_header_timeout: float = _f(10.0, "duration", positive=True)
    http_max_connections_per_ip: int = _f(256, "int", min=1)


@dataclass(frozen=True)
class DatabaseConfig:
    """[database]: LMDB storage."""

    path: str = _f("./data", "str")
    cache_size: int = _f(1 * GB, "size", min=MB)
    sync_interval: float = _f(0.0, "duration")
    backup_interval: float = _f(0.0, "duration")
    backup_path: str = _f("", "str")
    max_map_size: int = _f(64 * GB, "size", min=MB)

    def resolved_backup_path(self) -> Path:
        """Directory for backups: ``backup_path`` or ``<path>/backups`` when empty."""
        return Path(self.backup_path) if self.backup_path else Path(self.path) / "backups"


@dataclass(frozen=True)
class MonitoringConfig:
    """[monitoring]: metrics, dashboard and health checks."""

    metrics_enabled: bool = _f(True, "bool")
    dashboard_enabled: bool = _f(True, "bool")
    health_check_interval: float = _f(5.0, "duration", positive=True)


TLS_VERSIONS: Final = ("1.2", "1.3")
JWT_ALGORITHMS: Final = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256",
                         "ES256", "ES384", "EdDSA")  # fmt: skip


_DEFAULT_RBAC: Final = RbacConfig()  # frozen, so one shared default is safe
# No [security.limits] table: no limits (development, benchmarks). A table turns them on
# unless it says ``enabled = false``.
_DEFAULT_LIMITS: Final = LimitsConfig(enabled=False)


@dataclass(frozen=True)
class SecurityConfig:
    """[security]: TLS / mTLS, authentication and authorisation (docs/security.md).

    ``tls_ca_file`` set means clients must present certs on every TLS port.
    """

    tls_enabled: bool = _f(False, "bool")
    tls_cert_file: str = _f("", "str")
    tls_key_file: str = _f("", "str")
    tls_ca_file: str = _f("", "str")
    auth_token: str = _f("", "str")
    # Off: every port is open (development); start-up logs one WARNING saying so.
    auth_required: bool = _f(False, "bool")
    jwt_secret_file: str = _f("", "str")
    jwt_public_key_file: str = _f("", "str")
    # Empty: derived from the key (HS256 for a secret; RS256, ES256, EdDSA for a public key).
    jwt_algorithms: tuple[str, ...] = _f((), "strlist", choices=JWT_ALGORITHMS)
    jwt_issuer: str = _f("nexus-fast", "str")
    jwt_audience: str = _f("nexus-fast", "str")
    jwt_leeway: float = _f(30.0, "duration")
    http_tls: bool = _f(False, "bool")
    min_tls_version: str = _f("1.2", "enum", choices=TLS_VERSIONS)
    cipher_suites: str = _f("", "str")
    # Empty: only the server's own host:port (HTTP and WebSocket ports).
    allowed_origins: tuple[str, ...] = _f((), "strlist")
    # Empty: any Host header.
    allowed_hosts: tuple[str, ...] = _f((), "strlist")
    rbac: RbacConfig = _f(_DEFAULT_RBAC, "rbac")  # noqa: RUF009 (frozen dataclass)
    limits: LimitsConfig = _f(_DEFAULT_LIMITS, "limits")  # noqa: RUF009 (frozen dataclass)

    @property
    def mtls_enabled(self) -> bool:
        """True when TLS is on and a client CA is configured."""
        return self.tls_enabled and bool(self.tls_ca_file)


@dataclass(frozen=True)
class PerformanceConfig:
    """[performance]: queues, buffers and node liveness timing."""

    command_queue_size: int = _f(100000, "int", min=1)
    event_buffer_size: int = _f(65536, "int", min=1)
    pruning_interval: float = _f(1.0, "duration", positive=True)
    node_timeout: float = _f(30.0, "duration", positive=True)
    heartbeat_interval: float = _f(5.0, "duration", positive=True)
    node_down_retention: float = _f(86400.0, "duration")
    max_batch_size: int = _f(1000, "int", min=1)
    # Allocations between young-generation GC passes (Python's default is 700). The hot
    # paths allocate a few hundred objects per command, so the default ran a collection
    # every few commands; 0 keeps Python's setting.
    gc_threshold: int = _f(20000, "int", min=0)


@dataclass(frozen=True)
class LoggingConfig:
    """[logging]: level, line format, and an optional rotated file instead of stderr."""

    level: str = _f("info", "enum", choices=LOG_LEVELS)
    format: str = _f("text", "enum", choices=LOG_FORMATS)
    file: str = _f("", "str")  # empty: stderr
    file_rotation: str = _f("size", "enum", choices=LOG_ROTATIONS)
    max_file_size: int = _f(100 * MB, "size", min=KB)
    max_files: int = _f(5, "int", min=2, max=1000)  # the live file and its rotated copies


@dataclass(frozen=True)
class SchedulerConfig:
    """[scheduler]: weights of the scoring terms (see nexus_fast/core/scheduler.py)."""

    weight_least_allocated: float = _f(1.0, "float", min=0, max=100)
    weight_most_allocated: float = _f(0.0, "float", min=0, max=100)
    weight_balanced: float = _f(0.5, "float", min=0, max=100)
    weight_spread: float = _f(1.0, "float", min=0, max=100)
    weight_freshness: float = _f(0.1, "float", min=0, max=100)


@dataclass(frozen=True)
class CommandsConfig:
    """[commands]: defaults and limits for submitted commands."""

    default_timeout: float = _f(30.0, "duration", positive=True)
    default_max_attempts: int = _f(3, "int", min=1, max=100)
    max_payload_size: int = _f(1 * MB, "size", min=0, max=64 * MB)
    final_retention: float = _f(86400.0, "duration")
    # Node-reported output and error text are cut to this (the record says so): a node must
    # not be able to fill the store or push a record past the message limit.
    max_output_size: int = _f(64 * KB, "size", min=0, max=1 * MB)


@dataclass(frozen=True)
class AgentsConfig:
    """[agents]: limits of one DeployAgent."""

    # The spec is stored once per agent, so spec x replicas no longer multiplies in the store;
    # both still bound what one call may ask for.
    max_spec_bytes: int = _f(256 * KB, "size", min=0, max=1 * MB)
    max_replicas: int = _f(1000, "int", min=1, max=100_000)


@dataclass(frozen=True)
class NodesConfig:
    """[nodes]: the largest capacity a node may report at Register, per resource.

    A node claiming more (1e300 cpus) would win every untargeted placement; it is refused.
    """

    max_cpu: float = _f(4096.0, "float", min=0, max=1e9)
    max_memory: int = _f(64 * TB, "size", min=0)
    max_gpu: float = _f(1024.0, "float", min=0, max=1e9)
    max_disk: int = _f(1024 * TB, "size", min=0)

    def limits(self) -> dict[str, float]:
        """``{resource: most a node may report}``, as the node registry checks it."""
        return {
            "cpu": self.max_cpu,
            "memory": float(self.max_memory),
            "gpu": self.max_gpu,
            "disk": float(self.max_disk),
        }


@dataclass(frozen=True)
class EventsConfig:
    """[events]: the durable event log and live subscriptions."""

    retention_count: int = _f(1_000_000, "int", min=1)
    retention_age: float = _f(86400.0, "duration", positive=True)
    bookmark_interval: float = _f(5.0, "duration", positive=True)
    subscriber_buffer: int = _f(10_000, "int", min=1)
    max_subscriptions: int = _f(16, "int", min=1, max=1024)


@dataclass(frozen=True)
class TracingConfig:
    """[tracing]: OpenTelemetry spans of the command path over OTLP/gRPC (docs/tracing.md)."""

    enabled: bool = _f(False, "bool")
    endpoint: str = _f("http://127.0.0.1:4317", "str")  # http:// plaintext, https:// TLS
    sample_ratio: float = _f(0.01, "float", min=0, max=1)  # submissions without a traceparent
    service_name: str = _f("nexus-fast", "str")


_SECTIONS: Final[Mapping[str, type]] = MappingProxyType(
    {
        "server": ServerConfig,
        "database": DatabaseConfig,
        "monitoring": MonitoringConfig,
        "security": SecurityConfig,
        "performance": PerformanceConfig,
        "logging": LoggingConfig,
        "scheduler": SchedulerConfig,
        "commands": CommandsConfig,
        "events": EventsConfig,
        "agents": AgentsConfig,
        "nodes": NodesConfig,
        "tracing": TracingConfig,
        "cluster": ClusterConfig,
    }
)


@dataclass(frozen=True)
class Config:
    """Complete, validated configuration (build it with :func:`load_config`)."""

    server: ServerConfig = field(default_factory=ServerConfig)
    database: DatabaseConfig = field(default_factory=DatabaseConfig)
    monitoring: MonitoringConfig = field(default_factory=MonitoringConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    performance: PerformanceConfig = field(default_factory=PerformanceConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    commands: CommandsConfig = field(default_factory=CommandsConfig)
    events: EventsConfig = field(default_factory=EventsConfig)
    agents: AgentsConfig = field(default_factory=AgentsConfig)
    nodes: NodesConfig = field(default_factory=NodesConfig)
    tracing: TracingConfig = field(default_factory=TracingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    # Where each non-default dotted key came from; excluded from equality.
    sources: Mapping[str, str] = field(
        default_factory=lambda: MappingProxyType({}), compare=False, repr=False
    )

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-able ``{section: {key: value}}`` (seconds / bytes); auth_token is masked."""
        out: dict[str, dict[str, Any]] = {}
        for name in _SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        if out["security"]["auth_token"]:
            out["security"]["auth_token"] = "***"
        return out


def _field_specs(cls: type) -> dict[str, _Spec]:
    return {f.name: f.metadata["spec"] for f in dataclasses.fields(cls)}


_SPECS: Final[Mapping[str, Mapping[str, _Spec]]] = MappingProxyType(
    {name: _field_specs(cls) for name, cls in _SECTIONS.items()}
)
_ALL_KEYS: Final = tuple(f"{s}.{k}" for s, specs in _SPECS.items() for k in specs)

# Single source of truth for environment overrides (README is generated/checked from it).
ENV_OVERRIDES: Final[Mapping[str, str]] = MappingProxyType(
    {
        "NEXUS_HOST": "server.host",
        "NEXUS_GRPC_PORT": "server.grpc_port",
        "NEXUS_WS_PORT": "server.websocket_port",
        "NEXUS_HTTP_PORT": "server.http_port",
        "NEXUS_MAX_CONNECTIONS": "server.max_connections",
        "NEXUS_WORKER_THREADS": "server.worker_threads",
        "NEXUS_SHUTDOWN_TIMEOUT": "server.shutdown_timeout",
        "NEXUS_HTTP_HEADER_TIMEOUT": "server.http_header_timeout",
        "NEXUS_HTTP_MAX_CONNECTIONS_PER_IP": "server.http_max_connections_per_ip",
        "NEXUS_DB_PATH": "database.path",
        "NEXUS_DB_CACHE_SIZE": "database.cache_size",
        "NEXUS_DB_MAX_MAP_SIZE": "database.max_map_size",
        "NEXUS_TLS_ENABLED": "security.tls_enabled",
        "NEXUS_TLS_CERT_FILE": "security.tls_cert_file",
        "NEXUS_TLS_KEY_FILE": "security.tls_key_file",
        "NEXUS_TLS_CA_FILE": "security.tls_ca_file",
        "NEXUS_NODE_TIMEOUT": "performance.node_timeout",
        "NEXUS_HEARTBEAT_INTERVAL": "performance.heartbeat_interval",
        "NEXUS_PRUNING_INTERVAL": "performance.pruning_interval",
        "NEXUS_GC_THRESHOLD": "performance.gc_threshold",
        "NEXUS_LOG_LEVEL": "logging.level",
        "NEXUS_LOG_FORMAT": "logging.format",
        "NEXUS_LOG_FILE": "logging.file",
        "NEXUS_MAX_MESSAGE_SIZE": "server.max_message_size",
        "NEXUS_EVENT_BUFFER_SIZE": "performance.event_buffer_size",
        "NEXUS_EVENTS_RETENTION_COUNT": "events.retention_count",
        "NEXUS_EVENTS_RETENTION_AGE": "events.retention_age",
        "NEXUS_EVENTS_BOOKMARK_INTERVAL": "events.bookmark_interval",
        "NEXUS_EVENTS_SUBSCRIBER_BUFFER": "events.subscriber_buffer",
        "NEXUS_EVENTS_MAX_SUBSCRIPTIONS": "events.max_subscriptions",
        "NEXUS_TRACING_ENABLED": "tracing.enabled",
        "NEXUS_TRACING_ENDPOINT": "tracing.endpoint",
        "NEXUS_TRACING_SAMPLE_RATIO": "tracing.sample_ratio",
    }
)

_TRUE: Final = frozenset({"true", "1", "yes"})
_FALSE: Final = frozenset({"false", "0", "no"})
_FLAG_SOURCE: Final = "command line"


# --------------------------------------------------------------------------- conversion


def _convert(key: str, spec: _Spec, value: object, source: str, from_text: bool) -> Any:
    """Parse one raw value per its spec; ``from_text`` allows strings for typed fields."""

    def fail(expected: str | None = None) -> ConfigError:
        return ConfigError(key, value, expected or spec.expected(), source)

    kind = spec.kind
    if kind == "str":
        if not isinstance(value, str):
            raise fail()
        return value
    if kind == "strlist":
        items: list[object]
        if from_text and isinstance(value, str):
            items = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            raise fail()
        if not all(isinstance(item, str) and item for item in items):
            raise fail()
        if spec.choices and any(item not in spec.choices for item in items):
            raise fail()
        return tuple(items)
    if kind == "rbac":
        try:
            return parse_rbac(value)
        except RbacError as exc:
            where = f"{key}.{exc.key}" if exc.key else key
            if exc.guess is not None or exc.unknown:
                guess = exc.guess and f"{key}.{exc.guess}"
                raise _unknown("key", where, exc.value, source, guess) from None
            raise ConfigError(where, exc.value, exc.expected, source) from None
    if kind == "limits":
        if not isinstance(value, Mapping):
            raise fail()
        try:
            return LimitsConfig.from_mapping(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(key, _NO_VALUE, spec.expected(), source, problem=str(exc)) from None
    if kind == "enum":
        if not isinstance(value, str) or value.strip().lower() not in spec.choices:
            raise fail()
        return value.strip().lower()
    if kind == "bool":
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            text = value.strip().lower()
            if text in _TRUE or text in _FALSE:
                return text in _TRUE
        raise fail()
    if kind in ("int", "port"):
        parsed: int
        if isinstance(value, bool):
            raise fail()  # bool is an int subclass; `port = true` is a mistake.
        if isinstance(value, int):
            parsed = value
        elif from_text and isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            parsed = int(value)
        else:
            raise fail()
        lo, hi = (1, 65535) if kind == "port" else (spec.min, spec.max)
        if (lo is not None and parsed < lo) or (hi is not None and parsed > hi):
            raise fail()
        return parsed
    if kind == "float":
        number: float
        if isinstance(value, bool):
            raise fail()
        if isinstance(value, int | float):
            number = float(value)
        elif from_text and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise fail() from None
        else:
            raise fail()
        lo, hi = spec.min, spec.max
        if (
            not math.isfinite(number)
            or (lo is not None and number < lo)
            or (hi is not None and number > hi)
        ):
            raise fail()
        return number
    if kind == "duration":
        try:
            seconds = parse_duration(value)
        except (TypeError, ValueError):
            raise fail() from None
        if spec.positive and seconds <= 0:
            raise fail()
        return seconds
    if kind == "size":
        try:
            size = parse_size(value)
        except (TypeError, ValueError):
            raise fail() from None
        if (spec.min is not None and size < spec.min) or (spec.max is not None and size > spec.max):
            raise fail()
        return size
    raise AssertionError(f"unhandled kind {kind!r}")  # pragma: no cover


def _closest(word: str, candidates: list[str] | tuple[str, ...]) -> str | None:
    close = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return close[0] if close else None


def _unknown(what: str, key: str, value: object, source: str, guess: str | None) -> ConfigError:
    if guess is None:
        return ConfigError(key, value, f"a known {what}", source, problem=f"unknown {what}")
    hint = f"did you mean '{guess}'?"
    return ConfigError(key, value, hint, source, problem=f"unknown {what}; {hint}")


def _unknown_key(key: str, value: object, source: str) -> ConfigError:
    section, _, name = key.partition(".")
    # Prefer a near-miss within the named section, then fall back to any dotted key.
    local = _closest(name, list(_SPECS[section])) if section in _SPECS else None
    guess = f"{section}.{local}" if local else _closest(key, _ALL_KEYS)
    return _unknown("key", key, value, source, guess)


# --------------------------------------------------------------------------- loading


def _read_file(path: Path) -> dict[str, Any]:
    name = str(path)
    expected = "a readable UTF-8 TOML file"
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(name, _NO_VALUE, expected, problem="file not found") from None
    except OSError as exc:
        raise ConfigError(
            name, _NO_VALUE, expected, problem=f"unreadable ({exc.strerror})"
        ) from None
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(name, _NO_VALUE, expected, problem=f"not UTF-8 ({exc.reason})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(name, _NO_VALUE, expected, problem=f"invalid TOML ({exc})") from None


def _apply_file(
    data: Mapping[str, Any],
    source: str,
    values: dict[str, Any],
    sources: dict[str, str],
    raw: dict[str, object],
) -> None:
    for section, table in data.items():
        if section not in _SPECS:
            guess = _closest(section, list(_SPECS))
            raise _unknown("section", f"[{section}]", _NO_VALUE, source, guess and f"[{guess}]")
        if not isinstance(table, dict):
            raise ConfigError(section, table, f"a [{section}] table", source)
        for name, value in table.items():
            key = f"{section}.{name}"
            spec = _SPECS[section].get(name)
            if spec is None:
                raise _unknown_key(key, value, source)
            values[key] = _convert(key, spec, value, source, from_text=False)
            sources[key] = source
            raw[key] = value


def _spec_for(key: str) -> _Spec | None:
    section, _, name = key.partition(".")
    return _SPECS.get(section, {}).get(name)


def _check(cfg: Config, sources: Mapping[str, str], raw: Mapping[str, object]) -> None:
    """Cross-field and filesystem checks that a single value cannot express."""

    def err(key: str, expected: str) -> ConfigError:
        section, _, name = key.partition(".")
        parsed: Any = getattr(getattr(cfg, section), name)
        kind = _SPECS[section][name].kind
        value: object = parsed
        if key in raw:
            value = raw[key]  # Show what the user wrote ("1m"), not the parsed 60.0.
        elif kind == "duration":
            value = format_duration(parsed)
        elif kind == "size":
            value = format_size(parsed)
        return ConfigError(key, value, expected, sources.get(key, "default"))

    srv, db, perf, sec = cfg.server, cfg.database, cfg.performance, cfg.security
    if not srv.host.strip():
        raise err("server.host", "a non-empty host name or address")
    ports = {"server.grpc_port": srv.grpc_port}
    for key, port in (("server.websocket_port", srv.websocket_port),
                      ("server.http_port", srv.http_port)):  # fmt: skip
        for other, used in ports.items():
            if port == used:
                raise err(key, f"a port different from {other} ({used})")
        ports[key] = port
    if not db.path.strip():
        raise err("database.path", "a non-empty directory path")
    if db.max_map_size < db.cache_size:
        raise err(
            "database.max_map_size",
            f"a size >= database.cache_size ({format_size(db.cache_size)})",
        )
    size = perf.event_buffer_size
    if size & (size - 1):
        raise err("performance.event_buffer_size", "a power of two (e.g. 65536)")
    if perf.heartbeat_interval >= perf.node_timeout:
        raise err(
            "performance.heartbeat_interval",
            "a duration shorter than performance.node_timeout "
            f"({format_duration(perf.node_timeout)})",
        )
    if sec.tls_enabled:
        for key in ("security.tls_cert_file", "security.tls_key_file"):
            path = getattr(sec, key.partition(".")[2])
            if not path:
                raise err(key, "a file path (required when security.tls_enabled = true)")
            if not Path(path).is_file():
                raise err(key, "an existing file (required when security.tls_enabled = true)")
        if sec.tls_ca_file and not Path(sec.tls_ca_file).is_file():
            raise err("security.tls_ca_file", "an existing file (or empty to disable mTLS)")
    elif sec.tls_ca_file:
        # A client CA without TLS would silently leave mTLS off; refuse instead.
        raise err("security.tls_ca_file", "empty unless security.tls_enabled = true")
    if sec.http_tls and not sec.tls_enabled:
        raise err("security.http_tls", "false unless security.tls_enabled = true")
    for key in ("security.jwt_secret_file", "security.jwt_public_key_file"):
        path = getattr(sec, key.partition(".")[2])
        if path and not Path(path).is_file():
            raise err(key, "an existing file (or empty)")
    hmac = [a for a in sec.jwt_algorithms if a.startswith("HS")]
    if hmac and not sec.jwt_secret_file:
        raise err("security.jwt_algorithms", f"no {hmac[0]} unless security.jwt_secret_file is set")
    public = [a for a in sec.jwt_algorithms if not a.startswith("HS")]
    if public and not sec.jwt_public_key_file:
        raise err(
            "security.jwt_algorithms", f"no {public[0]} unless security.jwt_public_key_file is set"
        )
    fixed = {"admin", "node", "replica"}
    for role in sec.rbac.roles:
        if role.name in fixed:
            raise err("security.rbac", f"no [[security.rbac.roles]] named {role.name!r} (built in)")
    known = {"admin", "operator", "viewer", "node", "replica", *(r.name for r in sec.rbac.roles)}
    if sec.rbac.default_role and sec.rbac.default_role not in known:
        raise err("security.rbac", f"default_role among {', '.join(sorted(known))}")
    if not re.fullmatch(r"https?://[^/\s]+/?", cfg.tracing.endpoint):
        raise err("tracing.endpoint", "an OTLP/gRPC URL like http://127.0.0.1:4317")
    limits = sec.limits
    if limits.enabled and limits.max_ws_connections >= srv.max_connections:
        # Else one principal at its cap holds every connection the server accepts.
        raise ConfigError(
            "security.limits.max_ws_connections",
            limits.max_ws_connections,
            f"an integer < server.max_connections ({srv.max_connections})",
            sources.get("security.limits", "default"),
        )
    check_cluster(cfg.cluster, err)


def load_config(
    path: str | Path | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, object] | None = None,
) -> Config:
    """Load and validate configuration.

    Args:
        path: TOML file; None means defaults only. A missing file is an error.
        env: environment (defaults to ``os.environ``); only names in ENV_OVERRIDES are read,
            so unrelated ``NEXUS_*`` variables are ignored.
        overrides: dotted keys (``"server.grpc_port"``) from CLI flags; None values are
            skipped so unset argparse options can be passed through directly. Strings are
            parsed like env values.

    Raises:
        ConfigError: on the first invalid value, unknown key/section, unreadable or
            malformed file, or failed cross-field check.
    """
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    raw: dict[str, object] = {}
    if path is not None:
        file_path = Path(path)
        _apply_file(_read_file(file_path), str(file_path), values, sources, raw)

    environ = os.environ if env is None else env
    for var, key in ENV_OVERRIDES.items():
        if var in environ:
            spec = _spec_for(key)
            assert spec is not None, key  # ENV_OVERRIDES is checked by tests
            values[key] = _convert(key, spec, environ[var], var, from_text=True)
            sources[key] = var
            raw[key] = environ[var]

    for key, value in (overrides or {}).items():
        if value is None:
            continue
        spec = _spec_for(key)
        if spec is None:
            raise _unknown_key(key, value, _FLAG_SOURCE)
        values[key] = _convert(key, spec, value, _FLAG_SOURCE, from_text=True)
        sources[key] = _FLAG_SOURCE
        raw[key] = value

    per_section: dict[str, dict[str, Any]] = {name: {} for name in _SECTIONS}
    for key, value in values.items():
        section, _, name = key.partition(".")
        per_section[section][name] = value
    cfg = Config(
        **{name: cls(**per_section[name]) for name, cls in _SECTIONS.items()},
        sources=MappingProxyType(dict(sources)),
    )
    _check(cfg, sources, raw)
    return cfg
