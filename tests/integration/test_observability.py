"""The spec's metric families on the real server, the JSON metrics, and a trace of a command.

Metrics: a real ``nexus-fast`` with a ``nexus-node`` fleet runs commands; every family the
spec lists is on ``/metrics`` and the three JSON endpoints answer with sane numbers.

Tracing: the server exports over OTLP/gRPC to a real trace receiver (opentelemetry-proto's
``TraceService``) running in this process on a free loopback port; a node played by this
test over a raw ``Connect`` stream runs one command submitted with a client
``traceparent``, and the receiver gets one trace: submit, place, commit, dispatch and
result spans, naming the node, continuing the client's span. A ``nexus-node`` with
``--tracing-endpoint`` then adds its own span around running a command to such a trace.
"""

from __future__ import annotations

import json
import queue
import re
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from websockets.sync.client import connect

from nexus_fast.benchmark.procs import free_ports
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc
from tests.integration.auth_util import ws_op
from tests.integration.conftest import HOST, ServerProcess, wait_for

# The spec's metric list: issue 2 (nodes, gRPC, db, uptime, version), issue 3 (commands,
# agents), issue 4 (WebSocket, events) and issue 14 (memory, CPU, db cache hit rate).
SPEC_FAMILIES = (
    "nexus_nodes_total",
    "nexus_agents_total",
    "nexus_grpc_requests_total",
    "nexus_grpc_request_duration_seconds",
    "nexus_grpc_connections_active",
    "nexus_websocket_connections_total",
    "nexus_websocket_messages_sent_total",
    "nexus_websocket_messages_received_total",
    "nexus_db_operations_total",
    "nexus_db_operation_duration_seconds",
    "nexus_db_size_bytes",
    "nexus_db_cache_hit_rate",
    "nexus_commands_processed_total",
    "nexus_events_published_total",
    "nexus_memory_usage_bytes",
    "nexus_cpu_usage_percent",
    "nexus_uptime_seconds",
    "nexus_version_info",
)
COMMANDS = 20
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
CLIENT_SPAN = "b7ad6b7169203331"
WS_TRACE_ID = "1" * 32
OP_TRACE_ID = "2" * 32
NODE_TRACE_ID = "3" * 32
NODE_SPAN = "nexus.node.execute"
SPAN_NAMES = {"nexus.submit", "nexus.place", "nexus.commit", "nexus.dispatch", "nexus.result"}


def get_json(server: ServerProcess, path: str) -> dict[str, Any]:
    status, body, headers = server.http(path)
    assert status == 200, (path, status, body[:300])
    assert headers["Content-Type"].startswith("application/json")
    return json.loads(body)  # type: ignore[no-any-return]


def test_every_spec_family_is_exposed_and_json_metrics_are_sane(
    server_factory: type, fleet_factory: type
) -> None:
    server = server_factory.create().start()
    fleet = fleet_factory.create(server, 2, "--exec-duration", "0")
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        wait_for(
            lambda: len(control.ListNodes(pb.ListNodesRequest(), timeout=5).nodes) == 2,
            30,
            message=fleet.log(),
        )
        specs = [pb.CommandSpec(idempotency_key=f"m{i}", kind="echo") for i in range(COMMANDS)]
        control.SubmitCommands(pb.SubmitCommandsRequest(commands=specs), timeout=10)
        finals = list(
            control.WaitCommands(
                pb.WaitCommandsRequest(ids=[s.idempotency_key for s in specs], timeout_ms=20000),
                timeout=30,
            )
        )
    assert [r.state for r in finals] == [pb.COMMAND_STATE_SUCCEEDED] * COMMANDS

    status, body, _ = server.http("/metrics")
    assert status == 200
    text = body.decode()
    exposed = set(re.findall(r"^# TYPE (\S+) ", text, re.M))
    # Counters are declared without _total; info families as <name>_info gauges.
    names = {n for e in exposed for n in (e, f"{e}_total")}
    assert [f for f in SPEC_FAMILIES if f not in names] == []
    rss = float(re.search(r"^nexus_memory_usage_bytes (\S+)$", text, re.M)[1])  # type: ignore[index]
    assert 10e6 < rss < 4e9
    hit = float(re.search(r"^nexus_db_cache_hit_rate (\S+)$", text, re.M)[1])  # type: ignore[index]
    assert 0 < hit <= 1  # a just-written file is in the page cache

    overview = get_json(server, "/api/v1/metrics")
    assert overview["nodes"]["ready"] == 2
    assert overview["commands"]["processed_total"]["succeeded"] == COMMANDS
    assert overview["commands"]["processed_per_second"] > 0
    assert 10e6 < overview["process"]["memory_usage_bytes"] < 4e9
    assert 0 <= overview["process"]["cpu_usage_percent"] < 400
    assert 0 < overview["database"]["cache_hit_rate"] <= 1
    final = overview["commands"]["submit_to_final_seconds"]
    assert final["count"] == COMMANDS and 0 < final["p50"] <= final["p99"] < 30

    database = get_json(server, "/api/v1/metrics/database")
    assert database["healthy"] is True and database["size_bytes"] > 0
    assert database["entries"]["commands"] >= COMMANDS
    cache = database["cache"]
    assert 0 < cache["resident_pages"] <= cache["checked_pages"]
    commit = database["operations"]["commit"]
    assert commit["total"] > 0 and commit["per_second"] > 0
    assert 0 < commit["latency_seconds"]["p50"] <= commit["latency_seconds"]["p99"] < 5

    performance = get_json(server, "/api/v1/metrics/performance")
    dispatch = performance["commands"]["submit_to_dispatch_seconds"]
    assert dispatch["count"] == COMMANDS and 0 < dispatch["p50"] <= dispatch["p99"] < 30
    submit = performance["grpc"]["ControlService/SubmitCommands"]
    assert submit["per_second"] > 0 and submit["latency_seconds"]["count"] == 1
    assert performance["events"]["published_per_second"] > 0
    assert performance["window"] in ("sampled", "since_start")
    fleet.stop()


class TraceReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace collector that keeps every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self._lock = threading.Lock()

    def Export(self, request: Any, context: Any) -> Any:
        with self._lock:
            for resource_spans in request.resource_spans:
                for scope in resource_spans.scope_spans:
                    self.spans.extend(scope.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    def of_trace(self, trace_id: str) -> list[Any]:
        with self._lock:
            return [s for s in self.spans if s.trace_id.hex() == trace_id]


@pytest.fixture
def receiver() -> Iterator[tuple[TraceReceiver, int]]:
    (port,) = free_ports(1)
    collector = TraceReceiver()
    server = grpc.server(futures.ThreadPoolExecutor(2))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    server.add_insecure_port(f"{HOST}:{port}")
    server.start()
    yield collector, port
    server.stop(0)


def run_one_node(server: ServerProcess, node_id: str, got: queue.Queue[pb.Command]) -> None:
    """Register ``node_id``, then on its Connect stream ack and succeed each command."""
    with server.node_channel(node_id) as channel:
        stub = pb_grpc.NodeServiceStub(channel)
        reply = stub.Register(
            pb.RegisterRequest(node_id=node_id, capacity=pb.Resources(cpu=4)), timeout=5
        )
        outbox: queue.Queue[pb.NodeMessage | None] = queue.Queue()
        outbox.put(
            pb.NodeMessage(
                node_id=node_id, session_epoch=reply.session_epoch, heartbeat=pb.Heartbeat()
            )
        )

        def requests() -> Iterator[pb.NodeMessage]:
            while True:
                try:
                    message = outbox.get(timeout=0.3)
                except queue.Empty:
                    message = pb.NodeMessage(heartbeat=pb.Heartbeat())  # stay ready
                if message is None:
                    return
                yield message

        call = stub.Connect(requests(), timeout=30)
        try:
            for control in call:
                for command in control.commands:
                    got.put(command)
                    outbox.put(
                        pb.NodeMessage(
                            acks=[pb.CommandAck(command_id=command.id, attempt=command.attempt)],
                            results=[
                                pb.CommandResult(
                                    command_id=command.id, attempt=command.attempt, success=True
                                )
                            ],
                        )
                    )
        except grpc.RpcError:
            pass  # the test ended the stream
        finally:
            outbox.put(None)
        call.cancel()


def test_a_command_is_one_trace_from_the_clients_span_to_its_result(
    server_factory: type,
    fleet_factory: type,
    receiver: tuple[TraceReceiver, int],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    collector, port = receiver
    endpoint = f"http://{HOST}:{port}"
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")  # nexus-node exports at once too
    server = server_factory.create(
        NEXUS_TRACING_ENABLED="true",
        NEXUS_TRACING_ENDPOINT=f"http://{HOST}:{port}",
        NEXUS_TRACING_SAMPLE_RATIO="0",  # only the client's sampled trace is followed
        OTEL_BSP_SCHEDULE_DELAY="100",
    ).start()
    got: queue.Queue[pb.Command] = queue.Queue()
    node = threading.Thread(target=run_one_node, args=(server, "trace-node", got), daemon=True)
    node.start()
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        # Connected, so that the submission places the command at once (the place span
        # names the node).
        wait_for(
            lambda: get_json(server, "/health/detailed")["components"]["grpc"]["connected_nodes"],
            15,
        )
        traceparent = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
        control.SubmitCommands(
            pb.SubmitCommandsRequest(commands=[pb.CommandSpec(idempotency_key="t1", kind="echo")]),
            metadata=(("traceparent", traceparent), ("tracestate", "vendor=1")),
            timeout=10,
        )
        (final,) = control.WaitCommands(
            pb.WaitCommandsRequest(ids=["t1"], timeout_ms=10000), timeout=15
        )
        assert final.state == pb.COMMAND_STATE_SUCCEEDED, final.reason
        # WebSocket: the upgrade request's traceparent, and a submit op's own, which wins.
        # Unsampled (flags 00) and ratio 0: carried to the record and the node, not traced.
        header, own = (f"00-{t}-{CLIENT_SPAN}-00" for t in (WS_TRACE_ID, OP_TRACE_ID))
        with connect(server.ws_url(), additional_headers={"traceparent": header}) as conn:
            for key, extra in (("w1", {}), ("w2", {"traceparent": own})):
                op = {"op": "submit", "commands": [{"kind": "echo", "idempotencyKey": key}]}
                assert ws_op(conn, {**op, **extra})["type"] == "submitted"
        assert control.GetCommand(pb.GetCommandRequest(id="w1"), timeout=5).traceparent == header
        assert control.GetCommand(pb.GetCommandRequest(id="w2"), timeout=5).traceparent == own
    command = got.get(timeout=5)
    assert command.id == "t1"
    # The node got the trace to continue: same trace, the server's submit span as parent.
    assert command.traceparent.startswith(f"00-{TRACE_ID}-") and command.traceparent[-2:] == "01"
    assert command.tracestate == "vendor=1"
    assert final.traceparent == command.traceparent  # the record keeps it

    wait_for(
        lambda: {s.name for s in collector.of_trace(TRACE_ID)} >= SPAN_NAMES,
        10,
        message="spans of the trace",
    )
    spans = {s.name: s for s in collector.of_trace(TRACE_ID)}
    submit = spans["nexus.submit"]
    assert submit.parent_span_id.hex() == CLIENT_SPAN
    assert command.traceparent == f"00-{TRACE_ID}-{submit.span_id.hex()}-01"
    for name in SPAN_NAMES - {"nexus.submit"}:
        span = spans[name]
        assert span.parent_span_id == submit.span_id, name
        attributes = {a.key: a.value.string_value for a in span.attributes}
        assert attributes.get("nexus.node.id") == "trace-node", (name, attributes)
        assert attributes["nexus.command.id"] == "t1", name
        assert span.start_time_unix_nano <= span.end_time_unix_nano, name
    order = ["nexus.submit", "nexus.dispatch", "nexus.result"]
    starts = [spans[n].start_time_unix_nano for n in order]
    assert starts == sorted(starts)
    assert {s.trace_id.hex() for s in collector.spans} == {TRACE_ID}  # nothing else sampled

    # nexus-node continues the trace: its span around the run is a child of nexus.submit.
    fleet = fleet_factory.create(server, 1, "--exec-duration", "0", "--tracing-endpoint", endpoint)
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        wait_for(lambda: len(control.ListNodes(pb.ListNodesRequest(), timeout=5).nodes) == 2, 15)
        (sim,) = [
            n.id
            for n in control.ListNodes(pb.ListNodesRequest(), timeout=5).nodes
            if n.id != "trace-node"
        ]
        command_spec = pb.CommandSpec(idempotency_key="t2", kind="echo", target_node=sim)
        control.SubmitCommands(
            pb.SubmitCommandsRequest(commands=[command_spec]),
            metadata=(("traceparent", f"00-{NODE_TRACE_ID}-{CLIENT_SPAN}-01"),),
            timeout=10,
        )
    wait_for(
        lambda: {s.name for s in collector.of_trace(NODE_TRACE_ID)} >= {*SPAN_NAMES, NODE_SPAN},
        15,
        message=fleet.log(),
    )
    spans = {s.name: s for s in collector.of_trace(NODE_TRACE_ID)}
    executed = spans[NODE_SPAN]
    assert executed.parent_span_id == spans["nexus.submit"].span_id
    attributes = {a.key: a.value.string_value for a in executed.attributes}
    assert (attributes["nexus.node.id"], attributes["nexus.command.id"]) == (sim, "t2")
    assert fleet.stop() == 0
    assert server.stop() == 0
    node.join(10)
