"""Per-principal limits against the real server with auth on (issue 9, acceptance 5).

A rate limit triggers (gRPC RESOURCE_EXHAUSTED with ``retry-after-ms``, HTTP 429 with
``Retry-After``) and recovers after the hinted wait; a principal holding its cap of
WebSocket connections or gRPC streams is refused one more (close 4029 / RESOURCE_EXHAUSTED)
while another principal is not, and its slots come back however its connections end;
registered nodes are capped per principal and released on Deregister.

Each test uses its own principals, so their budgets do not mix.
"""

from __future__ import annotations

import contextlib
import json
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from websockets.exceptions import ConnectionClosed, InvalidMessage
from websockets.sync.client import ClientConnection, connect

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .auth_util import (
    SecureServer,
    bearer,
    grpc_channel,
    http,
    running,
    secure_server,
    token,
    write_config,
    ws_url,
)
from .conftest import HOST, ServerProcess, http_get

pytestmark = pytest.mark.integration

RATE = 1  # requests per second per principal
BURST = 8
MAX_WS = 2
MAX_STREAMS = 2
MAX_NODES = 2
BYTE_BURST = 4096  # bytes per principal at once; refilled at BYTE_RATE per second
BYTE_RATE = 64
CLOSE_LIMIT_EXCEEDED = 4029

T = TypeVar("T")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[SecureServer]:
    limits = f"""
[security.limits]
enabled = true
requests_per_second = {RATE}
burst = {BURST}
max_ws_connections = {MAX_WS}
total_ws_connections = 100
max_streams = {MAX_STREAMS}
total_streams = 100
max_nodes = {MAX_NODES}
total_nodes = 100
bytes_per_second = {BYTE_RATE}
byte_burst = {BYTE_BURST}
"""
    with running(secure_server(tmp_path_factory.mktemp("auth-limits"), pki, limits)) as process:
        yield process


def _until(attempt: Callable[[], T | None], what: str, timeout: float = 10.0) -> T:
    """Poll ``attempt`` until it returns a value (the server frees slots asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = attempt()
        if result is not None:
            return result
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout}s: {what}")


def _retry_after_ms(error: grpc.RpcError) -> int:
    trailers = dict(error.trailing_metadata() or ())  # type: ignore[attr-defined]
    return int(trailers["retry-after-ms"])


# --------------------------------------------------------------------------- rates


def test_grpc_rate_limit_triggers_and_recovers(server: SecureServer, pki: Path) -> None:
    operator = token(pki, "rate-grpc", "operator")
    with grpc_channel(server, pki) as channel:
        stub = pb_grpc.ControlServiceStub(channel)
        refused: grpc.RpcError | None = None
        for _ in range(BURST + 20):  # the burst, then refused long before it refills
            try:
                stub.ListNodes(pb.ListNodesRequest(), metadata=bearer(operator), timeout=5)
            except grpc.RpcError as exc:
                refused = exc
                break
        assert refused is not None, "the rate limit never triggered"
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "rate-grpc" in (refused.details() or "")
        wait_ms = _retry_after_ms(refused)
        assert 0 < wait_ms <= 1000 // RATE + 1  # ceil of a float wait
        # Another principal is unaffected.
        other = token(pki, "rate-grpc-other", "viewer")
        stub.ListNodes(pb.ListNodesRequest(), metadata=bearer(other), timeout=5)
        time.sleep(wait_ms / 1000)
        stub.ListNodes(pb.ListNodesRequest(), metadata=bearer(operator), timeout=5)


def _get(server: SecureServer, path: str, tok: str) -> tuple[int, dict[str, str], Any]:
    request = urllib.request.Request(
        server.http_base + path, headers={"Authorization": f"Bearer {tok}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read())


def test_http_rate_limit_answers_429_and_recovers(server: SecureServer, pki: Path) -> None:
    viewer = token(pki, "rate-http", "viewer")
    answers = [_get(server, "/api/v1/nodes", viewer) for _ in range(BURST + 10)]
    statuses = [status for status, _, _ in answers]
    assert statuses[0] == 200
    assert 429 in statuses, statuses
    _, headers, body = answers[statuses.index(429)]
    assert body["error"]["code"] == "rate_limited"
    assert "rate-http" in body["error"]["message"]
    retry_after = int(headers["Retry-After"])
    assert 1 <= retry_after <= 1 // RATE + 1
    # Probes are public: never charged, so never refused while the principal is limited.
    assert http(server, "/ready")[0] == 200
    time.sleep(retry_after)
    assert _get(server, "/api/v1/nodes", viewer)[0] == 200


# --------------------------------------------------------------------------- WebSocket


_open: contextlib.ExitStack  # set per test by the `connections` fixture


@pytest.fixture
def connections() -> Iterator[None]:
    """Every WebSocket connection a test opens is closed at its end, whatever happens."""
    global _open
    with contextlib.ExitStack() as stack:
        _open = stack
        yield


def _ws_connect(server: SecureServer, tls: ssl.SSLContext, tok: str) -> ClientConnection:
    """A WebSocket connection held open across calls (closed at the end of the test).

    Rarely a TLS connection that picows closes at once reaches the client with no HTTP
    response at all (see ``auth_util.ws_refused``): that handshake is retried; an accepted
    upgrade (101) never is.
    """
    for _ in range(3):
        try:
            return _open.enter_context(
                connect(
                    ws_url(server),
                    ssl=tls,
                    additional_headers={"Authorization": f"Bearer {tok}"},
                    open_timeout=15,
                )
            )
        except InvalidMessage:
            continue
    raise AssertionError("three WebSocket handshakes got no HTTP response")


def _ws_open(server: SecureServer, tls: ssl.SSLContext, tok: str) -> ClientConnection | int:
    """An accepted connection (it answered a ping), or the close code it was refused with."""
    conn = _ws_connect(server, tls, tok)
    try:
        conn.send(json.dumps({"op": "ping", "id": 1}))
        reply = json.loads(conn.recv(timeout=5))
    except ConnectionClosed as exc:
        conn.close()
        assert exc.rcvd is not None
        return exc.rcvd.code
    assert reply["type"] == "pong"
    return conn


def _accepted(server: SecureServer, tls: ssl.SSLContext, tok: str) -> ClientConnection:
    def attempt() -> ClientConnection | None:
        result = _ws_open(server, tls, tok)
        return result if isinstance(result, ClientConnection) else None

    return _until(attempt, "a WebSocket connection was accepted")


def test_websocket_cap_is_per_principal_and_slots_come_back(
    server: SecureServer, pki: Path, tls: ssl.SSLContext, connections: None
) -> None:
    a = token(pki, "ws-a", "viewer")
    b = token(pki, "ws-b", "viewer")
    held = [_ws_open(server, tls, a) for _ in range(MAX_WS)]
    assert all(isinstance(conn, ClientConnection) for conn in held), held
    try:
        # One more for A: accepted at the HTTP level, then closed with 4029 and a reason.
        extra = _ws_connect(server, tls, a)
        with pytest.raises(ConnectionClosed) as info:
            extra.recv(timeout=5)
        extra.close()
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == CLOSE_LIMIT_EXCEEDED
        assert "ws-a" in info.value.rcvd.reason
        # A at its cap does not lock B out.
        other = _ws_open(server, tls, b)
        assert isinstance(other, ClientConnection)
        other.close()
        # A's held connections still work.
        first = held[0]
        assert isinstance(first, ClientConnection)
        first.send(json.dumps({"op": "ping", "id": 2}))
        assert json.loads(first.recv(timeout=5))["type"] == "pong"
        # A clean close frees one slot...
        first.close()
        again = _accepted(server, tls, a)
        # ...and so does a connection dropped without a closing handshake.
        second = held[1]
        assert isinstance(second, ClientConnection)
        second.close_socket()
        third = _accepted(server, tls, a)
        assert _ws_open(server, tls, a) == CLOSE_LIMIT_EXCEEDED  # cap held again: 2
        again.close()
        third.close()
    finally:
        for conn in held:
            if isinstance(conn, ClientConnection):
                conn.close()


def test_websocket_ops_over_budget_get_an_error_frame(
    server: SecureServer, pki: Path, tls: ssl.SSLContext, connections: None
) -> None:
    operator = token(pki, "ws-ops", "operator")
    conn = _ws_open(server, tls, operator)
    assert isinstance(conn, ClientConnection)
    with conn:
        codes = []
        for i in range(BURST + 10):
            conn.send(json.dumps({"op": "subscribe", "id": i, "topics": ["system"]}))
            while True:
                reply = json.loads(conn.recv(timeout=5))
                if reply.get("id") == i:
                    break
            codes.append(reply.get("code") if reply["type"] == "error" else "ok")
            if codes[-1] == "rate_limited":
                assert 0 < reply["retry_after_ms"] <= 1000 // RATE + 1  # ceil of a float wait
                break
        assert codes[-1] == "rate_limited", codes
        # An op over budget is refused; the connection stays open.
        conn.send(json.dumps({"op": "ping", "id": "after"}))
        assert json.loads(conn.recv(timeout=5))["type"] == "pong"


# --------------------------------------------------------------------------- gRPC streams


def _watch(stub: pb_grpc.ControlServiceStub, tok: str) -> tuple[Any, grpc.RpcError | None]:
    """``(call, None)`` for a WatchEvents stream that has answered (the server holds its
    slot), or ``(None, error)``. (A streaming call object is itself an RpcError subclass.)"""
    call = stub.WatchEvents(pb.WatchEventsRequest(after_index=0), metadata=bearer(tok))
    try:
        next(call)
    except grpc.RpcError as exc:
        return None, exc
    return call, None


def test_grpc_stream_cap_is_per_principal_and_released(server: SecureServer, pki: Path) -> None:
    a = token(pki, "stream-a", "viewer")
    b = token(pki, "stream-b", "viewer")
    with grpc_channel(server, pki) as channel:
        stub = pb_grpc.ControlServiceStub(channel)
        held = []
        try:
            for _ in range(MAX_STREAMS):
                call, error = _watch(stub, a)
                assert error is None, error
                held.append(call)
            _, refused = _watch(stub, a)
            assert refused is not None
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "stream-a" in (refused.details() or "")
            assert _retry_after_ms(refused) > 0
            other, error = _watch(stub, b)  # A at its cap does not lock B out
            assert error is None, error
            other.cancel()
            # Cancelling one of A's streams frees its slot (released in the wrapper's finally).
            held.pop(0).cancel()
            held.append(_until(lambda: _watch(stub, a)[0], "A's stream slot was released"))
            _, refused = _watch(stub, a)
            assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        finally:
            for call in held:
                call.cancel()


def test_waiting_submit_holds_a_stream_slot_taken_before_submitting(
    server: SecureServer, pki: Path
) -> None:
    """SubmitCommands with wait_ms counts against max_streams; refused, it commits nothing."""
    op = token(pki, "submit-wait", "operator")
    admin = token(pki, "submit-wait-admin", "admin")
    spec = pb.CommandSpec(
        idempotency_key="sw-limit",
        kind="run",
        placement=pb.Placement(label_selector={"no-such": "node"}),  # stays PENDING
    )
    with grpc_channel(server, pki) as channel:
        stub = pb_grpc.ControlServiceStub(channel)
        held = []
        try:
            for _ in range(MAX_STREAMS):
                call, error = _watch(stub, op)
                assert error is None, error
                held.append(call)
            request = pb.SubmitCommandsRequest(commands=[spec], wait_ms=100)
            with pytest.raises(grpc.RpcError) as refused:
                stub.SubmitCommands(request, metadata=bearer(op), timeout=5)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "streams" in (refused.value.details() or "")
            with pytest.raises(grpc.RpcError) as missing:
                stub.GetCommand(pb.GetCommandRequest(id="sw-limit"), metadata=bearer(admin))
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND  # nothing was committed
            held.pop(0).cancel()  # a free slot: the waiting submit goes through
            # Each try costs a request of a small budget (RATE, BURST): try a few times a second.
            reply = _until(
                lambda: _submit_or_none(stub, request, op), "a stream slot for the submit"
            )
            assert reply.results[0].state == pb.COMMAND_STATE_PENDING and not reply.final
        finally:
            for call in held:
                call.cancel()


def _submit_or_none(
    stub: pb_grpc.ControlServiceStub, request: pb.SubmitCommandsRequest, tok: str
) -> pb.SubmitCommandsResponse | None:
    time.sleep(0.25)
    try:
        reply: pb.SubmitCommandsResponse = stub.SubmitCommands(
            request, metadata=bearer(tok), timeout=5
        )
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:  # type: ignore[attr-defined]
            raise
        return None
    return reply


# --------------------------------------------------------------------------- nodes


def test_registered_nodes_are_capped_per_principal(server: SecureServer, pki: Path) -> None:
    admin = token(pki, "nodes-admin", "admin")
    with grpc_channel(server, pki) as channel:
        stub = pb_grpc.NodeServiceStub(channel)

        def register(node_id: str) -> pb.RegisterResponse:
            request = pb.RegisterRequest(node_id=node_id, address="10.0.0.9:1")
            response: pb.RegisterResponse = stub.Register(
                request, metadata=bearer(admin), timeout=5
            )
            return response

        first = register("capped-1")
        register("capped-2")
        register("capped-2")  # the same node again counts once
        with pytest.raises(grpc.RpcError) as info:
            register("capped-3")
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "registered nodes" in (info.value.details() or "")
        assert _retry_after_ms(info.value) > 0
        stub.Deregister(
            pb.DeregisterRequest(node_id="capped-1", session_epoch=first.session_epoch),
            metadata=bearer(admin),
            timeout=5,
        )
        register("capped-3")


# --------------------------------------------------------------------------- bytes


def test_submitted_bytes_are_charged_on_grpc(server: SecureServer, pki: Path) -> None:
    operator = token(pki, "bytes-grpc", "operator")

    def submit(key: str, size: int) -> None:
        spec = pb.CommandSpec(idempotency_key=key, kind="echo", payload=b"x" * size)
        stub.SubmitCommands(
            pb.SubmitCommandsRequest(commands=[spec]), metadata=bearer(operator), timeout=5
        )

    with grpc_channel(server, pki) as channel:
        stub = pb_grpc.ControlServiceStub(channel)
        submit("b1", BYTE_BURST // 2)
        with pytest.raises(grpc.RpcError) as info:
            submit("b2", BYTE_BURST // 2)  # the two together exceed the burst
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "write bytes rate limit" in (info.value.details() or "")
        assert _retry_after_ms(info.value) > 0
        with pytest.raises(grpc.RpcError) as info:
            submit("b3", BYTE_BURST * 2)  # can never fit: refused as too large
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "bytes in one write" in (info.value.details() or "")
        # Reads are not charged bytes.
        stub.ListCommands(pb.ListCommandsRequest(), metadata=bearer(operator), timeout=5)


def test_websocket_submit_frames_are_charged_bytes(
    server: SecureServer, pki: Path, tls: ssl.SSLContext, connections: None
) -> None:
    operator = token(pki, "bytes-ws", "operator")
    conn = _ws_open(server, tls, operator)
    assert isinstance(conn, ClientConnection)
    big = {"op": "submit", "id": "big", "commands": [{"kind": "echo", "payload": "eA==" * 2048}]}
    conn.send(json.dumps(big))  # over 8 KB in one frame: more than the whole burst
    reply = json.loads(conn.recv(timeout=5))
    assert reply["type"] == "error" and reply["code"] == "limit_exceeded", reply
    assert reply["id"] == "big"
    small = {"op": "submit", "id": "small", "commands": [{"kind": "echo", "payload": "aGk="}]}
    conn.send(json.dumps(small))
    reply = json.loads(conn.recv(timeout=5))
    assert reply["type"] == "submitted" and reply["id"] == "small", reply


# --------------------------------------------------------------------------- auth off


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """auth_required = false with limits enabled: every caller is the anonymous principal."""
    tmp = tmp_path_factory.mktemp("open-limits")
    config = write_config(
        tmp / "open.toml",
        f"""auth_required = false

[security.limits]
enabled = true
requests_per_second = {RATE}
burst = {BURST}
max_ws_connections = 1
total_ws_connections = 10
""",
    )
    process = ServerProcess(tmp / "data", tmp / "server.log", config)
    try:
        yield process.start()
    finally:
        process.kill()


def test_without_auth_limits_apply_to_the_anonymous_principal(open_server: ServerProcess) -> None:
    url = f"ws://{HOST}:{open_server.ws_port}/v1/events"
    with connect(url, open_timeout=15) as first:
        first.send(json.dumps({"op": "ping", "id": 1}))
        assert json.loads(first.recv(timeout=5))["type"] == "pong"
        with connect(url, open_timeout=15) as second, pytest.raises(ConnectionClosed) as info:
            second.recv(timeout=5)
        assert info.value.rcvd is not None
        assert info.value.rcvd.code == CLOSE_LIMIT_EXCEEDED
        assert "anonymous" in info.value.rcvd.reason
    with grpc.insecure_channel(open_server.grpc_target) as channel:
        stub = pb_grpc.ControlServiceStub(channel)
        refused: grpc.RpcError | None = None
        for _ in range(BURST + 20):
            try:
                stub.ListNodes(pb.ListNodesRequest(), timeout=5)
            except grpc.RpcError as exc:
                refused = exc
                break
        assert refused is not None and refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "anonymous" in (refused.details() or "")
    # The bucket is shared across ports: HTTP is refused too, probes are not.
    status, body, headers = http_get(open_server.http_base + "/api/v1/nodes")
    assert status == 429 and json.loads(body)["error"]["code"] == "rate_limited"
    assert int(headers["Retry-After"]) >= 1
    assert http_get(open_server.http_base + "/ready")[0] == 200
