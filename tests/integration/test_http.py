"""The HTTP port of the real server: health, readiness, metrics, JSON API, dashboard."""

from __future__ import annotations

import shutil
import subprocess

import orjson

import nexus_fast
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import ServerProcess, http_get

REQUIRED_METRICS = (
    "nexus_nodes_total",
    "nexus_grpc_requests_total",
    "nexus_grpc_request_duration_seconds",
    "nexus_grpc_connections_active",
    "nexus_db_operations_total",
    "nexus_db_operation_duration_seconds",
    "nexus_db_size_bytes",
    "nexus_uptime_seconds",
    "nexus_version_info",
    "nexus_commands_processed_total",
    "nexus_agents_total",
    "nexus_command_queue_depth",
    "process_cpu_seconds_total",
    "process_resident_memory_bytes",
)


def test_health_ready_live(server: ServerProcess) -> None:
    status, body, _ = http_get(server.http_base + "/health")
    assert status == 200 and orjson.loads(body) == {"status": "healthy"}
    assert http_get(server.http_base + "/ready")[0] == 200
    assert http_get(server.http_base + "/live")[0] == 200

    status, body, _ = http_get(server.http_base + "/health/detailed")
    detail = orjson.loads(body)
    assert status == 200 and detail["status"] == "healthy"
    assert detail["version"] == nexus_fast.__version__ and detail["uptime_seconds"] > 0
    assert set(detail["implementation"]) >= {"ring", "queue", "scoring"}
    # performance.gc_threshold (default 20000) is applied once the server is up
    assert detail["gc"]["threshold"][0] == 20000 and detail["gc"]["frozen"] > 0
    assert {"store", "grpc", "websocket"} <= set(detail["components"])
    assert detail["components"]["store"]["status"] == "ok"
    assert detail["components"]["grpc"]["port"] == server.grpc_port


def test_metrics_pass_promtool_and_carry_the_required_families(server: ServerProcess) -> None:
    with server.channel() as channel:
        pb_grpc.NodeServiceStub(channel).Register(pb.RegisterRequest(node_id="m-1"), timeout=5)
    status, body, headers = http_get(server.http_base + "/metrics")
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    text = body.decode()
    for name in REQUIRED_METRICS:
        assert f"# TYPE {name} " in text or f"# TYPE {name.removesuffix('_total')} " in text, name
    assert 'nexus_nodes_total{status="ready"} 1.0' in text
    # Defect 9: the spec's untyped *_total names stay; typed gauges sit beside them.
    assert "# TYPE nexus_nodes_total untyped" in text and "# TYPE nexus_nodes gauge" in text
    assert 'nexus_nodes{status="ready"} 1.0' in text
    assert "# TYPE nexus_agents_total untyped" in text and "# TYPE nexus_agents gauge" in text
    assert "nexus_db_healthy 1.0" in text
    assert 'nexus_grpc_requests_total{method="NodeService/Register",status="OK"} 1.0' in text
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by `make test` (Debian package prometheus)"
    check = subprocess.run(
        [promtool, "check", "metrics"], input=body, capture_output=True, timeout=30
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_nodes_json_api_and_errors(server: ServerProcess) -> None:
    with server.channel() as channel:
        nodes = pb_grpc.NodeServiceStub(channel)
        for i in range(3):
            nodes.Register(pb.RegisterRequest(node_id=f"h-{i}", labels={"zone": "z"}), timeout=5)
    status, body, _ = http_get(server.http_base + "/api/v1/nodes?status=ready&label=zone=z")
    listed = orjson.loads(body)
    assert status == 200 and [n["id"] for n in listed["nodes"]] == ["h-0", "h-1", "h-2"]
    status, body, _ = http_get(server.http_base + "/api/v1/nodes/h-1")
    assert status == 200 and orjson.loads(body)["status"] == "ready"

    status, body, _ = http_get(server.http_base + "/api/v1/nodes/nope")
    assert status == 404 and orjson.loads(body)["error"] == {
        "code": "not_found",
        "message": "node 'nope' not found",
    }
    # Typed core errors reach the middleware and its one table, which names the field.
    status, body, _ = http_get(server.http_base + "/api/v1/nodes?status=sleeping")
    error = orjson.loads(body)["error"]
    assert status == 400 and error["code"] == "invalid_argument"
    assert error["parameter"] == "status" and "sleeping" in error["message"]
    status, body, _ = http_get(server.http_base + "/api/v1/nodes?page_token=!!bogus")
    error = orjson.loads(body)["error"]
    assert status == 400 and error["code"] == "invalid_argument"
    assert error["parameter"] == "page_token"
    status, body, _ = http_get(server.http_base + "/no/such/path")
    assert status == 404 and orjson.loads(body)["error"]["code"] == "not_found"


def test_dashboard_is_served(server: ServerProcess) -> None:
    status, body, headers = http_get(server.http_base + "/dashboard")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b"/dashboard/dashboard.js" in body and b"/dashboard/dashboard.css" in body
