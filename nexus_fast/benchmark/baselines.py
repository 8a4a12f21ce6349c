"""Baseline servers: the bare limits each scenario is judged against.

Run as ``python -m nexus_fast.benchmark.baselines grpc --port P`` (a bare grpc.aio server
with a unary echo and a bidi echo, raw bytes in and out: no protobuf parsing, no work) or
``... picows --port P --subscribers M --frame FILE --duration S`` (a bare picows server
that broadcasts the same pre-encoded frame bytes to every subscriber, as fast as their
sockets take them), or ``... dispatch-floor --port P --http-port H`` (our dispatch RPCs with
no work behind them: :mod:`nexus_fast.benchmark.floor`). Each runs on uvloop in its own process, like the real server.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson

from nexus_fast.benchmark.base import MAX_MESSAGE, until_signal

ECHO_SERVICE = "nexus.bench.Echo"
UNARY_METHOD = f"/{ECHO_SERVICE}/Unary"
STREAM_METHOD = f"/{ECHO_SERVICE}/Stream"
GC_THRESHOLD = 20000  # nexus_fast's default performance.gc_threshold
WRITE_BUFFER_HIGH = 64 * 1024  # pause broadcasting while a subscriber lags this much


async def serve_grpc(port: int) -> None:
    """A bare grpc.aio echo server (same server options as nexus_fast's) until SIGTERM."""
    import grpc

    async def unary(request: bytes, context: Any) -> bytes:
        return request

    async def stream(request_iterator: Any, context: Any) -> None:
        while True:
            message = await context.read()
            if message is grpc.aio.EOF:
                return
            await context.write(message)

    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
    )
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                ECHO_SERVICE,
                {
                    "Unary": grpc.unary_unary_rpc_method_handler(unary),
                    "Stream": grpc.stream_stream_rpc_method_handler(stream),
                },
            ),
        )
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await until_signal()
    await server.stop(0.5)


async def serve_picows(port: int, subscribers: int, frame: bytes, duration: float) -> None:
    """Broadcast ``frame`` (an ``events`` frame, re-stamped) to every subscriber.

    Starts when ``subscribers`` clients have sent a ``subscribe`` op; each broadcast takes
    the template frame, gives its events fresh indices and ``time_ms`` (so the client
    measures publish -> receive latency the same way), encodes it once and sends the same
    bytes to everyone. Stops after ``duration`` seconds and sends ``{"type":"done"}``.
    """
    from picows import WSListener, WSMsgType, WSTransport, ws_create_server

    template: dict[str, Any] = orjson.loads(frame)
    events: list[dict[str, Any]] = template.get("events") or [{"payload": {}}]
    template["events"] = events
    conns: list[WSTransport] = []
    ready = asyncio.Event()

    class Listener(WSListener):
        def on_ws_frame(self, transport: WSTransport, ws_frame: Any) -> None:
            if ws_frame.msg_type != WSMsgType.TEXT:
                return
            msg = orjson.loads(ws_frame.get_payload_as_bytes())
            if msg.get("op") == "subscribe":
                reply = {"type": "subscribed", "subscription": "s1", "id": msg.get("id")}
                transport.send(WSMsgType.TEXT, orjson.dumps(reply))
                conns.append(transport)
                if len(conns) >= subscribers:
                    ready.set()

        def on_ws_disconnected(self, transport: WSTransport) -> None:
            if transport in conns:
                conns.remove(transport)

    server = await ws_create_server(lambda _: Listener(), "127.0.0.1", port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    waiter = asyncio.ensure_future(stop.wait())
    await asyncio.wait([asyncio.ensure_future(ready.wait()), waiter], return_when="FIRST_COMPLETED")
    index = 0
    end = time.monotonic() + duration
    while not stop.is_set() and time.monotonic() < end and conns:
        now_ms = int(time.time() * 1000)
        for ev in events:
            index += 1
            ev["index"] = index
            ev["time_ms"] = now_ms
        data = orjson.dumps(template)  # encoded once, the same bytes for every subscriber
        lagging = False
        for t in conns:
            t.send(WSMsgType.TEXT, data)
            if t.underlying_transport.get_write_buffer_size() > WRITE_BUFFER_HIGH:
                lagging = True
        # Yield every broadcast (as the real server does between commits); back off on lag.
        await asyncio.sleep(0.001 if lagging else 0)
    for t in list(conns):
        t.send(WSMsgType.TEXT, b'{"type":"done"}')
    # Stay up until told to stop: exiting now would drop what is still buffered for slow
    # subscribers, "done" included.
    await waiter
    server.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the baseline server processes."""
    parser = argparse.ArgumentParser(prog="nexus-bench-baseline", description=__doc__)
    parser.add_argument("kind", choices=("grpc", "picows", "dispatch-floor"))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--http-port", type=int, help="/metrics port (dispatch-floor)")
    parser.add_argument("--subscribers", type=int, default=1)
    parser.add_argument("--frame", help="file with a template events frame (picows)")
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args(argv)
    import uvloop

    # The runtime settings the server under test runs with (performance.gc_threshold), so
    # the comparison is of the servers, not of their garbage collector settings.
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, *gc.get_threshold()[1:])

    if args.kind == "grpc":
        uvloop.run(serve_grpc(args.port))
    elif args.kind == "dispatch-floor":
        from nexus_fast.benchmark.floor import serve

        if args.http_port is None:
            parser.error("dispatch-floor needs --http-port")
        uvloop.run(serve(args.port, args.http_port))
    else:
        frame = b'{"type":"events","events":[{"payload":{}}]}'
        if args.frame:
            with open(args.frame, "rb") as fp:
                frame = fp.read()
        uvloop.run(serve_picows(args.port, args.subscribers, frame, args.duration))
    return 0


if __name__ == "__main__":
    sys.exit(main())
