"""The one table that maps core errors to wire statuses.

Every adapter (gRPC, WebSocket, HTTP) translates a :class:`~nexus_fast.errors.NexusError`
here and nowhere else, so a new error type is one row in this file (and
``tests/unit/test_status.py`` fails until it has one). A row gives:

* the gRPC status code, plus the trailers that carry the error's numbers
  (``retry-after-ms``, ``nexus-oldest-index``, ``nexus-resume-after-index``);
* the ``code`` of WebSocket ``error`` frames and HTTP JSON error bodies;
* the WebSocket frame that carries it: an ``error`` frame (the connection stays open), a
  ``reset`` frame, or a close code when the error ends the connection;
* the HTTP status, plus ``Retry-After`` for the retryable ones.

The codes are documented in docs/events.md (gRPC statuses, WebSocket frames and close
codes) and the README (HTTP and gRPC).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

import grpc

from nexus_fast import errors
from nexus_fast.security.limits import LimitExceeded, RateLimited, retry_after_ms

__all__ = [
    "CLOSE_LIMIT_EXCEEDED",
    "LEADER_TRAILER",
    "OLDEST_INDEX_TRAILER",
    "RESUME_AFTER_TRAILER",
    "RETRY_AFTER_TRAILER",
    "TABLE",
    "Row",
    "error_code",
    "grpc_status",
    "grpc_trailers",
    "http_headers",
    "http_status",
    "row",
    "ws_close_code",
]

RETRY_AFTER_TRAILER: Final = "retry-after-ms"
"""gRPC trailer on RESOURCE_EXHAUSTED: milliseconds to wait before retrying."""
OLDEST_INDEX_TRAILER: Final = "nexus-oldest-index"
"""gRPC trailer on OUT_OF_RANGE (event index too old): the oldest event index kept."""
RESUME_AFTER_TRAILER: Final = "nexus-resume-after-index"
"""gRPC trailer for a slow consumer: the index to resume after."""

LEADER_TRAILER: Final = "nexus-leader"
"""gRPC trailer on UNAVAILABLE from a cluster replica that is not the leader: the leader's
gRPC address (cluster.advertise), for clients to follow. Absent while none is elected."""

CLOSE_LIMIT_EXCEEDED: Final = 4029
"""WebSocket close code when a connection-level limit refuses the connection (429's twin)."""

WsFrame = Literal["error", "reset", "close"]


@dataclass(frozen=True, slots=True)
class Row:
    """How one error type looks on each wire."""

    error: type[errors.NexusError]
    grpc: grpc.StatusCode
    code: str
    """``code`` in WebSocket error frames and HTTP JSON error bodies."""
    http: int
    ws_frame: WsFrame = "error"
    """The WebSocket frame that reports it; ``close`` ends the connection with ``ws_close``."""
    ws_close: int | None = None


_E = errors
_G = grpc.StatusCode

# Checked in order; the first matching class wins (subclasses before their bases).
TABLE: Final[tuple[Row, ...]] = (
    # Bytes that do not decode (protobuf on gRPC); aiohttp and the WebSocket framing layer
    # answer their own undecodable input with 400 / ``bad_request`` likewise.
    Row(_E.UndecodableRequest, _G.INVALID_ARGUMENT, "bad_request", 400),
    Row(_E.InvalidArgument, _G.INVALID_ARGUMENT, "invalid_argument", 400),
    Row(_E.NodeNotFound, _G.NOT_FOUND, "not_found", 404),
    Row(_E.NotFound, _G.NOT_FOUND, "not_found", 404),
    Row(_E.AlreadyExists, _G.ALREADY_EXISTS, "already_exists", 409),
    Row(_E.StaleSession, _G.FAILED_PRECONDITION, "stale_session", 409),
    Row(_E.Superseded, _G.ABORTED, "superseded", 409),
    Row(_E.PermissionDenied, _G.PERMISSION_DENIED, "permission_denied", 403),
    Row(_E.Unauthenticated, _G.UNAUTHENTICATED, "unauthenticated", 401),
    Row(_E.FailedPrecondition, _G.FAILED_PRECONDITION, "failed_precondition", 409),
    # Kubernetes answers a watch from a compacted revision with 410 Gone; the WebSocket
    # says so with a ``reset`` frame naming the oldest index kept.
    Row(_E.EventIndexTooOld, _G.OUT_OF_RANGE, "out_of_range", 410, "reset"),
    Row(_E.SlowConsumer, _G.RESOURCE_EXHAUSTED, "resource_exhausted", 429, "close", 4008),
    Row(_E.QueueFull, _G.RESOURCE_EXHAUSTED, "resource_exhausted", 429),
    # Per-principal limits (security/limits.py). An op over its rate gets an error frame
    # and the connection stays; a connection over its cap is closed with 4029.
    Row(RateLimited, _G.RESOURCE_EXHAUSTED, "rate_limited", 429),
    Row(LimitExceeded, _G.RESOURCE_EXHAUSTED, "limit_exceeded", 429, "close", CLOSE_LIMIT_EXCEEDED),
    # 507 Insufficient Storage: the disk or map ceiling, not the client's rate, is the limit.
    Row(_E.StoreFull, _G.RESOURCE_EXHAUSTED, "resource_exhausted", 507),
    Row(_E.ResourceExhausted, _G.RESOURCE_EXHAUSTED, "resource_exhausted", 429),
    # Cluster mode: not the leader (trailer nexus-leader names it) or none elected yet.
    Row(_E.LeaderElsewhere, _G.UNAVAILABLE, "not_leader", 503),
    Row(_E.Unavailable, _G.UNAVAILABLE, "unavailable", 503),
)

_INTERNAL: Final = Row(errors.NexusError, grpc.StatusCode.INTERNAL, "internal", 500)
_BY_TYPE: dict[type[BaseException], Row] = {}


def row(error: errors.NexusError) -> Row:
    """The table row for ``error`` (an ``internal`` row for a NexusError with none)."""
    cls = type(error)
    found = _BY_TYPE.get(cls)
    if found is None:
        found = next((r for r in TABLE if isinstance(error, r.error)), _INTERNAL)
        _BY_TYPE[cls] = found  # one entry per error class: bounded
    return found


def grpc_status(error: errors.NexusError) -> grpc.StatusCode:
    """gRPC status code for a core error."""
    return row(error).grpc


def grpc_trailers(error: errors.NexusError) -> tuple[tuple[str, str], ...]:
    """Trailing metadata that carries the error's numbers to gRPC clients."""
    if isinstance(error, errors.ResourceExhausted):
        return ((RETRY_AFTER_TRAILER, str(retry_after_ms(error.retry_after))),)
    if isinstance(error, errors.EventIndexTooOld):
        return ((OLDEST_INDEX_TRAILER, str(error.oldest_index)),)
    if isinstance(error, errors.SlowConsumer):
        return ((RESUME_AFTER_TRAILER, str(error.last_index)),)
    if isinstance(error, errors.Unavailable):
        # LeaderElsewhere, and the replicated store's NotLeader, name the leader to follow.
        leader = getattr(error, "leader_advertise", None)
        if isinstance(leader, str) and leader:
            return ((LEADER_TRAILER, leader),)
        if isinstance(error, errors.LeaderElsewhere):  # none elected yet: retry here
            return ((RETRY_AFTER_TRAILER, str(retry_after_ms(error.retry_after))),)
    return ()


def error_code(error: errors.NexusError) -> str:
    """Short machine-readable code for WebSocket error frames and HTTP error bodies."""
    return row(error).code


def ws_close_code(error: errors.NexusError) -> int | None:
    """The WebSocket close code if this error ends the connection, else None."""
    return row(error).ws_close


def http_status(error: errors.NexusError) -> int:
    """HTTP status for a core error."""
    return row(error).http


def http_headers(error: errors.NexusError) -> dict[str, str]:
    """Extra HTTP response headers for the error (``Retry-After`` in whole seconds)."""
    if isinstance(error, errors.ResourceExhausted):
        wait = error.retry_after
        return {"Retry-After": str(max(1, math.ceil(wait)) if math.isfinite(wait) else 86400)}
    if isinstance(error, errors.LeaderElsewhere):
        headers = {"Retry-After": str(max(1, math.ceil(error.retry_after)))}
        if error.leader_advertise:  # the leader's gRPC address, as the gRPC trailer says
            headers["Nexus-Leader"] = error.leader_advertise
        return headers
    return {}
