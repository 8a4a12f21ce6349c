"""Fan-out benchmark: one publisher, many WebSocket subscribers, three servers.

* ``nexus``: the real event path: EventBus (ring, encode-once JSON, a cursor per
  subscription) behind nexus_fast's WebSocketServer + EventStreamProtocol. Events are
  fed to ``EventBus.publish_committed`` as a store commit would (LMDB is not measured).
* ``picows``: a bare picows broadcast server sending the same bytes to every client.
* ``websockets``: the `websockets` library's ``broadcast()``.

Each server publishes ``--events`` events in commits of ``--batch`` events, one commit
per loop turn, each event stamped with its publish time; the clients (picows, in a
separate process) count what they receive and the publish -> receive latency. Every
server is measured in the same run, on the same machine, by the same clients.

    python bench/fanout/fanout.py --subscribers 100 --events 20000

``--stalled N`` adds N subscribers that stop reading (a 4 KB receive buffer, reading
paused) and measures the nexus server with and without them in the same run: a stalled
peer must not slow the others (it is cut off at ``FANOUT_SUBSCRIBER_BUFFER`` events).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import orjson

from nexus_fast.benchmark.procs import free_ports

KINDS = ("nexus", "picows", "websockets")
PAD = "x" * 200  # ~300-byte events, like a small node/command event


# ------------------------------------------------------------------ servers


async def _publish(publish: Any, ready: asyncio.Event, events: int, batch: int) -> None:
    await ready.wait()
    await asyncio.sleep(0.2)
    rate = float(os.environ.get("FANOUT_RATE", "0"))
    sent = 0
    t0 = time.monotonic()
    while sent < events:
        n = min(batch, events - sent)
        publish(sent, n)
        sent += n
        if rate > 0:  # paced: latency without self-inflicted queueing
            await asyncio.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
        else:
            await asyncio.sleep(0)  # one commit per loop turn
    await asyncio.sleep(60)


async def serve_nexus(port: int, subscribers: int, events: int, batch: int) -> None:
    from nexus_fast.api.ws_events import EventStreamProtocol
    from nexus_fast.api.ws_server import WebSocketServer
    from nexus_fast.config import EventsConfig
    from nexus_fast.core.events import EventBus
    from nexus_fast.pb import fabric_pb2 as pb

    class NoStore:
        """Only what the bus reads when every subscriber stays within the ring."""

        last_event_index = 0

        def first_event_index(self) -> int:
            return 1

        def events_since(self, after: int, limit: int) -> list[tuple[int, bytes]]:
            return []

    # A small buffer (``--stalled`` runs) cuts a stalled subscriber off, as in production.
    cfg = EventsConfig(subscriber_buffer=int(os.environ.get("FANOUT_SUBSCRIBER_BUFFER", 1 << 20)))
    bus = EventBus(NoStore(), cfg, 1 << 17)  # type: ignore[arg-type]
    ready = asyncio.Event()
    proto = EventStreamProtocol(bus, max_subscriptions=4)

    def on_message(conn: Any, message: dict[str, Any]) -> None:
        proto(conn, message)
        if bus.subscription_count >= subscribers:
            ready.set()

    server = WebSocketServer(
        "127.0.0.1", port, max_connections=10000, max_message_size=1 << 20, on_message=on_message
    )
    await server.start()
    index = [0]

    def publish(first: int, n: int) -> None:
        pairs = []
        for _ in range(n):
            index[0] += 1
            payload = orjson.dumps({"t": time.time(), "pad": PAD})
            body = pb.Event(
                time_ms=int(time.time() * 1000),
                topic="system",
                type="bench",
                key="k",
                payload=payload,
            ).SerializeToString()
            pairs.append((index[0], body))
        bus.publish_committed(pairs)

    await _publish(publish, ready, events, batch)


def _frame(first: int, n: int) -> bytes:
    now = time.time()
    evs = [
        {
            "index": first + i + 1,
            "topic": "system",
            "type": "bench",
            "key": "k",
            "payload": {"t": now, "pad": PAD},
        }
        for i in range(n)
    ]
    return orjson.dumps({"type": "events", "subscription": "s1", "events": evs})


async def serve_picows(port: int, subscribers: int, events: int, batch: int) -> None:
    from picows import WSListener, WSMsgType, WSTransport, ws_create_server

    conns: list[WSTransport] = []
    ready = asyncio.Event()

    class Listener(WSListener):
        def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
            if frame.msg_type == WSMsgType.TEXT:
                transport.send(WSMsgType.TEXT, b'{"type":"subscribed","subscription":"s1"}')
                conns.append(transport)
                if len(conns) >= subscribers:
                    ready.set()

    await ws_create_server(lambda _: Listener(), "127.0.0.1", port)

    def publish(first: int, n: int) -> None:
        data = _frame(first, n)  # encoded once, the same bytes to everyone
        for t in conns:
            t.send(WSMsgType.TEXT, data)

    await _publish(publish, ready, events, batch)


async def serve_websockets(port: int, subscribers: int, events: int, batch: int) -> None:
    import websockets
    from websockets.asyncio.server import broadcast, serve

    conns: set[Any] = set()
    ready = asyncio.Event()

    async def handler(ws: Any) -> None:
        await ws.recv()
        await ws.send('{"type":"subscribed","subscription":"s1"}')
        conns.add(ws)
        if len(conns) >= subscribers:
            ready.set()
        try:
            await ws.wait_closed()
        finally:
            conns.discard(ws)

    async with serve(handler, "127.0.0.1", port, compression=None, max_queue=None):

        def publish(first: int, n: int) -> None:
            broadcast(conns, _frame(first, n).decode())

        await _publish(publish, ready, events, batch)
    del websockets


# ------------------------------------------------------------------ clients


async def run_clients(
    port: int, subscribers: int, events: int, timeout: float, stalled: int = 0
) -> dict[str, Any]:
    """``subscribers`` reading clients (measured) and ``stalled`` ones that stop reading."""
    from picows import WSListener, WSMsgType, WSTransport, ws_connect

    done = asyncio.get_running_loop().create_future()
    finished = [0]
    first_at: list[float] = []
    first_cpu: list[float] = []
    latencies: list[float] = []

    class Client(WSListener):
        def __init__(self, sample: bool) -> None:
            self.count = 0
            self.sample = sample

        def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
            if frame.msg_type != WSMsgType.TEXT:
                return
            msg = orjson.loads(frame.get_payload_as_bytes())
            if msg.get("type") != "events":
                return
            now = time.time()
            if not first_at:
                first_at.append(now)
                first_cpu.append(time.process_time())
            evs = msg["events"]
            self.count += len(evs)
            if self.sample:  # latency from a few clients keeps the client side cheap
                latencies.extend(now - e["payload"]["t"] for e in evs)
            if self.count >= events:
                finished[0] += 1
                if finished[0] == subscribers and not done.done():
                    done.set_result(now)

    url = f"ws://127.0.0.1:{port}/v1/events"
    clients = []
    for i in range(subscribers):
        transport, client = await ws_connect(lambda i=i: Client(i % 10 == 0), url)
        clients.append((transport, client))
    for transport, _ in clients:
        transport.send(WSMsgType.TEXT, b'{"op":"subscribe","topics":["system"]}')

    def small_socket(parsed: Any) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        sock.connect_ex((parsed.host, parsed.port))
        return sock

    for _ in range(stalled):
        transport, _ = await ws_connect(WSListener, url, socket_factory=small_socket)
        transport.send(WSMsgType.TEXT, b'{"op":"subscribe","topics":["system"]}')
        transport.underlying_transport.pause_reading()  # never reads again
    try:
        end = await asyncio.wait_for(done, timeout)
        ok = True
    except TimeoutError:
        end, ok = time.time(), False
    received = sum(c.count for _, c in clients)
    start = min(first_at) if first_at else end
    # the clients' share of a core while events flowed: ~100% means they set the rate
    client_cpu = (time.process_time() - first_cpu[0]) if first_cpu else 0.0
    lat = sorted(latencies) or [0.0]
    return {
        "ok": ok,
        "delivered": received,
        "expected": subscribers * events,
        "seconds": end - start,
        "events_per_s": received / max(end - start, 1e-9),
        "client_cpu_pct": 100 * client_cpu / max(end - start, 1e-9),
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(len(lat) * 0.99))],
    }


# ------------------------------------------------------------------ driver


def proc_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as fp:
        fields = fp.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    kind: str,
    subscribers: int,
    events: int,
    batch: int,
    timeout: float,
    rate: float = 0,
    stalled: int = 0,
) -> dict[str, Any]:
    """Start a ``kind`` server process and a client process; return the client's figures."""
    (port,) = free_ports(1)
    env = dict(os.environ, PYTHONUNBUFFERED="1", FANOUT_RATE=str(rate))
    if stalled:
        env["FANOUT_SUBSCRIBER_BUFFER"] = "100"
    me = os.path.abspath(__file__)
    common = ["--port", str(port), "--subscribers", str(subscribers), "--events", str(events)]
    # The server starts publishing once every client, stalled ones too, has subscribed.
    total = ["--subscribers", str(subscribers + stalled)]
    server = subprocess.Popen(
        [sys.executable, me, "serve", kind, *common, *total, "--batch", str(batch)], env=env
    )
    try:
        deadline = time.monotonic() + 15
        while True:  # wait for the port
            try:
                socket.create_connection(("127.0.0.1", port), 0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError(f"{kind} server did not start") from None
                time.sleep(0.05)
        cpu0 = proc_cpu_seconds(server.pid)  # serving only: not the server's imports
        out = subprocess.run(
            [
                sys.executable,
                me,
                "clients",
                *common,
                "--timeout",
                str(timeout),
                "--stalled",
                str(stalled),
            ],
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout + 30,
        )
        if out.returncode != 0:
            raise RuntimeError(f"clients failed: {out.stderr[-2000:]}")
        result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        result["kind"] = kind if not stalled else f"{kind}+{stalled} stalled"
        result["server_cpu_s"] = proc_cpu_seconds(server.pid) - cpu0
        # what one delivery costs the server: comparable even when the clients set the rate
        result["server_us_per_delivery"] = (
            1e6 * result["server_cpu_s"] / max(result["delivered"], 1)
        )
        return result
    finally:
        server.kill()
        server.wait()


def compare(
    subscribers: int, events: int, batch: int, timeout: float = 60, rate: float = 0
) -> list[dict[str, Any]]:
    """Measure every kind in turn, in the same run."""
    return [measure(kind, subscribers, events, batch, timeout, rate) for kind in KINDS]


def stalled_peer(
    subscribers: int, events: int, batch: int, stalled: int = 1, timeout: float = 60
) -> list[dict[str, Any]]:
    """The nexus server without, then with ``stalled`` peers that stop reading."""
    return [measure("nexus", subscribers, events, batch, timeout, stalled=n) for n in (0, stalled)]


def table(results: list[dict[str, Any]]) -> str:
    lines = [
        f"{'server':<16} {'delivered/s':>12} {'p50 ms':>8} {'p99 ms':>8} {'srv cpu s':>9}"
        f" {'us/delivery':>11} {'client cpu':>10}  complete"
    ]
    for r in results:
        lines.append(
            f"{r['kind']:<16} {r['events_per_s']:>12,.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}"
            f" {r['server_cpu_s']:>9.2f} {r['server_us_per_delivery']:>11.3f}"
            f" {r['client_cpu_pct']:>9.0f}%"
            f"  {r['delivered']}/{r['expected']}"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", nargs="?", default="run", choices=("run", "serve", "clients"))
    parser.add_argument("kind", nargs="?", choices=KINDS)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--events", type=int, default=20000)
    parser.add_argument("--batch", type=int, default=50, help="events per commit / publish")
    parser.add_argument("--timeout", type=float, default=60)
    parser.add_argument(
        "--rate", type=float, default=0, help="published events/s (0 = as fast as possible)"
    )
    parser.add_argument(
        "--stalled",
        type=int,
        default=0,
        help="also run nexus with this many subscribers that stop reading",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:  # pragma: no cover
        pass
    if args.mode == "serve":
        fn = {"nexus": serve_nexus, "picows": serve_picows, "websockets": serve_websockets}[
            args.kind
        ]
        asyncio.run(fn(args.port, args.subscribers, args.events, args.batch))
    elif args.mode == "clients":
        result = asyncio.run(
            run_clients(args.port, args.subscribers, args.events, args.timeout, args.stalled)
        )
        print(json.dumps(result))
    else:
        results = compare(args.subscribers, args.events, args.batch, args.timeout, args.rate)
        if args.stalled:
            results += stalled_peer(
                args.subscribers, args.events, args.batch, args.stalled, args.timeout
            )[1:]
        print(json.dumps(results, indent=1) if args.json else table(results))


if __name__ == "__main__":
    main()
