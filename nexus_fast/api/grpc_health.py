"""``grpc.health.v1.Health`` with typed answers on every method.

grpcio's servicer answers ``Check`` for an unknown service with ``NOT_FOUND`` and no
message, and does not implement ``List`` (it raises ``NotImplementedError``: ``UNKNOWN``
and a traceback in the log), both found by tests/integration/test_fuzz.py. This subclass
names the unknown service and answers ``List`` with every service's status.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

__all__ = ["HealthServicer"]


class HealthServicer(health.aio.HealthServicer):  # type: ignore[misc]
    """grpcio's health servicer, with a message on NOT_FOUND and ``List`` implemented."""

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        status = self._server_status.get(request.service)
        if status is None:
            await context.abort(
                grpc.StatusCode.NOT_FOUND, f"unknown service {request.service[:200]!r}"
            )
        return health_pb2.HealthCheckResponse(status=status)

    async def List(
        self, request: health_pb2.HealthListRequest, context: Any
    ) -> health_pb2.HealthListResponse:
        return health_pb2.HealthListResponse(
            statuses={
                name: health_pb2.HealthCheckResponse(status=status)
                for name, status in self._server_status.items()
            }
        )
