"""The HTTP routes the dashboard lives on, against the real server: its files and CSP, the
JSON routes for commands, agents and events, and the server-sent event stream (resume by
``Last-Event-ID`` / ``after_index``, filters, typed errors, slow clients cut off)."""

from __future__ import annotations

import http.client
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .auth_util import SecureServer, make_pki, token, write_config
from .auth_util import http as auth_http
from .conftest import HOST, ServerProcess, http_get, wait_for

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)


class SseStream:
    """A blocking reader of one ``text/event-stream`` response."""

    def __init__(self, server: ServerProcess, query: str = "", **headers: str) -> None:
        self.conn = http.client.HTTPConnection(HOST, server.http_port, timeout=15)
        self.conn.request("GET", "/api/v1/events/stream" + query, headers=headers)
        self.response = self.conn.getresponse()
        self.status = self.response.status
        self.headers = dict(self.response.headers)

    def messages(self) -> Iterator[tuple[str, int | None, object]]:
        """``(event, id, data)`` for each message, until the server ends the stream."""
        event, ident, data = "message", None, []
        while True:
            line = self.response.readline()
            if not line:
                return
            text = line.decode().rstrip("\n")
            if not text:
                if data:
                    yield event, ident, orjson.loads("\n".join(data))
                event, ident, data = "message", None, []
            elif text.startswith("event: "):
                event = text[7:]
            elif text.startswith("id: "):
                ident = int(text[4:])
            elif text.startswith("data: "):
                data.append(text[6:])

    def events_until(self, index: int) -> tuple[dict[str, object], list[dict[str, object]]]:
        """The hello message and every event up to ``index``."""
        hello: dict[str, object] = {}
        events: list[dict[str, object]] = []
        for event, ident, data in self.messages():
            if event == "hello":
                assert isinstance(data, dict)
                hello = data
            elif event == "events":
                assert isinstance(data, list)
                assert ident == data[-1]["index"]  # the id is the resume point
                events.extend(data)
            if ident is not None and ident >= index:
                return hello, events
        raise AssertionError(f"stream ended before index {index}")

    def close(self) -> None:
        self.conn.close()


def _submit(server: ServerProcess, count: int, payload: bytes = b"", kind: str = "run") -> None:
    with server.channel() as channel:
        pb_grpc.ControlServiceStub(channel).SubmitCommands(
            pb.SubmitCommandsRequest(
                commands=[pb.CommandSpec(kind=kind, payload=payload) for _ in range(count)]
            ),
            timeout=30,
        )


def _last_index(server: ServerProcess) -> int:
    status, body, _ = http_get(server.http_base + "/api/v1/events?limit=1")
    assert status == 200, body
    return int(orjson.loads(body)["last_index"])


def test_dashboard_files_and_csp(server: ServerProcess) -> None:
    status, body, headers = http_get(server.http_base + "/dashboard")
    assert status == 200 and headers["Content-Security-Policy"] == CSP
    # Nothing inline: the CSP allows only same-origin scripts and styles.
    assert b"<style" not in body and not re.search(rb"<script(?![^>]*\bsrc=)", body)
    for name, kind in (("dashboard.js", "text/javascript"), ("dashboard.css", "text/css")):
        status, asset, headers = http_get(f"{server.http_base}/dashboard/{name}")
        assert status == 200 and headers["Content-Type"].startswith(kind) and asset
    status, body, _ = http_get(server.http_base + "/dashboard/secrets.txt")
    assert status == 404 and orjson.loads(body)["error"]["code"] == "not_found"
    js = http_get(server.http_base + "/dashboard/dashboard.js")[1]
    # The page follows the stream; the only timer is the local clock (no polling).
    assert b"/api/v1/events/stream" in js and js.count(b"setInterval(") == 1


def test_stream_resumes_after_last_event_id(server: ServerProcess) -> None:
    _submit(server, 5)
    last = _last_index(server)
    first = SseStream(server, "?after_index=0")
    assert first.status == 200
    assert first.headers["Content-Type"].startswith("text/event-stream")
    hello, events = first.events_until(last)
    first.close()
    assert hello["after_index"] == 0 and hello["last_index"] >= last
    indexes = [int(e["index"]) for e in events]  # type: ignore[call-overload]
    assert indexes == list(range(1, last + 1))

    # Resume in the middle (what EventSource does on reconnect): the rest, once, in order.
    _submit(server, 3)
    newest = _last_index(server)
    middle = last - 2
    resumed = SseStream(server, "?after_index=1", **{"Last-Event-ID": str(middle)})
    hello, events = resumed.events_until(newest)
    resumed.close()
    assert hello["after_index"] == middle  # the header wins over the query
    assert [e["index"] for e in events] == list(range(middle + 1, newest + 1))


def test_stream_filters_and_bookmarks(server_factory: type) -> None:
    server = server_factory.create(NEXUS_EVENTS_BOOKMARK_INTERVAL="0.2s").start()
    _submit(server, 2)
    newest = _last_index(server)
    stream = SseStream(server, "?after_index=0&topics=system")
    seen: list[tuple[str, int | None, object]] = []
    for message in stream.messages():
        seen.append(message)
        if message[0] == "bookmark":
            break
    stream.close()
    events = [e for kind, _, data in seen if kind == "events" for e in data]  # type: ignore[attr-defined]
    assert events and {e["topic"] for e in events} == {"system"}
    # The bookmark moves the resume point past the command events the filter skipped.
    kind, ident, data = seen[-1]
    assert kind == "bookmark" and ident == data and ident is not None and ident >= newest


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("?topics=weather", 400, "invalid_argument"),
        ("?after_index=-1", 400, "invalid_argument"),
        ("?after_index=abc", 400, "invalid_argument"),
        ("?after_index=99999999", 400, "invalid_argument"),
        ("?bogus=1", 400, "invalid_argument"),
        ("?after_index=1&after_index=2", 400, "invalid_argument"),
    ],
)
def test_stream_bad_input_is_a_typed_http_error(
    server: ServerProcess, query: str, status: int, code: str
) -> None:
    got, body, headers = http_get(server.http_base + "/api/v1/events/stream" + query)
    assert got == status and headers["Content-Type"].startswith("application/json")
    assert orjson.loads(body)["error"]["code"] == code
    got, body, _ = http_get(server.http_base + "/api/v1/events" + query)
    assert got == status and orjson.loads(body)["error"]["code"] == code
    assert "Traceback" not in server.log()


def test_stream_older_than_retention_is_410(server_factory: type) -> None:
    server = server_factory.create(NEXUS_EVENTS_RETENTION_COUNT="5").start()
    _submit(server, 30)
    wait_for(
        lambda: (
            orjson.loads(http_get(server.http_base + "/api/v1/events?limit=1")[1])["oldest_index"]
            > 2
        ),
        10,
        0.1,
        "the pruner drops old events",
    )
    status, body, _ = http_get(server.http_base + "/api/v1/events/stream?after_index=1")
    error = orjson.loads(body)["error"]
    assert status == 410 and error["code"] == "out_of_range" and "oldest" in error["message"]
    # after_index=0 means "from the oldest kept": no error, the stream starts there.
    stream = SseStream(server, "?after_index=0")
    event, ident, hello = next(stream.messages())
    stream.close()
    assert stream.status == 200 and event == "hello" and isinstance(hello, dict)
    assert ident == hello["oldest_index"] - 1  # type: ignore[operator]


def test_events_page_and_json_routes(server_factory: type, fleet_factory: type) -> None:
    server = server_factory.create().start()
    fleet_factory.create(server.grpc_target, 2, "--id-prefix", "json-")
    wait_for(
        lambda: len(orjson.loads(http_get(server.http_base + "/api/v1/nodes")[1])["nodes"]) == 2,
        20,
        0.1,
        "nodes registered",
    )
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        reply = control.SubmitCommands(
            pb.SubmitCommandsRequest(commands=[pb.CommandSpec(kind="run")]), timeout=10
        )
        command_id = reply.results[0].id
        control.DeployAgent(pb.DeployAgentRequest(spec=pb.AgentSpec(name="w", replicas=2)))

    def done() -> bool:
        body = http_get(f"{server.http_base}/api/v1/commands/{command_id}")[1]
        return orjson.loads(body)["state"] == "succeeded"

    wait_for(done, 20, 0.1, "the command succeeds")
    status, body, _ = http_get(server.http_base + "/api/v1/agents?name=w")
    agents = orjson.loads(body)
    assert status == 200 and sorted(a["id"] for a in agents["agents"]) == ["w-0", "w-1"]
    assert agents["next_page_token"] == ""
    status, body, _ = http_get(server.http_base + "/api/v1/agents?limit=1")
    assert status == 200 and len(orjson.loads(body)["agents"]) == 1
    assert orjson.loads(body)["next_page_token"] == "w-0"
    status, body, _ = http_get(server.http_base + "/api/v1/agents?state=AGENT_STATE_NAPPING")
    assert status == 400 and orjson.loads(body)["error"]["code"] == "invalid_argument"
    status, body, _ = http_get(server.http_base + "/api/v1/commands/no-such-command")
    assert status == 404 and orjson.loads(body)["error"]["code"] == "not_found"

    # One command's events through the JSON page, filtered by topic and key, paged.
    after, states = 0, []
    while True:
        status, body, _ = http_get(
            f"{server.http_base}/api/v1/events?topics=command&keys={command_id}"
            f"&after_index={after}&limit=2"
        )
        page = orjson.loads(body)
        assert status == 200 and len(page["events"]) <= 2
        states += [e["payload"]["state"] for e in page["events"]]
        assert all(e["key"] == command_id for e in page["events"])
        if page["next_after_index"] >= page["last_index"]:
            break
        after = page["next_after_index"]
    assert states[0] in ("pending", "placed")
    assert states[-1] == "succeeded"


def test_slow_stream_client_is_cut_off(server_factory: type) -> None:
    """A client that stops reading is disconnected once it falls subscriber_buffer events
    behind; the server and the other clients carry on."""
    server = server_factory.create(NEXUS_EVENTS_SUBSCRIBER_BUFFER="100").start()
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window: fills fast
    stuck.connect((HOST, server.http_port))
    stuck.sendall(
        b"GET /api/v1/events/stream HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    )
    assert stuck.recv(64).startswith(b"HTTP/1.1 200")
    # ~600 bytes of JSON per event, 24,000 events: more than every socket buffer between
    # us and the server holds, so the server's writes block and the lag bound trips.
    for _ in range(24):
        _submit(server, 1000)

    def cut_off() -> bool:
        _status, body, _ = http_get(server.http_base + "/metrics")
        return b'nexus_event_slow_consumer_disconnects_total{transport="http"} 1.0' in body

    wait_for(cut_off, 30, 0.2, "the stuck stream is counted as a slow consumer")
    # Its socket was closed by the server: draining it ends in EOF or a reset.
    stuck.settimeout(10)
    ended = False
    deadline = time.monotonic() + 20
    try:
        while time.monotonic() < deadline:
            if not stuck.recv(1 << 20):
                ended = True
                break
    except ConnectionResetError:
        ended = True
    finally:
        stuck.close()
    assert ended
    # A reader that keeps up is served the whole log.
    newest = _last_index(server)
    fresh = SseStream(server, "?after_index=0")
    _, events = fresh.events_until(newest)
    fresh.close()
    assert [e["index"] for e in events] == list(range(1, newest + 1))


def test_new_routes_go_through_the_permission_table(tmp_path: Path) -> None:
    """With auth on: the page's files are public, its data routes need a reader's token."""
    pki = make_pki(tmp_path / "pki")
    config = write_config(
        tmp_path / "auth.toml",
        f"""auth_required = true
tls_enabled = true
tls_cert_file = "{pki / "server.pem"}"
tls_key_file = "{pki / "server-key.pem"}"
jwt_secret_file = "{pki / "jwt.secret"}"
""",
    )
    server = SecureServer(tmp_path / "data", tmp_path / "server.log", config)
    try:
        server.start()
        viewer = {"Authorization": f"Bearer {token(pki, 'vera', 'viewer')}"}
        node = {"Authorization": f"Bearer {token(pki, 'node:n1', 'node')}"}
        for path in ("/dashboard/dashboard.js", "/dashboard/dashboard.css"):
            assert auth_http(server, path)[0] == 200, path
        for path in (
            "/api/v1/events?limit=1",
            "/api/v1/agents",
            "/api/v1/commands/nope",
            "/api/v1/events/stream?topics=nope",
        ):
            assert auth_http(server, path)[0] == 401, path
            assert auth_http(server, path, node)[0] == 403, path
        assert auth_http(server, "/api/v1/events?limit=1", viewer)[0] == 200
        assert auth_http(server, "/api/v1/agents", viewer)[0] == 200
        assert auth_http(server, "/api/v1/commands/nope", viewer)[0] == 404
        # A reader gets the stream (past auth, the bad topic is the stream's own 400).
        assert auth_http(server, "/api/v1/events/stream?topics=nope", viewer)[0] == 400
        conn = http.client.HTTPConnection(HOST, server.http_port, timeout=10)
        conn.request("GET", "/api/v1/events/stream?after_index=0", headers=viewer)
        response = conn.getresponse()
        assert response.status == 200
        assert response.readline() == b"retry: 1000\n"
        assert response.readline() == b"event: hello\n"
        conn.close()
    finally:
        server.kill()
