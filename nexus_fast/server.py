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
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc

import nexus_fast
from nexus_fast import errors, failpoints
from nexus_fast.about import versions
from nexus_fast.api import grpc_stuck
from nexus_fast.api.grpc_api import ControlService, NodeService, add_node_service
from nexus_fast.api.grpc_events import add_control_service
from nexus_fast.api.grpc_handlers import register
from nexus_fast.api.grpc_health import HealthServicer
from nexus_fast.api.http_server import HttpServer
from nexus_fast.api.listen import StartupError, bind, check_port_free, listen_error
from nexus_fast.api.node_stream import NodeStreams
from nexus_fast.api.ws_events import EventStreamProtocol
from nexus_fast.api.ws_server import WebSocketServer
from nexus_fast.cluster.relay import (
    FollowerRelay,
    RelayServicer,
    add_replica_service,
    replica_credentials,
)
from nexus_fast.codec.json import agent_to_dict, command_to_dict, node_to_dict
from nexus_fast.config import Config
from nexus_fast.core.agents import AgentService, AgentSettings
from nexus_fast.core.commands import CommandService, CommandSettings
from nexus_fast.core.events import EventBus
from nexus_fast.core.fleet import SchedulerFeed
from nexus_fast.core.nodes import STATUS_BY_NAME, NodeRegistry, NodeSettings, page_budget
from nexus_fast.core.periodic import Periodic
from nexus_fast.core.scheduler import Scheduler
from nexus_fast.errors import InvalidArgument
from nexus_fast.logs import get_logger
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.reload import ConfigReloader
from nexus_fast.security.audit_grpc import AuditInterceptor
from nexus_fast.security.auditing import Auditor
from nexus_fast.security.layer import OPEN_API_WARNING, SecurityLayer
from nexus_fast.security.tls import GrpcCertificates, TlsMaterial, server_ssl_context
from nexus_fast.store.base import StoreError
from nexus_fast.store.datafile import LOAD_ERRORS, DataFileError, crash_guard, damaged_hint
from nexus_fast.store.lmdb_store import LmdbStore
from nexus_fast.telemetry import metrics
from nexus_fast.telemetry import process as process_metrics

if TYPE_CHECKING:
    from nexus_fast.cluster.replica import ClusterReplica

log = get_logger("server")

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["NodeService"].full_name,
    pb.DESCRIPTOR.services_by_name["ControlService"].full_name,
)


# While gRPC drains in-flight calls, how often stop() ends node streams that calls
# accepted just before the stop opened late.
_SWEEP_INTERVAL_S = 0.05


class NexusServer:
    """One nexus-fast process."""

    def __init__(
        self,
        config: Config,
        config_file: str | None = None,
        overrides: Mapping[str, object] | None = None,
    ) -> None:
        self.config = config  # replaced as a whole by a hot reload (nexus_fast/reload.py)
        self.started_at = time.time()
        self._state = "starting"
        self._stop_requested = asyncio.Event()
        db = config.database
        local = LmdbStore(
            db.path,
            map_size=db.cache_size,
            max_map_size=db.max_map_size,
            sync_window=db.sync_interval,
        )
        # Cluster mode (docs/cluster.md): commits go through the replicated log in etcd.
        self.cluster: ClusterReplica | None = None
        self.store: Any = local
        if config.cluster.enabled:  # imported only then: the embedded default loads no etcd
            from nexus_fast.cluster.replica import ClusterReplica

            self.cluster = ClusterReplica(config, local)
            self.cluster.on_change = self._refresh_health
            self.store = self.cluster.store
        perf = config.performance
        page_bytes = page_budget(config.server.max_message_size)  # a list page fits a message
        self.nodes = NodeRegistry(
            self.store,
            NodeSettings(
                heartbeat_interval=perf.heartbeat_interval,
                node_timeout=perf.node_timeout,
                down_retention=perf.node_down_retention,
                max_batch_size=perf.max_batch_size,
                max_capacity=config.nodes.limits(),
                max_page_bytes=page_bytes,
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
                max_output_size=config.commands.max_output_size,
                max_page_bytes=page_bytes,
            ),
        )
        self.agents = AgentService(
            self.store,
            self.scheduler,
            self.commands,
            AgentSettings(
                max_spec_bytes=config.agents.max_spec_bytes,
                max_replicas=config.agents.max_replicas,
                max_page_bytes=page_bytes,
            ),
        )
        # Order matters: the scheduler must know a node before commands and agents react.
        self.nodes.listeners += [SchedulerFeed(self.scheduler), self.commands, self.agents]
        # ReplicaService.Relay (nexus_fast/cluster/relay.py): the leader side always (an
        # embedded server leads itself); in cluster mode a follower relays the node streams
        # it holds to the leader (the streams then survive a failover).
        streams = NodeStreams(self.nodes, self.commands, self.agents)
        self.relay: FollowerRelay | None = None
        if self.cluster is None:
            self._relay_servicer = RelayServicer(streams)
        else:
            cluster = self.cluster
            self._relay_servicer = RelayServicer(streams, is_leader=cluster.serving_core)
            relay = self.relay = FollowerRelay(
                lambda: cluster.election.leader_advertise or None,
                credentials=replica_credentials(config.security),
                is_follower=lambda: not cluster.serving_core(),
                max_message_bytes=config.server.max_message_size,
            )

            def changed() -> None:
                self._refresh_health()
                relay.leader_changed()

            cluster.on_change = changed
        # Loaded and attached to store.on_commit right after store.open(), before any commit.
        self.events = EventBus(self.store, config.events, perf.event_buffer_size)
        self._grpc: grpc.aio.Server | None = None
        # None when auth is off and no [security.limits] table enables limits: ports are open.
        self.security = SecurityLayer.from_config(config)
        if self.security is not None:
            self.nodes.listeners += self.security.node_listeners()
        self.auditor = Auditor(self.store)  # audits mutating calls with auth on or off
        if self.cluster is not None:
            self.auditor.read_only = lambda: not (self.cluster and self.cluster.serving_core())
        self._health = HealthServicer()
        self.grpc_port = 0
        self._ws: WebSocketServer | None = None
        self._http: HttpServer | None = None
        self._maintenance = Periodic("maintenance", self._maintain, log)
        self._backups = Periodic("backups", self._backup, log)
        self._health_tasks: set[asyncio.Task[None]] = set()
        # What a hot reload reconfigures besides the core's settings.
        self.tls_contexts: list[ssl.SSLContext] = []
        self.grpc_certificates: GrpcCertificates | None = None
        self.ws_protocol: EventStreamProtocol | None = None
        self.reloader = ConfigReloader(self, config_file, overrides)
        self._tracer: Any = None  # nexus_fast.telemetry.tracing.SpanTracer when [tracing] is on
        # nexus_db_cache_hit_rate reads the page-cache residency of this file's used part.
        process_metrics.PROCESS.data_file = lambda: (local.path / "data.mdb", local.size_bytes())

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

        data_file = f"{cfg.database.path}/data.mdb"
        if self.cluster is not None:
            try:
                await self.cluster.connect()
            except errors.Unavailable as exc:  # "etcd unavailable: ..." in one line
                raise StartupError(f"cluster: {exc}") from None
        # A damaged page can make LMDB read past the file (SIGBUS): one line and exit 1.
        with crash_guard(damaged_hint(f"{data_file}: reading it crashed", cfg.database.path)):
            try:
                await self.store.open()
            except DataFileError as exc:
                raise StartupError(damaged_hint(str(exc), cfg.database.path)) from None
            except StoreError as exc:
                raise StartupError(str(exc)) from None
            self.store.on_failure = self._on_store_failure
            try:
                self.events.load()
                self.store.on_commit = self.events.publish_committed
                if self.cluster is None:  # a replica loads its core when it leads
                    self._load_core()
            except LOAD_ERRORS as exc:  # a damaged record: one line naming the file, exit 1
                await self.store.close()
                where = f"{data_file}: cannot load its records: {exc!r}"
                raise StartupError(damaged_hint(where, cfg.database.path)) from None
        if cfg.tracing.enabled:  # the OpenTelemetry SDK is imported only when tracing is on
            from nexus_fast.telemetry import tracing

            self._tracer = tracing.start(cfg.tracing, self.commands.on_final)
        self.events.start_pruner(cfg.performance.pruning_interval)

        try:
            # Probe the ports first with plain sockets: grpc-core would print its own
            # multi-line complaint ("set GRPC_VERBOSITY=debug") for a port in use.
            for name, port in (
                ("grpc", cfg.server.grpc_port),
                ("websocket", cfg.server.websocket_port),
                ("http", cfg.server.http_port),
            ):
                await check_port_free(name, cfg.server.host, port)
            await self._start_grpc()
            self._ws = WebSocketServer(
                cfg.server.host,
                cfg.server.websocket_port,
                max_connections=cfg.server.max_connections,
                max_message_size=cfg.server.max_message_size,
                ssl_context=self._server_ssl_context(),
                on_message=self._guard_ws(self._ws_protocol()),
                admit=self.security.ws_admit if self.security else None,
                on_connect=self.security.ws_on_connect if self.security else None,
            )
            await bind("websocket", cfg.server.host, cfg.server.websocket_port, self._ws.start())
            self._http = HttpServer(
                cfg.server.host,
                cfg.server.http_port,
                self,
                metrics_enabled=cfg.monitoring.metrics_enabled,
                dashboard_enabled=cfg.monitoring.dashboard_enabled,
                ssl_context=self._server_ssl_context() if cfg.security.http_tls else None,
                middlewares=self.security.http_middlewares() if self.security else (),
                events=self.events,
                header_timeout=cfg.server.http_header_timeout,
                max_connections_per_ip=cfg.server.http_max_connections_per_ip,
            )
            await bind("http", cfg.server.host, cfg.server.http_port, self._http.start())
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
        if self.cluster is None:
            await self._system_event(
                "system.started", {"version": nexus_fast.__version__, "pid": os.getpid()}
            )
        tls = self.grpc_certificates.material if self.grpc_certificates else None
        self.reloader.start(tls)  # SIGHUP and config file changes reload from now on
        self._state = "ready"
        if self.security is None or not self.security.authenticating:
            # Once started: a start that fails says only why, in one line.
            log.warning(OPEN_API_WARNING)
        await self._set_grpc_health()
        log.info(
            "ready",
            extra={
                "grpc": f"{cfg.server.host}:{self.grpc_port}",
                "websocket": f"{cfg.server.host}:{cfg.server.websocket_port}",
                "http": f"{cfg.server.host}:{cfg.server.http_port}",
            },
        )
        if self.cluster is not None:  # serve first (followers serve), then campaign
            self.cluster.listen = {
                "grpc": f"{cfg.server.host}:{self.grpc_port}",
                "http": f"{cfg.server.host}:{cfg.server.http_port}",
                "ws": f"{cfg.server.host}:{cfg.server.websocket_port}",
            }
            await self.cluster.start(self._promote, self._demote)
            if self.relay is not None:
                self.relay.start()

    def _load_core(self) -> None:
        """Load nodes, commands and agents from the store and start their timers: at start,
        or (cluster mode) once this replica leads and has caught up with the log."""
        cfg = self.config
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

    async def _promote(self) -> None:
        """Cluster mode: this replica leads and caught up; act as after a restart."""
        with crash_guard(damaged_hint("reading the data file crashed", self.config.database.path)):
            self._load_core()
        await self._system_event(
            "system.started", {"version": nexus_fast.__version__, "pid": os.getpid()}
        )

    async def _demote(self) -> None:
        """Cluster mode, leadership lost: stop the core's timers and writes (then re-exec)."""
        await self.commands.halt()  # first: its synchronous start stops command writes
        await self._maintenance.stop()
        await self._backups.stop()
        await self.agents.stop()
        await self.nodes.stop(end_streams=False)

    async def _start_grpc(self) -> None:
        cfg = self.config
        size = cfg.server.max_message_size
        server = grpc.aio.server(
            # Audit first (outermost), so it sees the auth interceptor's refusals.
            interceptors=[
                AuditInterceptor(self.auditor),
                *(self.security.grpc_interceptors() if self.security else ()),
                # Cluster mode: after auth (the caller is known), a follower forwards.
                *((self.cluster.router,) if self.cluster is not None else ()),
            ],
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
        add_node_service(
            NodeService(self.nodes, self.commands, self.agents, limits, relay=self.relay), server
        )
        # Always served: followers relay their node streams to the leader (embedded: itself).
        add_replica_service(self._relay_servicer, server)
        add_control_service(
            ControlService(
                self.nodes,
                self.commands,
                self.agents,
                events=self.events,
                store=self.store,
                limits=limits,
                cluster_status=self.cluster.status if self.cluster is not None else None,
            ),
            server,
        )
        if self.cluster is not None:
            self.cluster.add_services(server)  # ReplicaService.FetchSnapshot (bootstrap)
        # Health and reflection are grpcio's servicers: registered like ours, so junk bytes
        # answer INVALID_ARGUMENT instead of UNKNOWN and a traceback.
        register(health_pb2_grpc.add_HealthServicer_to_server, self._health, server, guard=True)
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        register(
            reflection_pb2_grpc.add_ServerReflectionServicer_to_server,
            reflection.aio.ReflectionServicer(
                (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME)
            ),
            server,
            guard=True,
        )
        address = f"{cfg.server.host}:{cfg.server.grpc_port}"
        try:
            if cfg.security.tls_enabled:
                port = server.add_secure_port(address, self._grpc_credentials())
            else:
                port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise StartupError(
                listen_error("grpc", cfg.server.host, cfg.server.grpc_port, str(exc))
            ) from None
        if port == 0:
            raise StartupError(
                listen_error("grpc", cfg.server.host, cfg.server.grpc_port, "address in use?")
            )
        self.grpc_port = port
        grpc_stuck.watch.set_local_ports({port})
        await server.start()
        self._grpc = server

    def _grpc_credentials(self) -> grpc.ServerCredentials:
        # Dynamic: a reload hands the next handshake a new certificate.
        try:
            material = TlsMaterial.read(self.config.security)
        except ValueError as exc:  # a key that does not match its certificate: one line
            raise StartupError(f"cannot start: {exc}") from None
        self.grpc_certificates = GrpcCertificates(material)
        return self.grpc_certificates.credentials

    def _server_ssl_context(self) -> ssl.SSLContext | None:
        context = server_ssl_context(self.config.security)
        if context is not None:
            self.tls_contexts.append(context)  # a reload loads new certificates into it
        return context

    def _ws_protocol(self) -> EventStreamProtocol:
        self.ws_protocol = EventStreamProtocol(
            self.events,
            max_subscriptions=self.config.events.max_subscriptions,
            submit_commands=self.commands.submit if self.cluster is None else self._submit,
        )
        return self.ws_protocol

    async def _submit(self, specs: Any, actor: str, trace: Any) -> pb.SubmitCommandsResponse:
        """WebSocket submit in cluster mode: here when leading, else forwarded to the leader
        (LeaderElsewhere, an error frame, while none is elected)."""
        assert self.cluster is not None
        if self.cluster.serving_core():
            return await self.commands.submit(specs, actor, trace)
        return await self.cluster.channel.submit(list(specs), actor, trace)

    def _guard_ws(self, on_message: Any) -> Any:
        """The WebSocket op handler, behind the per-op permission check when auth is on."""
        guarded = self.security.ws_guard(on_message) if self.security else on_message
        return self.auditor.ws_guard(guarded)

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
        if self.cluster is not None:
            self.cluster.quiesce()  # from now on a lost lease is no reason to re-exec
        if failpoints.ACTIVE:
            failpoints.configure("")  # a paused writer or stream would hold the stop forever
        if self._http is not None:
            self._http.set_stopping()  # /ready answers "stopping" for the whole drain
        deadline = self.config.server.shutdown_timeout
        started = time.monotonic()
        # Seconds per phase, logged with "stopped": a slow stop names its slow step.
        phases: dict[str, float] = {}
        mark = started

        def done(phase: str) -> None:
            nonlocal mark
            now = time.monotonic()
            phases[phase] = round(now - mark, 3)
            mark = now

        await self.reloader.stop()
        await self._health.enter_graceful_shutdown()
        if was_ready and (self.cluster is None or self.cluster.serving_core()):
            await self._system_event("system.stopping", {"pid": os.getpid()})
        await self._maintenance.stop()
        await self._backups.stop()
        done("announce")
        grpc_stopped: asyncio.Task[None] | None = None
        if self._grpc is not None:
            # Refuse new RPCs BEFORE ending node streams. Ended nodes reconnect at once; when
            # gRPC still accepted calls, a node reconnecting while the phases below ran got
            # a fresh session nothing ended, and server.stop() waited for it the whole
            # grace (the full shutdown_timeout). In-flight calls keep the grace.
            grace = max(0.1, deadline - (time.monotonic() - started))
            grpc_stopped = asyncio.get_running_loop().create_task(self._grpc.stop(grace))
            await asyncio.sleep(0)  # the task's first step stops accepting calls
        # Relay streams end whole first: followers keep their nodes' streams for the next
        # leader instead of ending each node (what the sessions' ends below would do).
        self._relay_servicer.stop()
        if self.relay is not None:  # a follower's node streams end: nodes reconnect elsewhere
            await self.relay.stop()
        # End node streams (nodes reconnect to the next server), then let in-flight unary
        # calls finish within what is left of the deadline.
        await self.agents.stop()
        await self.commands.stop()
        await self.nodes.stop()
        done("core")
        # Watchers get a moment to deliver what was published, then end (UNAVAILABLE / 1001).
        await self.events.close(drain_timeout=min(1.0, deadline / 4))
        done("events")
        ws_stop = self._ws.stop(max(0.1, deadline / 2)) if self._ws is not None else None
        swept = (await asyncio.gather(_maybe(ws_stop), self._drain_grpc(grpc_stopped)))[1]
        done("listeners")
        if self._http is not None:
            await self._http.stop()
        done("http")
        await self.store.close()
        done("store")
        if self.cluster is not None:  # revokes the lease: another replica leads at once
            await self.cluster.stop()
            done("cluster")
        if self._tracer is not None:  # flush the last spans (the exporter blocks: a thread)
            from nexus_fast.telemetry import tracing

            await asyncio.get_running_loop().run_in_executor(None, tracing.stop, self._tracer)
            self._tracer = None
            done("tracing")
        self._state = "stopped"
        log.info(
            "stopped",
            extra={
                "seconds": round(time.monotonic() - started, 3),
                "phases": phases,
                "late_node_streams": swept,
            },
        )

    async def _drain_grpc(self, stopped: asyncio.Task[None] | None) -> int:
        """Wait for gRPC's stop; end node streams opened by calls accepted just before it.

        Returns how many such late streams were ended.
        """
        swept = 0
        while stopped is not None:
            finished, _ = await asyncio.wait({stopped}, timeout=_SWEEP_INTERVAL_S)
            if finished:
                stopped.result()
                break
            late = self.nodes.connected_count()
            if late:
                swept += late
                await self.nodes.stop()
        return swept

    def _on_store_failure(self, reason: str | None) -> None:
        """Store hook (loop): a failing store makes the server unhealthy until it clears."""
        metrics.DB_HEALTHY.set(0 if reason is not None else 1)
        if reason is not None:
            log.error("store failing: not ready until a write succeeds", extra={"reason": reason})
        else:
            log.warning("store works again: ready")
        self._refresh_health()

    def _refresh_health(self) -> None:
        task = asyncio.get_running_loop().create_task(self._set_grpc_health())
        self._health_tasks.add(task)
        task.add_done_callback(self._health_tasks.discard)

    async def _set_grpc_health(self) -> None:
        """gRPC health mirrors /ready: SERVING only while ready and the store works."""
        if self._state == "stopping" or self._state == "stopped":
            return  # enter_graceful_shutdown already said NOT_SERVING, for good
        serving = self.is_ready()
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if serving
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        for name in ("", *SERVICE_NAMES):
            await self._health.set(name, status)

    async def _system_event(self, event_type: str, data: dict[str, object]) -> None:
        try:
            await asyncio.wait_for(self.events.emit_system(event_type, data), 5.0)
        except Exception:
            log.exception("could not record a system event", extra={"type": event_type})

    # ------------------------------------------------------------ background

    async def _maintain(self) -> None:
        if self.cluster is None or self.cluster.serving_core():
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
        ready = self._state == "ready" and self.store.healthy()
        return ready and (self.cluster is None or self.cluster.ready())

    def is_live(self) -> bool:
        return self._state != "stopped" and self.store.healthy()

    def uptime(self) -> float:
        return time.time() - self.started_at

    def effective_config(self) -> dict[str, object]:
        return self.reloader.view()

    def health_detail(self) -> dict[str, object]:
        store_ok = self.store.healthy()
        components: dict[str, Any] = {
            "store": {
                "status": "ok" if store_ok else "failed",
                "reason": self.store.failure,
                **self.store.stat(),
            },
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
            "failpoints": failpoints.snapshot(),  # [] unless fault injection is on
            "components": components,
            "cluster": self.cluster.detail() if self.cluster else {"role": "standalone"},
        }

    def _require_core(self) -> None:
        """Cluster mode: HTTP reads of the core answer 503 naming the leader on a follower."""
        if self.cluster is not None:
            self.cluster.require_core()

    def refresh_metrics(self) -> None:
        metrics.UPTIME_SECONDS.set(self.uptime())
        healthy = self.store.healthy()
        metrics.DB_HEALTHY.set(1 if healthy else 0)
        if healthy:
            self.store.size_bytes()

    def list_nodes(
        self, statuses: list[str], labels: dict[str, str], limit: int, page_token: str
    ) -> tuple[list[dict[str, object]], str]:
        self._require_core()
        wanted = []
        for name in statuses:
            if name not in STATUS_BY_NAME:
                raise InvalidArgument("status", f"unknown node status {name!r}")
            wanted.append(STATUS_BY_NAME[name])
        # Core errors (a bad page token, a bad label) go through the one error table.
        nodes, token, _ = self.nodes.list_nodes(wanted, labels, limit, page_token)
        return [node_to_dict(n) for n in nodes], token

    def get_node(self, node_id: str) -> dict[str, object]:
        self._require_core()
        return node_to_dict(self.nodes.get(node_id))  # NodeNotFound answers 404 JSON

    def get_command(self, command_id: str) -> dict[str, object]:
        self._require_core()
        return command_to_dict(self.commands.get(command_id))

    def list_agents(
        self, name: str, states: list[str], limit: int, page_token: str
    ) -> tuple[list[dict[str, object]], str]:
        self._require_core()
        numbers = []
        for state in states:
            # The short name the JSON shows ("running") or the full one (AGENT_STATE_RUNNING).
            if not state.startswith("AGENT_STATE_"):
                state = "AGENT_STATE_" + state.upper()
            if state not in pb.AgentState.DESCRIPTOR.values_by_name:
                raise InvalidArgument("state", f"unknown agent state {state!r}")
            numbers.append(pb.AgentState.Value(state))
        agents, token = self.agents.list_agents(name, numbers, limit, page_token)
        return [agent_to_dict(a) for a in agents], token


async def _maybe(step: Any) -> None:
    if step is not None:
        await step


async def run(
    config: Config, config_file: str | None = None, overrides: Mapping[str, object] | None = None
) -> int:
    """Run a server until SIGTERM/SIGINT (SIGHUP reloads); returns the process exit code."""
    server = NexusServer(config, config_file, overrides)
    try:
        await server.start()
    except StartupError as exc:
        log.error(str(exc))
        return 1
    except OSError as exc:  # e.g. an unreadable TLS file: one line, not a traceback
        where = f" ({exc.filename})" if exc.filename else ""
        log.error(f"cannot start: {exc.strerror or exc}{where}")
        return 1
    await server.serve_until_stopped()
    return 0
