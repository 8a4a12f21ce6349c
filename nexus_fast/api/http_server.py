"""HTTP adapter: health probes, Prometheus metrics, the read-only JSON API and the dashboard.

Runs aiohttp's low-level server (``web.Application`` + ``AppRunner`` + ``TCPSite``) on the
process's one event loop; no threads. It only translates: every answer comes from the
:class:`HttpBackend` the server is built with.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from ssl import SSLContext
from typing import Any, Final, Protocol

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from multidict import MultiMapping
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from nexus_fast.api import bad_input
from nexus_fast.api.http_events import HttpEvents
from nexus_fast.api.http_guard import ConnectionCap, handler_options
from nexus_fast.api.http_metrics import HttpMetrics
from nexus_fast.api.status import error_code, http_headers, http_status
from nexus_fast.core.events import EventBus
from nexus_fast.errors import InvalidArgument, NexusError
from nexus_fast.telemetry import metrics
from nexus_fast.telemetry.trace_context import note_trace_id

__all__ = [
    "DEFAULT_NODE_LIMIT",
    "MAX_NODE_LIMIT",
    "SERVER_HEADER",
    "HttpBackend",
    "HttpServer",
]

logger = logging.getLogger("nexus.http")

SERVER_HEADER: Final = "nexus-fast"
# Page size when the client names none, and the cap (bounded responses).
DEFAULT_NODE_LIMIT: Final = 100
MAX_NODE_LIMIT: Final = 1000
# Seconds stop() lets in-flight requests finish before closing their connections.
_SHUTDOWN_TIMEOUT: Final = 3.0
# Path label for requests that matched no route (bounded cardinality for scanners).
_UNMATCHED: Final = "<unmatched>"
_NODE_QUERY_PARAMS: Final = frozenset({"status", "label", "limit", "page_token"})
_JSON: Final = "application/json"
# The dashboard is a page, an ES module and a stylesheet from this origin; it only fetches
# JSON and the event stream from this origin too. Nothing inline, no images, no frames.
_DASHBOARD_CSP: Final = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# Files of the dashboard besides the page (package data next to this module).
_DASHBOARD_ASSETS: Final = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
}
_AGENT_QUERY_PARAMS: Final = frozenset({"name", "state", "limit", "page_token"})

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CAMEL: Final = re.compile(r"(?<!^)(?=[A-Z])")


class _PeerErrorLogger(logging.LoggerAdapter[logging.Logger]):
    """Logger for aiohttp's protocol layer (``RequestHandler``).

    aiohttp answers a request it cannot parse (bad request line, bad or oversize header,
    bad Content-Length) with 400 itself, before any middleware, and logs it with a
    traceback at ERROR. That is the peer's fault, not ours: count it and log one WARNING
    per peer a minute (:mod:`.bad_input`). Anything else keeps its level and traceback.
    """

    def exception(self, msg: object, *args: object, **kwargs: Any) -> None:
        """Bad requests are reported; real errors are logged with their traceback."""
        if not _report_bad_request(args, kwargs):
            kwargs.setdefault("exc_info", True)
            super().error(msg, *args, **kwargs)

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        """aiohttp logs a bad method on a connection's first request at DEBUG: count it too."""
        if not _report_bad_request(args, kwargs):
            super().debug(msg, *args, **kwargs)


def _report_bad_request(args: tuple[object, ...], kwargs: dict[str, Any]) -> bool:
    exc = kwargs.get("exc_info")
    if not isinstance(exc, HttpProcessingError):
        return False
    peer = str(args[0]) if args else ""
    reason = _CAMEL.sub("_", type(exc).__name__).lower()  # a bounded set: aiohttp's classes
    detail = (exc.message or "").strip().splitlines()
    bad_input.report("http", reason, peer, f"{exc.code} {detail[0][:200] if detail else reason}")
    return True


class HttpBackend(Protocol):
    """What the HTTP adapter needs from the core; the lead's server object provides it."""

    def is_ready(self) -> bool:
        """True when the server accepts work (store open, listeners up, not draining)."""
        ...

    def is_live(self) -> bool:
        """True while the process is healthy enough not to be restarted."""
        ...

    def health_detail(self) -> dict[str, object]:
        """``{"status": "healthy"|"degraded"|"unhealthy", "version", "uptime_seconds",
        "implementation": {...}, "components": {"store": {"status": "ok", ...},
        "grpc": {...}, "websocket": {...}}}``."""
        ...

    def refresh_metrics(self) -> None:
        """Update gauges (uptime, db size, node counts) right before /metrics renders."""
        ...

    def list_nodes(
        self, statuses: list[str], labels: dict[str, str], limit: int, page_token: str
    ) -> tuple[list[dict[str, object]], str]:
        """One page of nodes as JSON-able dicts and the next page token ("" at the end).

        Raises InvalidArgument naming the field on a bad filter or token (any NexusError is
        answered through the error table, ``nexus_fast.api.status``).
        """
        ...

    def get_node(self, node_id: str) -> dict[str, object]:
        """One node as a JSON-able dict; raises NodeNotFound if unknown."""
        ...

    def get_command(self, command_id: str) -> dict[str, object]:
        """One command record as a JSON-able dict (``command_to_dict``).

        Raises NotFound (404) or InvalidArgument (400) through the error table.
        """
        ...

    def list_agents(
        self, name: str, states: list[str], limit: int, page_token: str
    ) -> tuple[list[dict[str, object]], str]:
        """One page of agent replicas (``agent_to_dict``) in id order and the next token.

        ``states`` are ``AgentState`` names, short (``running``) or full; raises
        InvalidArgument on an unknown one.
        """
        ...

    def effective_config(self) -> dict[str, object]:
        """The running configuration, secrets redacted, each value with its source."""
        ...


class _BadParameter(Exception):
    """A query parameter is invalid; ``parameter`` names it."""

    def __init__(self, parameter: str, message: str) -> None:
        super().__init__(message)
        self.parameter = parameter


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type=_JSON)


def _error(status: int, code: str, message: str, parameter: str | None = None) -> web.Response:
    error: dict[str, str] = {"code": code, "message": message}
    if parameter is not None:
        error["parameter"] = parameter
    return _json({"error": error}, status)


# HTTP status -> stable error code in JSON error bodies.
_ERROR_CODES: Final = {
    400: "invalid_argument",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    500: "internal",
    503: "unavailable",
}


def _route_template(request: web.Request) -> str:
    """The matched route's template (``/api/v1/nodes/{node_id}``), never the raw path."""
    resource = request.match_info.route.resource
    if resource is None:
        return _UNMATCHED
    return resource.canonical


def _single(query: MultiMapping[str], name: str) -> str | None:
    values = query.getall(name, [])
    if len(values) > 1:
        raise _BadParameter(name, f"'{name}' may be given only once")
    return values[0] if values else None


def _parse_node_query(
    query: MultiMapping[str],
) -> tuple[list[str], dict[str, str], int, str]:
    """Validate ``status``, ``label``, ``limit`` and ``page_token`` for /api/v1/nodes."""
    for name in query:
        if name not in _NODE_QUERY_PARAMS:
            raise _BadParameter(
                name,
                f"unknown query parameter {name!r} "
                f"(expected one of: {', '.join(sorted(_NODE_QUERY_PARAMS))})",
            )
    statuses: list[str] = []
    for value in query.getall("status", []):
        # Both ?status=a&status=b and ?status=a,b work.
        for raw in value.split(","):
            item = raw.strip()
            if not item:
                raise _BadParameter("status", "'status' must not be empty")
            if item not in statuses:
                statuses.append(item)
    labels: dict[str, str] = {}
    for value in query.getall("label", []):
        key, sep, label_value = value.partition("=")
        key = key.strip()
        if not sep or not key:
            raise _BadParameter("label", f"'label' must be key=value, got {value!r}")
        if key in labels and labels[key] != label_value:
            raise _BadParameter("label", f"label {key!r} given twice with different values")
        labels[key] = label_value
    limit = DEFAULT_NODE_LIMIT
    raw_limit = _single(query, "limit")
    if raw_limit is not None:
        try:
            limit = int(raw_limit)
        except ValueError:
            raise _BadParameter("limit", f"'limit' must be an integer, got {raw_limit!r}") from None
        if not 1 <= limit <= MAX_NODE_LIMIT:
            raise _BadParameter("limit", f"'limit' must be between 1 and {MAX_NODE_LIMIT}")
    page_token = _single(query, "page_token") or ""
    return statuses, labels, limit, page_token


class HttpServer:
    """The HTTP port: probes, /metrics, /api/v1 and the dashboard, on the running loop."""

    def __init__(
        self,
        host: str,
        port: int,
        backend: HttpBackend,
        *,
        metrics_enabled: bool = True,
        dashboard_enabled: bool = True,
        ssl_context: SSLContext | None = None,
        events: EventBus | None = None,
        middlewares: Sequence[Any] = (),
        header_timeout: float = 10.0,
        max_connections_per_ip: int = 256,
    ) -> None:
        self.host = host
        self.events = HttpEvents(events) if events is not None else None
        self.backend = backend
        self.metrics_enabled = metrics_enabled
        self.dashboard_enabled = dashboard_enabled
        self._requested_port = port
        self._ssl_context = ssl_context
        # Run inside _middleware, so their answers get the same headers and metrics.
        self._middlewares = tuple(middlewares)
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._dashboard: bytes | None = None
        self._assets: dict[str, bytes] = {}
        self._stopping = False
        self._header_timeout = header_timeout
        self._connection_cap = ConnectionCap(max_connections_per_ip)

    @property
    def port(self) -> int:
        """The bound port (the real one when constructed with port 0)."""
        if self._runner is not None:
            for address in self._runner.addresses:
                if isinstance(address, tuple):
                    return int(address[1])
        return self._requested_port

    def set_stopping(self) -> None:
        """Make a not-ready /ready say "stopping" instead of "starting" (drain has begun)."""
        self._stopping = True

    async def start(self) -> None:
        """Bind and serve; raises OSError with a clear message if the port is taken."""
        if self._runner is not None:
            raise RuntimeError("HttpServer already started")
        if self.dashboard_enabled:
            self._dashboard = _load_dashboard()
            self._assets = _load_assets()
        runner = web.AppRunner(
            self._build_app(),
            # Probes and scrapes every few seconds would drown the log; requests are counted.
            access_log=None,
            shutdown_timeout=_SHUTDOWN_TIMEOUT,
            logger=_PeerErrorLogger(logging.getLogger("nexus.http.aiohttp"), {}),
            **handler_options(self._header_timeout),
        )
        await runner.setup()
        assert runner.server is not None
        self._connection_cap.install(runner.server)
        site = web.TCPSite(runner, self.host, self._requested_port, ssl_context=self._ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(
                exc.errno,
                f"cannot listen for HTTP on {self.host}:{self._requested_port}: "
                f"{exc.strerror or exc}",
            ) from exc
        self._runner = runner
        self._site = site
        scheme = "https" if self._ssl_context is not None else "http"
        logger.info("http listening on %s://%s:%d", scheme, self.host, self.port)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish briefly, close everything."""
        self._stopping = True
        runner, self._runner, self._site = self._runner, None, None
        if runner is not None:
            await runner.cleanup()

    # --- app ------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware, *self._middlewares])
        app.on_response_prepare.append(_set_common_headers)
        router = app.router
        router.add_get("/health", self._health)
        router.add_get("/health/detailed", self._health_detailed)
        router.add_get("/ready", self._ready)
        router.add_get("/live", self._live)
        router.add_get("/metrics", self._metrics)
        if self.metrics_enabled:  # /api/v1/metrics[/database|/performance] and their sampler
            HttpMetrics(self.backend).attach(app)
        router.add_get("/api/v1/nodes", self._list_nodes)
        router.add_get("/api/v1/nodes/{node_id}", self._get_node)
        router.add_get("/api/v1/commands/{command_id}", self._get_command)
        router.add_get("/api/v1/agents", self._list_agents)
        router.add_get("/api/v1/config", self._config)
        if self.events is not None:
            router.add_get("/api/v1/events", self.events.page)
            router.add_get("/api/v1/events/stream", self.events.stream)
            app.on_shutdown.append(self.events.close)
        router.add_get("/dashboard/{asset}", self._dashboard_asset)
        router.add_get("/", self._dashboard_page)
        router.add_get("/dashboard", self._dashboard_page)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request, handler: _Handler) -> web.StreamResponse:
        """JSON for every error, one count per request by route template and status."""
        note_trace_id(request.headers.get("traceparent"))  # log lines carry the trace id
        try:
            response = await handler(request)
        except web.HTTPException as exc:
            # aiohttp's own 404/405 (and any raised HTTP error): same JSON shape as ours.
            code = _ERROR_CODES.get(exc.status, "error")
            message = exc.reason
            if exc.status == 404:
                message = f"no route for {request.path!r}"
            elif exc.status == 405:
                message = f"method {request.method} not allowed for {request.path!r}"
            response = _error(exc.status, code, message)
            allow = exc.headers.get("Allow")
            if allow is not None:
                response.headers["Allow"] = allow
        except NexusError as exc:
            # A core error: status and code from the one table, like gRPC and WebSocket.
            field = exc.field if isinstance(exc, InvalidArgument) else None
            response = _error(http_status(exc), error_code(exc), str(exc), field)
            response.headers.update(http_headers(exc))
        except Exception:
            logger.exception("http handler failed: %s %s", request.method, request.path)
            response = _error(500, "internal", "internal server error")
        metrics.HTTP_REQUESTS.labels(
            path=_route_template(request), status=str(response.status)
        ).inc()
        return response

    # --- handlers -------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        if self.backend.is_live():
            return _json({"status": "healthy"})
        return _json({"status": "unhealthy"}, 503)

    async def _health_detailed(self, request: web.Request) -> web.Response:
        detail = self.backend.health_detail()
        # "degraded" still serves, so probes keep routing to it; only "unhealthy" is 503.
        status = 503 if detail.get("status") == "unhealthy" else 200
        return _json(detail, status)

    async def _ready(self, request: web.Request) -> web.Response:
        if not self._stopping and self.backend.is_ready():
            return _json({"status": "ready"})
        status = "stopping" if self._stopping else "starting"
        if not self._stopping and not self.backend.is_live():
            status = "unhealthy"  # e.g. the store is full: /health/detailed says why
        return _json({"status": status}, 503)

    async def _live(self, request: web.Request) -> web.Response:
        return _json({"status": "alive"})

    async def _metrics(self, request: web.Request) -> web.Response:
        if not self.metrics_enabled:
            return _error(404, "not_found", "metrics are disabled")
        try:
            self.backend.refresh_metrics()
        except Exception:
            # Stale gauges beat no metrics at all: render anyway.
            logger.exception("refresh_metrics failed; rendering stale gauges")
        response = web.Response(body=generate_latest(REGISTRY))
        response.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return response

    async def _list_nodes(self, request: web.Request) -> web.Response:
        try:
            statuses, labels, limit, page_token = _parse_node_query(request.query)
        except _BadParameter as exc:
            return _error(400, "invalid_argument", str(exc), exc.parameter)
        nodes, next_token = self.backend.list_nodes(statuses, labels, limit, page_token)
        return _json({"nodes": nodes, "next_page_token": next_token})

    async def _get_node(self, request: web.Request) -> web.Response:
        return _json(self.backend.get_node(request.match_info["node_id"]))

    async def _get_command(self, request: web.Request) -> web.Response:
        return _json(self.backend.get_command(request.match_info["command_id"]))

    async def _config(self, request: web.Request) -> web.Response:
        return _json(self.backend.effective_config())

    async def _list_agents(self, request: web.Request) -> web.Response:
        query = request.query
        try:
            for key in query:
                if key not in _AGENT_QUERY_PARAMS:
                    raise _BadParameter(
                        key,
                        f"unknown query parameter {key!r} "
                        f"(expected one of: {', '.join(sorted(_AGENT_QUERY_PARAMS))})",
                    )
            name = _single(query, "name") or ""
            states = [s.strip() for v in query.getall("state", []) for s in v.split(",")]
            raw_limit = _single(query, "limit")
            limit = DEFAULT_NODE_LIMIT
            if raw_limit is not None:
                if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_NODE_LIMIT:
                    raise _BadParameter("limit", f"'limit' must be between 1 and {MAX_NODE_LIMIT}")
                limit = int(raw_limit)
            page_token = _single(query, "page_token") or ""
        except _BadParameter as exc:
            return _error(400, "invalid_argument", str(exc), exc.parameter)
        agents, next_token = self.backend.list_agents(name, states, limit, page_token)
        return _json({"agents": agents, "next_page_token": next_token})

    async def _dashboard_asset(self, request: web.Request) -> web.Response:
        name = request.match_info["asset"]
        body = self._assets.get(name) if self.dashboard_enabled else None
        if body is None:
            return _error(404, "not_found", f"no dashboard file {name!r}")
        response = web.Response(body=body, content_type=_DASHBOARD_ASSETS[name], charset="utf-8")
        response.headers["Cache-Control"] = "no-cache"
        return response

    async def _dashboard_page(self, request: web.Request) -> web.Response:
        if not self.dashboard_enabled:
            return _error(404, "not_found", "the dashboard is disabled")
        if self._dashboard is None:
            return _error(503, "unavailable", "dashboard.html is missing from this installation")
        response = web.Response(body=self._dashboard, content_type="text/html", charset="utf-8")
        response.headers["Content-Security-Policy"] = _DASHBOARD_CSP
        response.headers["Cache-Control"] = "no-cache"
        return response


async def _set_common_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Name the server and forbid MIME sniffing on every response, errors included."""
    response.headers["Server"] = SERVER_HEADER
    response.headers["X-Content-Type-Options"] = "nosniff"


def _load_assets() -> dict[str, bytes]:
    """The dashboard's script and stylesheet (package data); missing ones answer 404."""
    assets: dict[str, bytes] = {}
    folder = resources.files(__package__ or "nexus_fast.api")
    for name in _DASHBOARD_ASSETS:
        try:
            assets[name] = folder.joinpath(name).read_bytes()
        except OSError:
            logger.error("%s not found in nexus_fast.api; the dashboard will not work", name)
    return assets


def _load_dashboard() -> bytes | None:
    """Read dashboard.html (package data) once; a missing file is logged, not fatal."""
    try:
        return (
            resources.files(__package__ or "nexus_fast.api").joinpath("dashboard.html").read_bytes()
        )
    except OSError:
        logger.error("dashboard.html not found in nexus_fast.api; the dashboard answers 503")
        return None
