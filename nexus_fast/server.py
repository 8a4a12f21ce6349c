"""The server process: wires the store, the core and the listeners on one loop.

Start order is store -> services -> listeners, and the server says ready
(``/ready`` 200, gRPC health SERVING) only after all of them are up. Stop order
is the reverse: not ready, stop accepting, end streams within the deadline,
flush the writer, close LMDB.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import nexus_fast
from nexus_fast.about import versions
from nexus_fast.api.grpc_api import ControlService, NodeService, add_node_service
from nexus_fast.api.grpc_events import add_control_service
from nexus_fast.api.http_server import HttpServer
from nexus_fast.api.ws_events import EventStreamProtocol
from nexus_fast.api.ws_server import WebSocketServer
from nexus_fast.codec.json import node_to_dict
from nexus_fast.config import Config
from nexus_fast.core.agents import AgentService
from nexus_fast.core.commands import CommandService, CommandSettings
from nexus_fast.core.events import EventBus
from nexus_fast.core.fleet import SchedulerFeed
from nexus_fast.core.nodes import STATUS_BY_NAME, NodeRegistry, NodeSettings
from nexus_fast.core.periodic import Periodic
from nexus_fast.core.scheduler import Scheduler
from nexus_fast.errors import NexusError
from nexus_fast.logs import get_logger
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.security.layer import OPEN_API_WARNING, SecurityLayer
from nexus_fast.security.tls import server_ssl_context
from nexus_fast.store.lmdb_store import LmdbStore
from nexus_fast.telemetry import metrics

log = get_logger("server")

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["NodeService"].full_name,
    pb.DESCRIPTOR.services_by_name["ControlService"].full_name,
)


class StartupError(Exception):
    """The server could not start (e.g. a port in use); the message says why."""


class NexusServer:
    """One nexus-fast process."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.started_at = time.time()
        self._state = "starting"
        self._stop_requested = asyncio.Event()
        db = config.database
        self.store = LmdbStore(
            db.path,
            map_size=db.cache_size,
            max_map_size=db.max_map_size,
            sync_window=db.sync_interval,
        )
        perf = config.performance
        self.nodes = NodeRegistry(
            self.store,
            NodeSettings(
                heartbeat_interval=perf.heartbeat_interval,
                node_timeout=perf.node_timeout,
                down_retention=perf.node_down_retention,
                max_batch_size=perf.max_batch_size,
            ),
        )
        self.scheduler = Scheduler(config.scheduler, perf.node_timeout)
        self.commands = CommandService(
            self.store,
            self.nodes,
            self.scheduler,
            CommandSettings(
                default_timeout=config.commands.default_timeout,
                default_max_attempts=config.commands.default_max_attempts,
                max_payload_size=config.commands.max_payload_size,
                final_retention=config.commands.final_retention,
                max_batch_size=perf.max_batch_size,
                queue_capacity=perf.command_queue_size,
            ),
        )
        self.agents = AgentService(self.store, self.scheduler, self.commands)
        # Order matters: the scheduler must know a node before commands and agents react.
        self.nodes.listeners += [SchedulerFeed(self.scheduler), self.commands, self.agents]
        # Loaded and attached to store.on_commit right after store.open(), before any commit.
        self.events = EventBus(self.store, config.events, perf.event_buffer_size)
        self._grpc: grpc.aio.Server | None = None
        # None when security.auth_required = false: nothing is installed, ports are open.
        self.security = SecurityLayer.from_config(config)
        if self.security is not None:
            self.nodes.listeners += self.security.node_listeners()
        self._health = health.aio.HealthServicer()
        self.grpc_port = 0
        self._ws: WebSocketServer | None = None
        self._http: HttpServer | None = None
        self._maintenance = Periodic("maintenance", self._maintain, log)
        self._backups = Periodic("backups", self._backup, log)

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        loop.set_default_executor(
            ThreadPoolExecutor(cfg.server.worker_threads, thread_name_prefix="nexus-worker")
        )
        metrics.VERSION_INFO.info(versions())
        log.info(
            "starting",
            extra={"version": nexus_fast.__version__, **nexus_fast.implementation()},
        )

        if self.security is None or not self.security.authenticating:
            log.warning(OPEN_API_WARNING)
        await self.store.open()
        self.events.load()
        self.store.on_commit = self.events.publish_committed
        loaded = self.nodes.load()
        commands = self.commands.load()
        agents = self.agents.load()
        log.info(
            "state loaded",
            extra={
                "nodes": loaded,
                "active_commands": commands,
                "agents": agents,
                "path": cfg.database.path,
            },
        )
        self.nodes.start(cfg.performance.pruning_interval)
        self.commands.start()
        self.agents.start()
        self.events.start_pruner(cfg.performance.pruning_interval)

        try:
            await self._start_grpc()
            self._ws = WebSocketServer(
                cfg.server.host,
                cfg.server.websocket_port,
                max_connections=cfg.server.max_connections,
                max_message_size=cfg.server.max_message_size,
                ssl_context=self._server_ssl_context(),
                on_message=self._guard_ws(
                    EventStreamProtocol(
                        self.events,
                        max_subscriptions=cfg.events.max_subscriptions,
                        submit_commands=self.commands.submit,
                    )
                ),
                admit=self.security.ws_admit if self.security else None,
                on_connect=self.security.ws_on_connect if self.security else None,
            )
            await _bind("websocket", cfg.server.websocket_port, self._ws.start())
            self._http = HttpServer(
                cfg.server.host,
                cfg.server.http_port,
                self,
                metrics_enabled=cfg.monitoring.metrics_enabled,
                dashboard_enabled=cfg.monitoring.dashboard_enabled,
                ssl_context=self._server_ssl_context() if cfg.security.http_tls else None,
                middlewares=self.security.http_middlewares() if self.security else (),
            )
            await _bind("http", cfg.server.http_port, self._http.start())
        except BaseException:
            await self.stop()
            raise

        if cfg.performance.gc_threshold:
            # Everything loaded so far lives as long as the process: keep it out of every
            # collection, and collect the young generation less often (see config.py).
            gc.collect()
            gc.freeze()
            _, gen1, gen2 = gc.get_threshold()
            gc.set_threshold(cfg.performance.gc_threshold, gen1, gen2)
        self._maintenance.start(cfg.monitoring.health_check_interval)
        if cfg.database.backup_interval > 0:
            self._backups.start(cfg.database.backup_interval)
        await self._system_event(
            "system.started", {"version": nexus_fast.__version__, "pid": os.getpid()}
        )
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._state = "ready"
        log.info(
            "ready",
            extra={
                "grpc": f"{cfg.server.host}:{self.grpc_port}",
                "websocket": f"{cfg.server.host}:{cfg.server.websocket_port}",
                "http": f"{cfg.server.host}:{cfg.server.http_port}",
            },
        )

    async def _start_grpc(self) -> None:
        cfg = self.config
        size = cfg.server.max_message_size
        server = grpc.aio.server(
            interceptors=self.security.grpc_interceptors() if self.security else None,
            options=[
                # grpc sets SO_REUSEPORT by default, which would let a second server
                # silently share the port instead of failing.
                ("grpc.so_reuseport", 0),
                ("grpc.max_receive_message_length", size),
                ("grpc.max_send_message_length", size),
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
            ],
        )
        limits = self.security.limits if self.security else None
        add_node_service(NodeService(self.nodes, self.commands, self.agents, limits), server)
        add_control_service(
            ControlService(self.nodes, self.commands, self.agents, events=self.events), server
        )
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        address = f"{cfg.server.host}:{cfg.server.grpc_port}"
        try:
            if cfg.security.tls_enabled:
                port = server.add_secure_port(address, self._grpc_credentials())
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise StartupError(f"grpc: cannot listen on {address}: {exc}") from None
        if port == 0:
            raise StartupError(f"grpc: cannot listen on {address}: address already in use?")
        self.grpc_port = port
        await server.start()
        self._grpc = server

    def _grpc_credentials(self) -> grpc.ServerCredentials:
        sec = self.config.security
        with open(sec.tls_key_file, "rb") as key, open(sec.tls_cert_file, "rb") as cert:
            pair = (key.read(), cert.read())
        root = None
        if sec.tls_ca_file:
            with open(sec.tls_ca_file, "rb") as ca:
                root = ca.read()
        return grpc.ssl_server_credentials(
            [pair], root_certificates=root, require_client_auth=root is not None
        )

    def _server_ssl_context(self) -> ssl.SSLContext | None:
        return server_ssl_context(self.config.security)

    def _guard_ws(self, on_message: Any) -> Any:
        """The WebSocket op handler, behind the per-op permission check when auth is on."""
        return self.security.ws_guard(on_message) if self.security else on_message

    def request_stop(self) -> None:
        self._stop_requested.set()

    async def serve_until_stopped(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        await self._stop_requested.wait()
        log.info(
            "stop requested; draining", extra={"deadline_s": self.config.server.shutdown_timeout}
        )
        await self.stop()

    async def stop(self) -> None:
        """Reverse of start; safe to call on a half-started server."""
        if self._state == "stopped":
            return
        was_ready = self._state == "ready"
        self._state = "stopping"
        deadline = self.config.server.shutdown_timeout
        started = time.monotonic()
        await self._health.enter_graceful_shutdown()
        if was_ready:
            await self._system_event("system.stopping", {"pid": os.getpid()})
        await self._maintenance.stop()
        await self._backups.stop()
        # End node streams first (nodes reconnect to the next server), then let
        # in-flight unary calls finish within what is left of the deadline.
        await self.agents.stop()
        await self.commands.stop()
        await self.nodes.stop()
        # Watchers get a moment to deliver what was published, then end (UNAVAILABLE / 1001).
        await self.events.close(drain_timeout=min(1.0, deadline / 4))
        if self._ws is not None:
            await self._ws.stop(max(0.1, deadline / 2))
        if self._grpc is not None:
            remaining = max(0.1, deadline - (time.monotonic() - started))
            await self._grpc.stop(remaining)
        if self._http is not None:
            await self._http.stop()
        await self.store.close()
        self._state = "stopped"
        log.info("stopped", extra={"seconds": round(time.monotonic() - started, 3)})

    async def _system_event(self, event_type: str, data: dict[str, object]) -> None:
        try:
            await asyncio.wait_for(self.events.emit_system(event_type, data), 5.0)
        except Exception:
            log.exception("could not record a system event", extra={"type": event_type})

    # ------------------------------------------------------------ background

    async def _maintain(self) -> None:
        await self.commands.prune_finished()
        loop = asyncio.get_running_loop()
        cleared = await loop.run_in_executor(None, self.store.reader_check)
        if cleared:
            log.warning("cleared stale LMDB readers", extra={"count": cleared})
        self.store.size_bytes()

    async def _backup(self) -> None:
        path = await self.store.backup(self.config.database.resolved_backup_path())
        log.info("backup written", extra={"path": str(path)})

    # ------------------------------------------------------------ HttpBackend

    def is_ready(self) -> bool:
        return self._state == "ready"

    def is_live(self) -> bool:
        return self._state != "stopped" and self.store.healthy()

    def uptime(self) -> float:
        return time.time() - self.started_at

    def health_detail(self) -> dict[str, object]:
        store_ok = self.store.healthy()
        components: dict[str, Any] = {
            "store": {"status": "ok" if store_ok else "failed", **self.store.stat()},
            "grpc": {
                "status": "ok" if self._grpc is not None else "down",
                "port": self.grpc_port,
                "connected_nodes": self.nodes.connected_count(),
            },
            "websocket": {
                "status": "ok" if self._ws is not None else "down",
                "port": self.config.server.websocket_port,
                "connections": self._ws.active_connections if self._ws else 0,
            },
            "nodes": {"status": "ok", "total": len(self.nodes), **self.nodes.status_counts()},
        }
        if not store_ok:
            status = "unhealthy"
        elif self._state != "ready":
            status = "degraded"
        else:
            status = "healthy"
        return {
            "status": status,
            "state": self._state,
            "version": nexus_fast.__version__,
            "uptime_seconds": round(self.uptime(), 3),
            "implementation": nexus_fast.implementation(),
            "gc": {"threshold": list(gc.get_threshold()), "frozen": gc.get_freeze_count()},
            "components": components,
        }

    def refresh_metrics(self) -> None:
        metrics.UPTIME_SECONDS.set(self.uptime())
        if self.store.healthy():
            self.store.size_bytes()

    def list_nodes(
        self, statuses: list[str], labels: dict[str, str], limit: int, page_token: str
    ) -> tuple[list[dict[str, object]], str]:
        wanted = []
        for name in statuses:
            if name not in STATUS_BY_NAME:
                raise ValueError(f"status: unknown node status {name!r}")
            wanted.append(STATUS_BY_NAME[name])
        try:
            nodes, token, _ = self.nodes.list_nodes(wanted, labels, limit, page_token)
        except NexusError as exc:
            raise ValueError(str(exc)) from None
        return [node_to_dict(n) for n in nodes], token

    def get_node(self, node_id: str) -> dict[str, object] | None:
        try:
            return node_to_dict(self.nodes.get(node_id))
        except NexusError:
            return None


async def _bind(name: str, port: int, starting: Any) -> None:
    try:
        await starting
    except OSError as exc:
        raise StartupError(f"{name}: cannot listen on port {port}: {exc.strerror or exc}") from None


async def run(config: Config) -> int:
    """Run a server until SIGTERM/SIGINT; returns the process exit code."""
    server = NexusServer(config)
    try:
        await server.start()
    except StartupError as exc:
        log.error(str(exc))
        return 1
    await server.serve_until_stopped()
    return 0
