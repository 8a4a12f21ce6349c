"""Which way ends a grpc.aio server-streaming call whose client never reads, and frees it?

N clients open a stream with a small, fixed flow-control window (no BDP probing, little
lookahead) and never read; each server handler has a fresh 1 MiB write pending in gRPC
core. Then one action is tried on all of them, and this prints whether the handlers ended,
what the clients see when they read afterwards, and the server's heap (RssAnon) before and
after. docs/reliability.md ("Stuck peers") has the figures.

    .venv/bin/python bench/grpc_stuck_write.py none|cancel|abort|age|keepalive|shutdown
"""

from __future__ import annotations

import asyncio
import gc
import sys
import time
from typing import Any

import grpc
import grpc.aio

from nexus_fast.api.grpc_stuck import parse_peer, shutdown_peer_socket

N = 40


def heap_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return 0.0


async def main(mode: str) -> None:
    contexts: list[Any] = []
    tasks: list[asyncio.Task[Any]] = []
    ended: list[str] = []

    peers: list[str] = []

    async def handler(request: bytes, context: Any) -> Any:
        contexts.append(context)
        peers.append(context.peer())  # never ask a finished call's context
        current = asyncio.current_task()
        assert current is not None
        tasks.append(current)
        try:
            for _ in range(4):
                await context.write(b"s" * 8192)
            while True:
                await context.write(b"\x01" * (1 << 20))  # a fresh, touched MiB each time
        except BaseException as exc:
            ended.append(type(exc).__name__)
            raise

    options: list[tuple[str, Any]] = []
    if mode == "age":
        options = [("grpc.max_connection_age_ms", 3000), ("grpc.max_connection_age_grace_ms", 500)]
    if mode == "keepalive":
        options = [("grpc.keepalive_time_ms", 1000), ("grpc.keepalive_timeout_ms", 500)]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers(
        (
            grpc.method_handlers_generic_handler(
                "t.S", {"W": grpc.unary_stream_rpc_method_handler(handler)}
            ),
        )
    )
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    base = heap_mib()
    client_options = [("grpc.http2.bdp_probe", 0), ("grpc.http2.lookahead_bytes", 1024)]
    channels = [
        grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=client_options) for _ in range(N)
    ]
    calls = [ch.unary_stream("/t.S/W")(b"") for ch in channels]
    await asyncio.sleep(2.0)
    gc.collect()
    stalled = heap_mib() - base
    started = time.monotonic()
    if mode == "cancel":
        for task in tasks:
            task.cancel()
    elif mode == "abort":

        async def abort(context: Any) -> str:
            try:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "slow consumer")
            except BaseException as exc:
                return type(exc).__name__
            return "returned"

        print("abort() raised:", set(await asyncio.gather(*(abort(c) for c in contexts))))
    elif mode == "shutdown":
        for text in peers:
            peer = parse_peer(text)
            assert peer is not None
            await asyncio.to_thread(shutdown_peer_socket, peer, frozenset({port}))
    await asyncio.sleep(4.5)
    contexts.clear()
    tasks.clear()
    gc.collect()
    print(
        f"{mode}: {N} stalled streams held {stalled:.0f} MiB of heap; after the action "
        f"{heap_mib() - base:.0f} MiB; handlers ended: {len(ended)} {sorted(set(ended))}; "
        f"{time.monotonic() - started:.1f}s"
    )
    outcomes: dict[str, int] = {}
    for call in calls[:5]:
        received = 0
        try:
            async with asyncio.timeout(3):
                async for _ in call:
                    received += 1
            key = "ended OK"
        except TimeoutError:
            key = "still open after 3 s of reading"
        except grpc.aio.AioRpcError as err:
            key = f"{err.code().name}: {err.details()}"
        outcomes[key] = outcomes.get(key, 0) + 1
    print("  the clients, reading afterwards:", outcomes)
    for ch in channels:
        await ch.close()
    await server.stop(0.2)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "shutdown"))
