"""Junk from peers gets a typed answer, a counter, and at most one WARNING per peer a minute.

Issue 10, defect 3: bytes that are not a valid protobuf answered ``UNKNOWN "Unexpected
<class 'DecodeError'>"`` (``INTERNAL`` on ``Connect``) with a full traceback at ERROR per
request; junk HTTP requests logged aiohttp tracebacks at ERROR. Everything here talks to
the real server process over loopback.
"""

from __future__ import annotations

import re
import socket
import threading
from collections.abc import Iterator

import grpc
import orjson
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import HOST, ServerProcess, http_get
from .events_util import metric

pytestmark = pytest.mark.integration

JUNK = b"\xff\xff\xff\xff\x07junk"  # not a protobuf: a field tag with an invalid wire type


def _methods() -> list[tuple[str, bool, bool, str]]:
    """(path, client_streaming, server_streaming, input full name) of every method."""
    found = []
    for service in pb.DESCRIPTOR.services_by_name.values():
        for method in service.methods:
            found.append(
                (
                    f"/{service.full_name}/{method.name}",
                    method.client_streaming,
                    method.server_streaming,
                    method.input_type.full_name,
                )
            )
    return found


def _call_with_junk(
    channel: grpc.Channel, path: str, client_streaming: bool, server_streaming: bool
) -> grpc.RpcError:
    """Send JUNK as the (first) request of ``path``; return the error the call ends with."""

    def junk_stream() -> Iterator[bytes]:
        yield JUNK

    try:
        # No serializers: the raw bytes go on the wire as the message.
        if client_streaming and server_streaming:
            list(channel.stream_stream(path)(junk_stream(), timeout=10))
        elif client_streaming:
            channel.stream_unary(path)(junk_stream(), timeout=10)
        elif server_streaming:
            list(channel.unary_stream(path)(JUNK, timeout=10))
        else:
            channel.unary_unary(path)(JUNK, timeout=10)
    except grpc.RpcError as exc:
        return exc
    raise AssertionError(f"{path} accepted junk bytes")


def _log_lines(server: ServerProcess) -> list[dict[str, object]]:
    lines = []
    for raw in server.log_path.read_bytes().splitlines():
        try:
            record = orjson.loads(raw)
        except orjson.JSONDecodeError:
            record = {"raw": raw.decode(errors="replace")}
        lines.append(record if isinstance(record, dict) else {"raw": raw})
    return lines


def _bad_input_warnings(server: ServerProcess, port: str) -> list[dict[str, object]]:
    return [
        r
        for r in _log_lines(server)
        if str(r.get("msg", "")).startswith(f"bad {port} request from ")
    ]


def test_undecodable_grpc_requests_get_invalid_argument_and_one_warning(
    server: ServerProcess,
) -> None:
    methods = _methods()
    assert len(methods) >= 15  # every NodeService and ControlService method
    assert any(cs and ss for _, cs, ss, _ in methods)  # Connect
    assert any(ss and not cs for _, cs, ss, _ in methods)  # WatchEvents, WaitCommands
    with server.channel() as channel:
        for path, client_streaming, server_streaming, message in methods:
            error = _call_with_junk(channel, path, client_streaming, server_streaming)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, error)
            assert error.details() == f"request is not a valid {message}", (path, error)

        # The server is fine afterwards: a valid call on the same channel works.
        control = channel.unary_unary(
            "/nexus.fabric.v1.ControlService/ListNodes",
            request_serializer=pb.ListNodesRequest.SerializeToString,
            response_deserializer=pb.ListNodesResponse.FromString,
        )
        assert control(pb.ListNodesRequest(), timeout=10).total_matched == 0

    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "DecodeError" not in log, log[-3000:]
    warnings = _bad_input_warnings(server, "grpc")
    assert len(warnings) == 1, warnings  # one peer (127.0.0.1), one line a minute
    assert warnings[0]["level"] == "warning", warnings
    counted = metric(server, "nexus_bad_requests_total")
    assert counted == len(methods), counted


def test_health_and_reflection_answer_junk_with_invalid_argument(server: ServerProcess) -> None:
    # grpcio's own servicers used grpc's default decoding: UNKNOWN plus a traceback each.
    foreign = [
        ("/grpc.health.v1.Health/Check", False, False, "grpc.health.v1.HealthCheckRequest"),
        ("/grpc.health.v1.Health/Watch", False, True, "grpc.health.v1.HealthCheckRequest"),
        (
            "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
            True,
            True,
            "grpc.reflection.v1alpha.ServerReflectionRequest",
        ),
    ]
    with server.channel() as channel:
        for path, client_streaming, server_streaming, message in foreign:
            error = _call_with_junk(channel, path, client_streaming, server_streaming)
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (path, error)
            assert error.details() == f"request is not a valid {message}", (path, error)
        # Valid calls still work: health answers, reflection lists our services.
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        assert check(health_pb2.HealthCheckRequest(), timeout=10).status == (
            health_pb2.HealthCheckResponse.SERVING
        )
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo
        replies = list(
            reflect(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=10)
        )
        names = {s.name for s in replies[0].list_services_response.service}
        assert "nexus.fabric.v1.NodeService" in names and "grpc.health.v1.Health" in names
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "DecodeError" not in log, log[-3000:]
    assert len(_bad_input_warnings(server, "grpc")) == 1
    assert metric(server, "nexus_bad_requests_total") == len(foreign)


def test_junk_in_the_middle_of_a_connect_stream_ends_it_with_invalid_argument(
    server: ServerProcess,
) -> None:
    with server.channel() as channel:
        node = pb_grpc.NodeServiceStub(channel)
        registered = node.Register(
            pb.RegisterRequest(node_id="junk-node", capacity=pb.Resources(cpu=1)), timeout=10
        )
        hello = pb.NodeMessage(node_id="junk-node", session_epoch=registered.session_epoch)
        sent = threading.Event()

        def messages() -> Iterator[bytes]:
            yield hello.SerializeToString()
            yield hello.SerializeToString()
            yield JUNK
            sent.wait(10)  # keep the stream open: the server must end it

        connect = channel.stream_stream("/nexus.fabric.v1.NodeService/Connect")
        try:
            with pytest.raises(grpc.RpcError) as info:
                for _ in connect(messages(), timeout=10):
                    pass
        finally:
            sent.set()
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value
        assert info.value.details() == "request is not a valid nexus.fabric.v1.NodeMessage"
        # The node can connect again with a fresh session.
        again = node.Register(
            pb.RegisterRequest(node_id="junk-node", capacity=pb.Resources(cpu=1)), timeout=10
        )
        assert again.session_epoch > registered.session_epoch
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log, log[-3000:]
    assert len(_bad_input_warnings(server, "grpc")) == 1


def test_thousands_of_junk_grpc_requests_leave_the_log_small(server: ServerProcess) -> None:
    before = server.log_path.stat().st_size
    with server.channel() as channel:
        register = channel.unary_unary("/nexus.fabric.v1.NodeService/Register")
        futures = []
        for _ in range(2_500):
            futures.append(register.future(JUNK, timeout=30))
            if len(futures) >= 100:  # bounded concurrency for a shared machine
                for future in futures:
                    assert future.exception().code() == grpc.StatusCode.INVALID_ARGUMENT
                futures.clear()
        for future in futures:
            assert future.exception().code() == grpc.StatusCode.INVALID_ARGUMENT
    grown = server.log_path.stat().st_size - before
    # Before the fix: a ~900-byte traceback per request (2.2 MB here). Now one line.
    assert grown < 2_000, grown
    assert metric(server, "nexus_bad_requests_total") == 2_500
    assert http_get(server.http_base + "/ready")[0] == 200


# --------------------------------------------------------------------------- HTTP


def _raw_http(server: ServerProcess, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; return everything the server answers."""
    with socket.create_connection((HOST, server.http_port), timeout=10) as sock:
        sock.sendall(data)
        chunks = []
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return b"".join(chunks)


HTTP_JUNK = [
    # A valid request first, then junk on the same connection (aiohttp logged these).
    b"GET /live HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1 junk\r\n\r\n",
    b"GET /live HTTP/1.1\r\nHost: x\r\n\r\n\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n",
    b"GET /live HTTP/1.1\r\nHost: x\r\n\r\nGET /live HTTP/1.1\r\nbad header line\r\n\r\n",
    b"GET /live HTTP/1.1\r\nHost: x\r\n\r\nGET /live HTTP/1.1\r\nX-Big: "
    + b"a" * 100_000
    + b"\r\n\r\n",
    # Junk as the very first request.
    b"GET /live HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n",
    b"GET /live HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
    b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n",
    b"GET /live HTTP/9.9\r\n\r\n",
]


def test_junk_http_requests_get_400_and_no_traceback(server: ServerProcess) -> None:
    for junk in HTTP_JUNK:
        answer = _raw_http(server, junk)
        statuses = re.findall(rb"^HTTP/1\.[01] (\d{3}) ", answer, re.MULTILINE)
        assert statuses and statuses[-1] == b"400", (junk[:80], answer[:500])
    for _ in range(200):
        assert (
            re.findall(rb"^HTTP/1\.[01] (\d{3}) ", _raw_http(server, HTTP_JUNK[2]), re.M)[-1]
            == b"400"
        )
    assert http_get(server.http_base + "/live")[0] == 200
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "Error handling request" not in log, log[-3000:]
    assert len(_bad_input_warnings(server, "http")) == 1
    assert metric(server, "nexus_bad_requests_total") >= 200 + len(HTTP_JUNK) - 1
