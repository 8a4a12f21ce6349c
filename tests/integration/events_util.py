"""Clients and load for the event-stream tests: picows, `websockets`, gRPC, and activity.

Every client records what it receives per subscription so tests can check
"every matching event exactly once, in index order" against each other and against
the server's own last index.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grpc
import orjson
import websockets
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import ServerProcess

GiB = 1024**3


def ws_url(server: ServerProcess, query: str = "") -> str:
    """The event stream's URL (``wss://`` when the server has auth on)."""
    return server.ws_url(query)


def last_event_index(server: ServerProcess) -> int:
    _, body, _ = server.http("/health/detailed")
    return int(json.loads(body)["components"]["store"]["last_event_index"])


def stored_events(server: ServerProcess) -> int:
    _, body, _ = server.http("/health/detailed")
    return int(json.loads(body)["components"]["store"]["entries"]["events"])


def metric(server: ServerProcess, name: str) -> float:
    """Sum of every sample of ``name`` on /metrics."""
    _, body, _ = server.http("/metrics")
    total = 0.0
    for line in body.decode().splitlines():
        if line.startswith(name) and (line[len(name)] in " {"):
            total += float(line.rsplit(" ", 1)[1])
    return total


@dataclass
class Stream:
    """What one subscription received."""

    events: list[dict[str, Any]] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)
    bookmark: int = 0
    bookmarks: int = 0  # bookmark frames received

    @property
    def indices(self) -> list[int]:
        return [e["index"] for e in self.events]

    @property
    def position(self) -> int:
        """Highest index this subscription is known to have covered."""
        return max(self.events[-1]["index"] if self.events else 0, self.bookmark)

    def keys(self) -> list[tuple[int, str, str, str]]:
        return [(e["index"], e["topic"], e["type"], e["key"]) for e in self.events]


class _Recorder:
    """Shared frame handling of the two WebSocket clients."""

    def __init__(self) -> None:
        self.streams: dict[str, Stream] = {}
        self.replies: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closed: asyncio.Future[tuple[int, str]] = asyncio.get_running_loop().create_future()

    def on_text(self, data: bytes | str) -> None:
        frame = orjson.loads(data)
        kind = frame.get("type")
        if kind == "events":
            stream = self.streams.setdefault(frame["subscription"], Stream())
            now = time.time()
            stream.events.extend(frame["events"])
            stream.received_at.extend([now] * len(frame["events"]))
        elif kind == "bookmark":
            stream = self.streams.setdefault(frame["subscription"], Stream())
            stream.bookmark = frame["index"]
            stream.bookmarks += 1
        else:
            self.replies.put_nowait(frame)

    async def reply(self, timeout: float = 5.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.replies.get(), timeout)

    async def until(self, sid: str, index: int, timeout: float = 10.0) -> Stream:
        deadline = time.monotonic() + timeout
        while self.streams.get(sid, Stream()).position < index:
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{sid} reached {self.streams.get(sid, Stream()).position}, wanted {index}"
                )
            if self.closed.done():
                raise AssertionError(f"connection closed: {self.closed.result()}")
            await asyncio.sleep(0.01)
        return self.streams[sid]


class PicowsClient(WSListener):
    """A picows client that records frames; raw frames can be sent with ``raw``."""

    def __init__(self) -> None:
        super().__init__()
        self.rec = _Recorder()
        self.transport: WSTransport | None = None

    @classmethod
    async def connect(
        cls, server: ServerProcess, rcvbuf: int | None = None, query: str = ""
    ) -> PicowsClient:
        """Connect to ``server``'s event stream with its credentials (wss + token in auth
        mode)."""
        opts = server.ws_options()

        def factory(parsed: Any) -> socket.socket:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            if rcvbuf:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            sock.setblocking(False)
            sock.connect_ex((parsed.host, parsed.port))
            return sock

        _, client = await ws_connect(
            cls,
            server.ws_url(query),
            socket_factory=factory if rcvbuf else None,
            ssl_context=opts["ssl"],
            extra_headers=opts["headers"],
        )
        assert isinstance(client, PicowsClient)
        return client

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == WSMsgType.TEXT:
            self.rec.on_text(frame.get_payload_as_bytes())
        elif frame.msg_type == WSMsgType.CLOSE and not self.rec.closed.done():
            self.rec.closed.set_result(
                (int(frame.get_close_code()), frame.get_close_message().decode())
            )
            transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.rec.closed.done():
            self.rec.closed.set_result((1006, ""))

    def send(self, obj: dict[str, Any]) -> None:
        assert self.transport is not None
        self.transport.send(WSMsgType.TEXT, orjson.dumps(obj))

    def raw(self, msg_type: WSMsgType, data: bytes, fin: bool = True) -> None:
        assert self.transport is not None
        self.transport.send(msg_type, data, fin)

    async def subscribe(self, **request: Any) -> str:
        self.send({"op": "subscribe", **request})
        reply = await self.rec.reply()
        assert reply["type"] == "subscribed", reply
        return str(reply["subscription"])

    def pause_reading(self) -> None:
        assert self.transport is not None
        self.transport.underlying_transport.pause_reading()

    def resume_reading(self) -> None:
        assert self.transport is not None
        self.transport.underlying_transport.resume_reading()

    async def close(self) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.send_close()
            self.transport.disconnect()
            await self.transport.wait_disconnected()


class WebsocketsClient:
    """A client built on the `websockets` library (an independent implementation)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.rec = _Recorder()
        self._reader = asyncio.ensure_future(self._read())

    @classmethod
    async def connect(cls, server: ServerProcess) -> WebsocketsClient:
        return cls(await websockets_connect(server))

    async def _read(self) -> None:
        try:
            async for message in self.conn:
                self.rec.on_text(message)
        except websockets.ConnectionClosed:
            pass
        if not self.rec.closed.done():
            rcvd = self.conn.close_code or 1006
            self.rec.closed.set_result((int(rcvd), self.conn.close_reason or ""))

    async def subscribe(self, **request: Any) -> str:
        await self.conn.send(orjson.dumps({"op": "subscribe", **request}).decode())
        reply = await self.rec.reply()
        assert reply["type"] == "subscribed", reply
        return str(reply["subscription"])

    async def close(self) -> None:
        await self.conn.close()
        await self._reader


async def websockets_connect(server: ServerProcess) -> Any:
    """A `websockets` connection to ``server``'s event stream, with its credentials."""
    opts = server.ws_options()
    return await websockets.connect(
        server.ws_url(),
        max_size=4 * 1024 * 1024,
        ssl=opts["ssl"],
        additional_headers=opts["headers"],
    )


class GrpcWatcher:
    """A grpc.aio WatchEvents stream recorded like the WebSocket clients."""

    def __init__(self, server: ServerProcess, **request: Any) -> None:
        self.channel = server.aio_channel()
        stub = pb_grpc.ControlServiceStub(self.channel)
        self.call = stub.WatchEvents(pb.WatchEventsRequest(**request))
        self.stream = Stream()
        self.batches = 0
        self.error: grpc.aio.AioRpcError | None = None
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for batch in self.call:
                now = time.time()
                if batch.events:
                    self.batches += 1
                for e in batch.events:
                    self.stream.events.append(
                        {
                            "index": e.index,
                            "topic": e.topic,
                            "type": e.type,
                            "key": e.key,
                            "time_ms": e.time_ms,
                        }
                    )
                    self.stream.received_at.append(now)
                if batch.bookmark_index:
                    self.stream.bookmark = batch.bookmark_index
                    self.stream.bookmarks += 1
        except grpc.aio.AioRpcError as err:
            self.error = err

    async def until(self, index: int, timeout: float = 10.0) -> Stream:
        deadline = time.monotonic() + timeout
        while self.stream.position < index:
            if self._task.done():
                raise AssertionError(f"watch ended: {self.error}")
            if time.monotonic() > deadline:
                raise AssertionError(f"grpc reached {self.stream.position}, wanted {index}")
            await asyncio.sleep(0.01)
        return self.stream

    async def until_bookmarks(self, count: int, timeout: float) -> Stream:
        """Wait until ``count`` bookmark messages have arrived in all."""
        deadline = time.monotonic() + timeout
        while self.stream.bookmarks < count:
            if self._task.done():
                raise AssertionError(f"watch ended: {self.error}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.stream.bookmarks} bookmarks in {timeout}s, wanted {count}"
                )
            await asyncio.sleep(0.01)
        return self.stream

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.channel.close()


def register(
    stub: pb_grpc.NodeServiceStub, node_id: str, labels: dict[str, str] | None = None
) -> None:
    stub.Register(
        pb.RegisterRequest(
            node_id=node_id,
            address="10.0.0.1:7000",
            labels=labels or {},
            capacity=pb.Resources(cpu=8, memory=32 * GiB, disk=100 * GiB),
            version="test/1",
        ),
        timeout=5,
    )


class Activity:
    """Node churn from several threads at once: register, drain/undrain, eligibility.

    ``run(seconds)`` blocks; each worker owns its nodes, so every call succeeds.
    """

    def __init__(
        self, server: ServerProcess, workers: int = 3, nodes_per_worker: int = 5, big: bool = False
    ) -> None:
        self.server = server
        # big: ~16 KB of labels per node, so every node event is ~16 KB of JSON.
        self.labels = {f"label-{i}": "v" * 250 for i in range(60)} if big else {}
        self.workers = workers
        self.nodes = nodes_per_worker
        self.calls = 0
        self._lock = threading.Lock()

    def _worker(self, w: int, stop_at: float, limit: int | None) -> None:
        with self.server.channel() as channel:
            control = pb_grpc.ControlServiceStub(channel)
            ids = [f"act-{w}-{i}" for i in range(self.nodes)]
            for node_id in ids:
                # Each node registers as itself (its own certificate with auth on).
                with self.server.node_channel(node_id) as node_channel:
                    register(pb_grpc.NodeServiceStub(node_channel), node_id, self.labels)
            draining = dict.fromkeys(ids, False)
            eligible = dict.fromkeys(ids, True)
            n = 0
            while time.monotonic() < stop_at and (limit is None or n < limit):
                node_id = ids[(n // 2) % len(ids)]
                # Every call flips a flag, so every call commits exactly one event.
                if n % 2:
                    eligible[node_id] = not eligible[node_id]
                    control.SetNodeEligibility(
                        pb.SetNodeEligibilityRequest(node_id=node_id, eligible=eligible[node_id]),
                        timeout=5,
                    )
                else:
                    draining[node_id] = not draining[node_id]
                    control.DrainNode(
                        pb.DrainNodeRequest(node_id=node_id, drain=draining[node_id], reason="t"),
                        timeout=5,
                    )
                n += 1
            with self._lock:
                self.calls += n + len(ids)

    def run(self, seconds: float, limit_per_worker: int | None = None) -> None:
        stop_at = time.monotonic() + seconds
        threads = [
            threading.Thread(target=self._worker, args=(w, stop_at, limit_per_worker))
            for w in range(self.workers)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()

    async def run_async(self, seconds: float, limit_per_worker: int | None = None) -> None:
        await asyncio.to_thread(self.run, seconds, limit_per_worker)


def submit_commands(server: ServerProcess, count: int, batch: int = 50) -> int:
    """Submit ``count`` echo commands in batches; returns how many were accepted."""
    accepted = 0
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        for start in range(0, count, batch):
            specs = [
                pb.CommandSpec(kind="echo", payload=b"x") for _ in range(min(batch, count - start))
            ]
            response = control.SubmitCommands(pb.SubmitCommandsRequest(commands=specs), timeout=10)
            accepted += len(response.results)
    return accepted


def assert_exactly_once_in_order(indices: list[int], start: int, end: int, where: str) -> None:
    """Contiguous ``start+1 .. end``: nothing missing, nothing twice, in order."""
    assert indices == list(range(start + 1, end + 1)), (
        f"{where}: got {len(indices)} events, first {indices[:3]}, last {indices[-3:]}, "
        f"expected {start + 1}..{end}; gaps/dups: "
        f"{sorted(set(range(start + 1, end + 1)) ^ set(indices))[:10]}"
    )


def filtered(events: list[dict[str, Any]], pred: Callable[[dict[str, Any]], bool]) -> list[int]:
    return [e["index"] for e in events if pred(e)]
