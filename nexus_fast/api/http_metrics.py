"""``/api/v1/metrics``, ``/api/v1/metrics/database``, ``/api/v1/metrics/performance``.

The figures of ``/metrics`` for a human without Prometheus: current values, per-second
rates and latency percentiles (seconds) over the last minute, read from the same registry
by :mod:`nexus_fast.telemetry.summary`, whose sampler task runs while the HTTP app does.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

import orjson
from aiohttp import web

from nexus_fast.telemetry import process
from nexus_fast.telemetry.summary import MetricsWindow, Reading, counts, header

__all__ = ["HttpMetrics"]

# Store operations the database answer breaks down (nexus_db_operations_total's labels).
_DB_OPERATIONS = ("commit", "get", "scan", "put", "delete", "grow", "backup")
_COMMANDS_PROCESSED = "nexus_commands_processed_total"
_SUBMIT_METHOD = "ControlService/SubmitCommands"


class _Backend(Protocol):
    def refresh_metrics(self) -> None: ...

    def health_detail(self) -> dict[str, object]: ...


def _json(obj: object) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json")


class HttpMetrics:
    """The three JSON routes and the sampler behind their rates."""

    def __init__(self, backend: _Backend, window: MetricsWindow | None = None) -> None:
        self.backend = backend
        self.window = window or MetricsWindow()
        self._sampler: asyncio.Task[None] | None = None

    def attach(self, app: web.Application) -> None:
        """Add the routes, and run the sampler from the app's start-up to its clean-up."""
        app.router.add_get("/api/v1/metrics", self.overview)
        app.router.add_get("/api/v1/metrics/database", self.database)
        app.router.add_get("/api/v1/metrics/performance", self.performance)
        app.on_startup.append(self._start)
        app.on_cleanup.append(self._stop)

    async def _start(self, app: web.Application) -> None:
        self._sampler = asyncio.get_running_loop().create_task(self.window.run())

    async def _stop(self, app: web.Application) -> None:
        task, self._sampler = self._sampler, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _reading(self) -> Reading:
        self.backend.refresh_metrics()  # uptime, db size, health: the gauges /metrics shows
        return self.window.report()

    # ------------------------------------------------------------ handlers

    async def overview(self, request: web.Request) -> web.Response:
        """Everything at a glance: process, fleet, commands, events, connections."""
        r = self._reading()
        now = r.now
        processed = now.by_label(_COMMANDS_PROCESSED, "status")
        body: dict[str, Any] = {
            **header(r),
            "uptime_seconds": round(now.get("nexus_uptime_seconds"), 3),
            "process": _process(now),
            "nodes": counts(now.by_label("nexus_nodes", "status")),
            "agents": counts(now.by_label("nexus_agents", "status")),
            "commands": {
                "queue_depth": int(now.get("nexus_command_queue_depth")),
                "processed_total": counts(processed),
                "processed_per_second": r.rate(_COMMANDS_PROCESSED),
                "retries_total": int(now.get("nexus_command_retries_total")),
                "submit_to_final_seconds": r.latency("nexus_command_submit_to_final_seconds"),
            },
            "events": _events(r),
            "connections": {
                "grpc_streams": int(now.get("nexus_grpc_connections_active")),
                "websocket": int(now.get("nexus_websocket_connections_active")),
            },
            "requests": {
                "grpc_per_second": r.rate("nexus_grpc_requests_total"),
                "http_per_second": r.rate("nexus_http_requests_total"),
                "node_messages_per_second": r.rate("nexus_node_messages_total"),
            },
            "database": {
                "size_bytes": int(now.get("nexus_db_size_bytes")),
                "healthy": bool(now.get("nexus_db_healthy")),
                "cache_hit_rate": round(now.get("nexus_db_cache_hit_rate"), 4),
                "commits_per_second": r.rate("nexus_db_operations_total", operation="commit"),
            },
        }
        return _json(body)

    async def database(self, request: web.Request) -> web.Response:
        """The store: size, map, entries, page-cache residency, operation rates and latency."""
        r = self._reading()
        store = dict(_store_detail(self.backend))
        rate, resident, checked = process.PROCESS.cache_hit_rate()
        operations = {}
        for op in _DB_OPERATIONS:
            total = r.now.get("nexus_db_operations_total", operation=op)
            if total:
                operations[op] = {
                    "total": int(total),
                    "per_second": r.rate("nexus_db_operations_total", operation=op),
                    "latency_seconds": r.latency(
                        "nexus_db_operation_duration_seconds", operation=op
                    ),
                }
        body = {
            **header(r),
            "healthy": bool(r.now.get("nexus_db_healthy")),
            "failure": store.get("failure"),
            "path": store.get("path"),
            "size_bytes": store.get("size_bytes", int(r.now.get("nexus_db_size_bytes"))),
            "map_size_bytes": store.get("map_size"),
            "max_map_size_bytes": store.get("max_map_size"),
            "entries": store.get("entries", {}),
            "readers": store.get("readers"),
            "pending_writes": store.get("pending_requests"),
            "transactions": store.get("txn_count"),
            "avg_requests_per_transaction": store.get("avg_batch_requests"),
            "last_event_index": store.get("last_event_index"),
            "cache": {
                "hit_rate": round(rate, 4),
                "resident_pages": resident,
                "checked_pages": checked,
                "definition": "share of the data file's used pages resident in the OS page "
                "cache (mincore); LMDB reads through its memory map and has no cache of its own",
            },
            "operations": operations,
        }
        return _json(body)

    async def performance(self, request: web.Request) -> web.Response:
        """Latency percentiles and throughput: commands, gRPC methods, events, process."""
        r = self._reading()
        processed = r.now.by_label(_COMMANDS_PROCESSED, "status")
        grpc: dict[str, Any] = {}
        for method in r.labels_of("nexus_grpc_request_duration_seconds_count", "method"):
            grpc[method] = {
                "per_second": _method_rate(r, method),
                # For streams (Connect, WatchEvents, WaitCommands): the stream's lifetime.
                "latency_seconds": r.latency("nexus_grpc_request_duration_seconds", method=method),
            }
        body = {
            **header(r),
            "process": _process(r.now),
            "commands": {
                "processed_per_second": r.rate(_COMMANDS_PROCESSED),
                "processed_per_second_by_state": r.rates_by(_COMMANDS_PROCESSED, "status"),
                "processed_total": int(sum(processed.values())),
                "submit_to_dispatch_seconds": r.latency("nexus_command_submit_to_dispatch_seconds"),
                "submit_to_final_seconds": r.latency("nexus_command_submit_to_final_seconds"),
                "submit_call_seconds": r.latency(
                    "nexus_grpc_request_duration_seconds", method=_SUBMIT_METHOD
                ),
            },
            "grpc": grpc,
            "events": {
                **_events(r),
                "subscriber_lag_events": r.latency("nexus_event_subscriber_lag_events"),
            },
            "database": {
                "commit_seconds": r.latency(
                    "nexus_db_operation_duration_seconds", operation="commit"
                ),
                "commits_per_second": r.rate("nexus_db_operations_total", operation="commit"),
            },
        }
        return _json(body)


def _method_rate(r: Reading, method: str) -> float:
    """Calls of one gRPC method per second (every status)."""
    now = sum(
        v
        for k, v in r.now.values.get("nexus_grpc_requests_total", {}).items()
        if ("method", method) in k
    )
    old = 0.0
    if r.then is not None:
        old = sum(
            v
            for k, v in r.then.values.get("nexus_grpc_requests_total", {}).items()
            if ("method", method) in k
        )
    return round(max(now - old, 0.0) / r.window_seconds, 3)


def _process(now: Any) -> dict[str, Any]:
    return {
        "memory_usage_bytes": int(now.get("nexus_memory_usage_bytes")),
        "cpu_usage_percent": round(now.get("nexus_cpu_usage_percent"), 2),
        "cpu_window_seconds": process.CPU_WINDOW_S,
        "open_fds": int(now.get("process_open_fds")),
    }


def _events(r: Reading) -> dict[str, Any]:
    return {
        "published_per_second": r.rate("nexus_events_published_total"),
        "delivered_per_second": r.rates_by("nexus_events_delivered_total", "transport"),
        "subscriptions": counts(r.now.by_label("nexus_event_subscriptions_active", "transport")),
    }


def _store_detail(backend: _Backend) -> dict[str, Any]:
    components = backend.health_detail().get("components")
    store = components.get("store") if isinstance(components, dict) else None
    return store if isinstance(store, dict) else {}
