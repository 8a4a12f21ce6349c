"""Stuck peers against the real server: they are cut off, and nobody else notices.

A gRPC WatchEvents client that never reads (its write waits on HTTP/2 flow control), a
WebSocket subscriber that never reads, a node stream that receives commands and never
acks them, and HTTP connections that never finish their headers.
"""

from __future__ import annotations

import asyncio
import queue
import re
import socket
import threading
import time
from collections.abc import Coroutine
from typing import Any, TypeVar

import grpc
import grpc.aio

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import HOST, ServerProcess, wait_for
from .events_util import (
    Activity,
    GrpcWatcher,
    PicowsClient,
    assert_exactly_once_in_order,
    last_event_index,
)

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 60.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


def sample(server: ServerProcess, name: str, **labels: str) -> float:
    """One labelled sample of ``name`` on /metrics (0 when absent)."""
    _, body, _ = server.http("/metrics")
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    for line in body.decode().splitlines():
        if line.startswith(f"{name}{{{want}}} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_grpc_watcher_that_never_reads_is_cut_off(server_factory: type) -> None:
    server: ServerProcess = server_factory.create(NEXUS_EVENTS_SUBSCRIBER_BUFFER="50").start()
    activity = Activity(server, workers=2, nodes_per_worker=3, big=True)  # ~16 KB events

    async def body() -> None:
        healthy = GrpcWatcher(server, after_index=0)
        # A tiny, fixed flow-control window (no BDP probing, little lookahead), and a call
        # that is never read: the server's write for it stalls after ~64 KB.
        stuck_channel = grpc.aio.insecure_channel(
            server.grpc_target,
            options=[("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)],
        )
        stuck = pb_grpc.ControlServiceStub(stuck_channel).WatchEvents(pb.WatchEventsRequest())
        await stuck.initial_metadata()
        wait_for(
            lambda: sample(server, "nexus_event_subscriptions_active", transport="grpc") == 2, 5
        )
        started = time.monotonic()
        await activity.run_async(20, limit_per_worker=150)  # ~300 events, 6x the bound
        wait_for(
            lambda: (
                sample(server, "nexus_event_slow_consumer_disconnects_total", transport="grpc") >= 1
            ),
            20,
            message="stuck grpc watcher cut off",
        )
        cut_after = time.monotonic() - started
        # The call ended: the client, reading now, gets what was sent, then an error.
        received = 0
        try:
            async for batch in stuck:
                received += len(batch.events)
        except grpc.aio.AioRpcError as err:
            assert err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL), err
        else:
            raise AssertionError("the stuck call ended without an error")
        assert received < 300
        # Its subscription (and the call's buffers) are gone; the healthy watcher stays.
        wait_for(
            lambda: sample(server, "nexus_event_subscriptions_active", transport="grpc") == 1, 5
        )
        end = last_event_index(server)
        stream = await healthy.until(end)
        assert_exactly_once_in_order(stream.indices, 0, end, "healthy watcher")
        assert healthy.error is None
        # Said once: one count, one log line.
        assert sample(server, "nexus_event_slow_consumer_disconnects_total", transport="grpc") == 1
        assert server.log().count("closing slow grpc watcher") == 1
        assert cut_after < 20
        await healthy.close()
        await stuck_channel.close()

    run(body())


def test_websocket_subscriber_that_never_reads_is_cut_off(server_factory: type) -> None:
    server: ServerProcess = server_factory.create(NEXUS_EVENTS_SUBSCRIBER_BUFFER="50").start()
    activity = Activity(server, workers=3, nodes_per_worker=3, big=True)

    async def body() -> None:
        healthy = GrpcWatcher(server, after_index=0)
        stuck = await PicowsClient.connect(server, rcvbuf=4096)
        await stuck.subscribe()
        stuck.pause_reading()  # never reads again: the server's socket fills
        # ~750 events of ~16 KB: more than the socket buffers hold, then 50 more.
        await activity.run_async(20, limit_per_worker=250)
        wait_for(
            lambda: (
                sample(server, "nexus_event_slow_consumer_disconnects_total", transport="websocket")
                >= 1
            ),
            20,
            message="stuck websocket subscriber cut off",
        )
        stuck.resume_reading()
        code, reason = await asyncio.wait_for(stuck.rec.closed, 10)
        assert code == 4008 and re.fullmatch(r"slow consumer; resume after index \d+", reason)
        end = last_event_index(server)
        stream = await healthy.until(end)
        assert_exactly_once_in_order(stream.indices, 0, end, "healthy watcher")
        await healthy.close()
        await stuck.close()

    run(body())


def _partial_request(port: int) -> socket.socket:
    sock = socket.create_connection((HOST, port), timeout=5)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ")  # never finished
    return sock


def _closed_by_server(sock: socket.socket, timeout: float) -> bytes | None:
    """What the server sent before closing, or None if it is still open after ``timeout``."""
    sock.settimeout(timeout)
    got = b""
    try:
        while chunk := sock.recv(4096):
            got += chunk
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return got


def test_http_partial_headers_are_closed_and_one_address_is_capped(server_factory: type) -> None:
    server: ServerProcess = server_factory.create(
        NEXUS_HTTP_HEADER_TIMEOUT="1s", NEXUS_HTTP_MAX_CONNECTIONS_PER_IP="40"
    ).start()
    # 40 connections that never finish their headers: the cap's worth from this address.
    started = time.monotonic()
    held = [_partial_request(server.http_port) for _ in range(40)]
    time.sleep(0.2)
    # One more is refused at once, with a typed answer.
    refused = socket.create_connection((HOST, server.http_port), timeout=5)
    answer = _closed_by_server(refused, 5)
    assert answer is not None and answer.startswith(b"HTTP/1.1 429 "), answer
    assert b'"code":"RESOURCE_EXHAUSTED"' in answer
    # Every held one is closed after the header timeout (1 s; 4 s allowed), none answered.
    for sock in held:
        left = max(0.1, started + 4 - time.monotonic())
        assert _closed_by_server(sock, left) is not None, "partial-header connection left open"
        sock.close()
    elapsed = time.monotonic() - started
    assert 0.9 < elapsed < 4.5, elapsed
    # The address is free again, and a complete request is served.
    status, _, _ = server.http("/health")
    assert status == 200
    assert sample(server, "nexus_http_connections_refused_total", reason="per_ip") == 1
    # A connection that trickles a byte at a time still meets the deadline.
    sock = socket.create_connection((HOST, server.http_port), timeout=5)
    trickle_start = time.monotonic()
    closed = False
    for byte in b"GET /health HTTP/1.1\r\nHost: x\r\n":
        try:
            sock.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        time.sleep(0.1)
    closed = closed or _closed_by_server(sock, 3) is not None
    assert closed and time.monotonic() - trickle_start < 5
    sock.close()


class MuteNode:
    """A real node stream that registers, heartbeats and receives commands, but never acks
    or reports one (a proxy whose executor hung)."""

    def __init__(self, server: ServerProcess, node_id: str) -> None:
        self.node_id = node_id
        self.received: list[pb.Command] = []
        self.channel = server.node_channel(node_id)
        stub = pb_grpc.NodeServiceStub(self.channel)
        reply = stub.Register(
            pb.RegisterRequest(
                node_id=node_id,
                address="10.0.0.9:7000",
                capacity=pb.Resources(cpu=64, memory=256 << 30),
                version="mute/1",
            ),
            timeout=5,
        )
        self._outbox: queue.Queue[pb.NodeMessage | None] = queue.Queue()
        self._outbox.put(pb.NodeMessage(node_id=node_id, session_epoch=reply.session_epoch))
        self._stop = threading.Event()
        self.call = stub.Connect(iter(self._outbox.get, None))
        self._threads = [
            threading.Thread(target=self._read, daemon=True),
            threading.Thread(target=self._beat, daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def _read(self) -> None:
        try:
            for msg in self.call:
                self.received.extend(msg.commands)  # and never a word about them
        except grpc.RpcError:
            pass

    def _beat(self) -> None:
        while not self._stop.wait(0.3):
            self._outbox.put(pb.NodeMessage(heartbeat=pb.Heartbeat()))

    def close(self) -> None:
        self._stop.set()
        self._outbox.put(None)
        self.call.cancel()
        self.channel.close()


def test_node_that_never_acks_has_its_commands_retried_elsewhere(
    server: ServerProcess, fleet_factory: type
) -> None:
    mute = MuteNode(server, "mute-0")
    fleet = fleet_factory.create(server, 1, "--id-prefix", "well-")
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        wait_for(
            lambda: (
                len(
                    control.ListNodes(
                        pb.ListNodesRequest(statuses=[pb.NODE_STATUS_READY]), timeout=5
                    ).nodes
                )
                == 2
            ),
            20,
            message="both nodes ready",
        )
        specs = [pb.CommandSpec(kind="echo", timeout_ms=1500, max_attempts=3) for _ in range(40)]
        reply = control.SubmitCommands(pb.SubmitCommandsRequest(commands=specs), timeout=10)
        ids = [r.id for r in reply.results]
        started = time.monotonic()
        done = list(
            control.WaitCommands(pb.WaitCommandsRequest(ids=ids, timeout_ms=20_000), timeout=30)
        )
        elapsed = time.monotonic() - started
    assert len(done) == 40
    assert {r.state for r in done} == {pb.COMMAND_STATE_SUCCEEDED}
    muted = {c.id for c in mute.received}
    assert muted, "placement never chose the mute node: the test proves nothing"
    for record in done:
        assert record.node_id == "well-00000"
        if record.id in muted:
            # Its attempt on the mute node timed out, and the retry avoided that node.
            assert record.attempt >= 2 and "mute-0" in record.tried_nodes, record
    # One timeout (1.5 s) and a retry, not the whole 20 s wait.
    assert elapsed < 10, elapsed
    mute.close()
    fleet.stop()
