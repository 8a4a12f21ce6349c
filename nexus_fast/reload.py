"""Hot reload: SIGHUP or a change of the config file re-reads the configuration.

The file is read and validated exactly as at start-up (file, then environment, then the
command line's flags); an invalid one is refused with the start-up's one-line error and the
running configuration stays. Of a valid one, the keys in :data:`LIVE_KEYS` take effect at
once (log level and format, limits and timeouts, scheduler weights, retention, RBAC, TLS
certificates); every other changed key needs a restart: they are named in one WARNING line
and keep their running values. Each accepted reload appends a ``config.reloaded`` system
event naming the changed keys (never values).

TLS certificates are re-read on every reload (SIGHUP after a rotation is enough, and the
certificate files are watched too): WSS and HTTPS load the new chain into their contexts,
gRPC hands it to its dynamic credentials, so each new handshake gets the new certificate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import weakref
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Final

from watchfiles import Change, awatch

from nexus_fast.config import Config, ConfigError, load_config
from nexus_fast.config_view import effective_config
from nexus_fast.logs import configure_logging, get_logger
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.security.layer import check_security
from nexus_fast.security.tls import TlsMaterial, reload_cert_chain

if TYPE_CHECKING:
    from nexus_fast.core.nodes import Session
    from nexus_fast.server import NexusServer

__all__ = ["LIVE_KEYS", "ConfigReloader", "apply_logging", "changed_keys", "classify", "merge"]

log = get_logger("config")

_TLS_FILES: Final = ("security.tls_cert_file", "security.tls_key_file", "security.tls_ca_file")
_NODE_KEYS: Final = ("performance.node_timeout", "performance.heartbeat_interval")

LIVE_KEYS: Final = frozenset(
    {
        "logging.level",
        "logging.format",
        "logging.file",
        "logging.file_rotation",
        "logging.max_file_size",
        "logging.max_files",
        "server.shutdown_timeout",
        "database.backup_path",
        *_NODE_KEYS,
        "performance.node_down_retention",
        "commands.default_timeout",
        "commands.default_max_attempts",
        "commands.max_payload_size",
        "commands.final_retention",
        "commands.max_output_size",
        "agents.max_spec_bytes",
        "agents.max_replicas",
        "nodes.max_cpu",
        "nodes.max_memory",
        "nodes.max_gpu",
        "nodes.max_disk",
        "scheduler.weight_least_allocated",
        "scheduler.weight_most_allocated",
        "scheduler.weight_balanced",
        "scheduler.weight_spread",
        "scheduler.weight_freshness",
        "events.retention_count",
        "events.retention_age",
        "events.bookmark_interval",
        "events.subscriber_buffer",
        "events.max_subscriptions",
        "security.rbac",
        "security.limits",  # when limits were on at start (else nothing charges them)
        *_TLS_FILES,  # when TLS was on at start, and mTLS neither turns on nor off
    }
)
"""Dotted keys a reload applies while the server runs; any other change needs a restart."""

# Editors save by writing a new file and renaming it; Kubernetes swaps a `..data` symlink.
_K8S_SWAP: Final = "..data"


def changed_keys(old: Config, new: Config) -> list[str]:
    """Dotted keys whose values differ between ``old`` and ``new``, in config order."""
    keys = []
    for section in dataclasses.fields(old):
        a, b = getattr(old, section.name), getattr(new, section.name)
        if not dataclasses.is_dataclass(a):
            continue  # sources
        for item in dataclasses.fields(a):
            if getattr(a, item.name) != getattr(b, item.name):
                keys.append(f"{section.name}.{item.name}")
    return keys


def classify(old: Config, new: Config, limits_live: bool) -> tuple[list[str], list[str]]:
    """The keys changed from ``old`` to ``new``: ``(applied now, need a restart)``.

    ``limits_live``: the server charges limits (they were on at start), so new ones apply.
    TLS files apply when TLS was on at start and mTLS is neither turned on nor off.
    """
    tls_live = old.security.tls_enabled and (
        bool(old.security.tls_ca_file) == bool(new.security.tls_ca_file)
    )
    live: list[str] = []
    restart: list[str] = []
    for key in changed_keys(old, new):
        ok = key in LIVE_KEYS
        if key == "security.limits":
            ok = limits_live
        elif key in _TLS_FILES:
            ok = tls_live
        (live if ok else restart).append(key)
    return live, restart


def apply_logging(config: Config) -> None:
    """Configure logging from ``[logging]``; a log file that cannot be opened is a ConfigError."""
    cfg = config.logging
    try:
        configure_logging(
            cfg.level,
            cfg.format,
            file=cfg.file,
            rotation=cfg.file_rotation,
            max_bytes=cfg.max_file_size,
            max_files=cfg.max_files,
        )
    except OSError as exc:
        source = config.sources.get("logging.file", "default")
        problem = f"cannot open it ({exc.strerror or exc})"
        raise ConfigError(
            "logging.file", cfg.file, "a writable file", source, problem=problem
        ) from None


def merge(old: Config, new: Config, live: list[str]) -> Config:
    """``old`` with the ``live`` keys taken from ``new`` (and their sources)."""
    per_section: dict[str, dict[str, Any]] = {}
    for key in live:
        section, _, name = key.partition(".")
        per_section.setdefault(section, {})[name] = getattr(getattr(new, section), name)
    sections = {
        f.name: dataclasses.replace(getattr(old, f.name), **per_section.get(f.name, {}))
        for f in dataclasses.fields(old)
        if f.name != "sources"
    }
    sources = dict(old.sources)
    for key in live:
        sources.pop(key, None)
        if key in new.sources:
            sources[key] = new.sources[key]
    return Config(**sections, sources=MappingProxyType(sources))


class _Sessions:
    """Node listener keeping the open Connect streams, to push a new NodeConfig to them."""

    def __init__(self) -> None:
        self.open: weakref.WeakValueDictionary[str, Session] = weakref.WeakValueDictionary()

    def session_opened(self, node: pb.Node, session: Session) -> None:
        self.open[node.id] = session

    def node_updated(self, node: pb.Node) -> None:
        """Not needed here."""

    def node_usage(self, node: pb.Node) -> None:
        """Not needed here."""

    def node_removed(self, node: pb.Node) -> None:
        self.open.pop(node.id, None)


class ConfigReloader:
    """Re-reads the configuration on SIGHUP and when a watched file changes."""

    def __init__(
        self,
        server: NexusServer,
        config_file: str | None,
        overrides: Mapping[str, object] | None = None,
    ) -> None:
        self._server = server
        self.config_file = config_file
        self._overrides = dict(overrides or {})
        self._lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[bool]] = set()
        self._tls: TlsMaterial | None = None
        self._sessions = _Sessions()
        server.nodes.listeners.append(self._sessions)
        self.reloads = 0
        # Changed in the file, still running with the old value until a restart.
        self.restart_pending: list[str] = []

    def view(self) -> dict[str, object]:
        """``GET /api/v1/config``: the running configuration and what awaits a restart."""
        return {
            **effective_config(self._server.config, self.config_file),
            "restart_pending": self.restart_pending,
        }

    # ------------------------------------------------------------ lifecycle

    def start(self, tls: TlsMaterial | None = None) -> None:
        """Handle SIGHUP and watch the config file (and the TLS files) from now on."""
        self._tls = tls
        loop = asyncio.get_running_loop()
        # Kept until the process exits: a SIGHUP while stopping is ignored, not fatal.
        loop.add_signal_handler(signal.SIGHUP, self._spawn, "SIGHUP")
        self._watcher = loop.create_task(self._watch(), name="config-watch")

    async def stop(self) -> None:
        """Stop watching; a reload under way finishes first."""
        self._stop.set()
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        async with self._lock:
            pass

    def _spawn(self, trigger: str) -> None:
        if self._stop.is_set():
            return
        task = asyncio.get_running_loop().create_task(self.reload(trigger))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _watched(self) -> set[str]:
        files = [self.config_file] if self.config_file else []
        sec = self._server.config.security
        if sec.tls_enabled:
            files += [p for p in (sec.tls_cert_file, sec.tls_key_file, sec.tls_ca_file) if p]
        return {os.path.abspath(f) for f in files}

    async def _watch(self) -> None:
        while not self._stop.is_set():
            targets = self._watched()
            if not targets:
                return
            # Watch the directories: a file replaced by a rename keeps being seen.
            dirs = sorted({os.path.dirname(t) for t in targets})

            def wanted(_: Change, path: str, targets: set[str] = targets) -> bool:
                return path in targets or Path(path).name == _K8S_SWAP

            try:
                async for _ in awatch(
                    *dirs, watch_filter=wanted, stop_event=self._stop, recursive=False, step=50
                ):
                    await self.reload("file change")
                    if self._watched() != targets:
                        break  # the TLS paths changed: watch the new ones
                else:
                    return
            except (OSError, RuntimeError) as exc:
                # A directory that vanished: SIGHUP still works; say so once.
                log.warning("cannot watch the config file; SIGHUP still reloads", extra={
                    "reason": str(exc)})  # fmt: skip
                return

    # ------------------------------------------------------------ reloading

    def _load(self) -> Config:
        config = load_config(self.config_file, overrides=self._overrides)
        check_security(config)
        return config

    async def reload(self, trigger: str) -> bool:
        """Re-read and apply the configuration; False when it was refused."""
        async with self._lock:
            try:
                return await self._reload(trigger)
            except Exception:  # a bug, not a bad file: say so, keep serving
                log.exception("config reload failed", extra={"trigger": trigger})
                return False

    async def _reload(self, trigger: str) -> bool:
        loop = asyncio.get_running_loop()
        try:
            new = await loop.run_in_executor(None, self._load)
        except ConfigError as exc:
            log.error(str(exc), extra={"trigger": trigger, "kept": "running configuration"})
            return False
        old = self._server.config
        security = self._server.security
        live, restart = classify(old, new, security is not None and security.limits is not None)
        merged = merge(old, new, live)
        material = None
        if merged.security.tls_enabled:
            try:
                material = await loop.run_in_executor(None, TlsMaterial.read, merged.security)
            except (OSError, ValueError) as exc:
                detail = (
                    f"{exc.strerror or exc} ({exc.filename})" if isinstance(exc, OSError) else exc
                )
                log.error(
                    f"invalid TLS material: {detail}",
                    extra={"trigger": trigger, "kept": "running configuration"},
                )
                return False
            if material != self._tls and not any(k in live for k in _TLS_FILES):
                live.append("security.tls_cert_file")  # same paths, new contents
        logging_changed = any(k.startswith("logging.") for k in live)
        try:
            if logging_changed:
                apply_logging(merged)  # first: a log file that cannot be opened is common
            if material is not None and material != self._tls:
                self._apply_tls(merged, material)
        except (ConfigError, OSError, ValueError) as exc:
            if logging_changed and not isinstance(exc, ConfigError):
                apply_logging(old)  # the TLS files changed under us: undo the new logging
            log.error(str(exc), extra={"trigger": trigger, "kept": "running configuration"})
            return False
        self._apply(merged, live)
        self.reloads += 1
        self.restart_pending = restart
        if restart:
            log.warning(
                "config keys need a restart; left as they were",
                extra={"keys": restart, "trigger": trigger},
            )
        log.info("config reloaded", extra={"trigger": trigger, "changed": live})
        data = {"trigger": trigger, "changed": live, "restart_required": restart}
        try:
            await asyncio.wait_for(self._server.events.emit_system("config.reloaded", data), 5.0)
        except Exception:
            log.exception("could not record config.reloaded")
        return True

    def _apply_tls(self, config: Config, material: TlsMaterial) -> None:
        """New handshakes on every port get ``material`` (open connections keep theirs)."""
        server = self._server
        for context in server.tls_contexts:
            reload_cert_chain(context, config.security)  # a few KB of PEM, read on the loop
        if server.grpc_certificates is not None:
            server.grpc_certificates.update(material)
        self._tls = material

    def _apply(self, config: Config, live: list[str]) -> None:
        """Hand the live keys to the components that use them (all on the loop, no awaits)."""
        server = self._server
        perf, sec = config.performance, config.security
        server.nodes.settings = dataclasses.replace(
            server.nodes.settings,
            heartbeat_interval=perf.heartbeat_interval,
            node_timeout=perf.node_timeout,
            down_retention=perf.node_down_retention,
            max_capacity=config.nodes.limits(),
        )
        cmd = config.commands
        server.commands.settings = dataclasses.replace(
            server.commands.settings,
            default_timeout=cmd.default_timeout,
            default_max_attempts=cmd.default_max_attempts,
            max_payload_size=cmd.max_payload_size,
            final_retention=cmd.final_retention,
            max_output_size=cmd.max_output_size,
        )
        server.agents.settings = dataclasses.replace(
            server.agents.settings,
            max_spec_bytes=config.agents.max_spec_bytes,
            max_replicas=config.agents.max_replicas,
        )
        server.scheduler.reconfigure(config.scheduler, perf.node_timeout)
        server.events.config = config.events
        server.events.subscriber_buffer = config.events.subscriber_buffer
        if server.ws_protocol is not None:
            server.ws_protocol.max_subscriptions = config.events.max_subscriptions
        if server.security is not None:
            if server.security.rbac is not None:
                server.security.rbac.reconfigure(sec.rbac)
            if server.security.limits is not None:
                server.security.limits.reconfigure(sec.limits)
        server.config = config
        if any(key in live for key in _NODE_KEYS):
            # Connected nodes heartbeat at the advised interval: tell them the new one.
            message = pb.ControlMessage(config=server.nodes.node_config())
            for session in list(self._sessions.open.values()):
                if not session.closed:
                    session.send(message)
