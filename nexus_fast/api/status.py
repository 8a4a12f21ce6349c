"""The one table that maps core errors to wire statuses.

Every adapter translates errors here and nowhere else, so a new error type is
one line in this file.
"""

from __future__ import annotations

from typing import Final

import grpc

from nexus_fast import errors

# Checked in order; the first matching class wins (subclasses before bases).
_TABLE: Final[tuple[tuple[type[errors.NexusError], grpc.StatusCode, str], ...]] = (
    (errors.InvalidArgument, grpc.StatusCode.INVALID_ARGUMENT, "invalid_argument"),
    (errors.NotFound, grpc.StatusCode.NOT_FOUND, "not_found"),
    (errors.StaleSession, grpc.StatusCode.FAILED_PRECONDITION, "stale_session"),
    (errors.Superseded, grpc.StatusCode.ABORTED, "superseded"),
    (errors.FailedPrecondition, grpc.StatusCode.FAILED_PRECONDITION, "failed_precondition"),
    (errors.ResourceExhausted, grpc.StatusCode.RESOURCE_EXHAUSTED, "resource_exhausted"),
    (errors.Unavailable, grpc.StatusCode.UNAVAILABLE, "unavailable"),
)


def grpc_status(error: errors.NexusError) -> grpc.StatusCode:
    """gRPC status code for a core error."""
    for cls, code, _ in _TABLE:
        if isinstance(error, cls):
            return code
    return grpc.StatusCode.INTERNAL


def error_code(error: errors.NexusError) -> str:
    """Short machine-readable code for JSON / WebSocket error frames."""
    for cls, _, code in _TABLE:
        if isinstance(error, cls):
            return code
    return "internal"
