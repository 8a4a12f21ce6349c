"""A full store says so: RESOURCE_EXHAUSTED "store full", unhealthy, reads keep serving."""

from __future__ import annotations

import json
import os

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import ServerProcess, http_get, wait_for

pytestmark = pytest.mark.integration


def submit(control: pb_grpc.ControlServiceStub, key: str, payload: bytes = b"") -> None:
    spec = pb.CommandSpec(kind="fill", payload=payload, idempotency_key=key)
    control.SubmitCommands(pb.SubmitCommandsRequest(commands=[spec]), timeout=10)


def grpc_health(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)


def test_full_store_is_resource_exhausted_reported_and_recovers(server_factory: type) -> None:
    # 2 MB of map at most: about twenty 100 KB submits fill it.
    server: ServerProcess = server_factory.create(
        NEXUS_DB_CACHE_SIZE="1MB", NEXUS_DB_MAX_MAP_SIZE="2MB"
    ).start()
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        accepted = 0
        with pytest.raises(grpc.RpcError) as info:
            while accepted < 1000:
                submit(control, f"big-{accepted}", os.urandom(100_000))
                accepted += 1
        error = info.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert error.details().startswith("store full"), error.details()
        assert ("retry-after-ms", "5000") in tuple(error.trailing_metadata() or ())
        assert 5 < accepted < 1000

        # Health tells the truth while writes fail ...
        status, body, _ = http_get(server.http_base + "/health")
        assert status == 503 and json.loads(body)["status"] == "unhealthy", body
        status, body, _ = http_get(server.http_base + "/ready")
        assert status == 503 and json.loads(body)["status"] == "unhealthy", body
        status, body, _ = http_get(server.http_base + "/health/detailed")
        store = json.loads(body)["components"]["store"]
        assert status == 503 and store["status"] == "failed", store
        assert store["reason"].startswith("store full"), store
        wait_for(
            lambda: grpc_health(channel) == health_pb2.HealthCheckResponse.NOT_SERVING,
            10,
            message="gRPC health NOT_SERVING",
        )
        # ... reads keep serving ...
        record = control.GetCommand(pb.GetCommandRequest(id="big-0"), timeout=5)
        assert record.spec.kind == "fill" and len(record.spec.payload) == 100_000
        listed = control.ListCommands(pb.ListCommandsRequest(page_size=5), timeout=5)
        assert len(listed.commands) == 5

        # ... and once a write fits again the store, health and readiness recover.
        submit(control, "small-after-full")
        assert http_get(server.http_base + "/health")[0] == 200
        assert http_get(server.http_base + "/ready")[0] == 200
        wait_for(
            lambda: grpc_health(channel) == health_pb2.HealthCheckResponse.SERVING,
            10,
            message="gRPC health SERVING again",
        )
    assert server.stop() == 0
