"""Stuck peers against the real server: they are cut off, and nobody else notices.

A gRPC WatchEvents client that never reads (its write waits on HTTP/2 flow control), a
WebSocket subscriber that never reads, a node stream that receives commands and never
acks them, and HTTP connections that never finish their headers.
"""

from __future__ import annotations

import asyncio
import re
import socket
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
    metric,
)

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 40.0) -> T:
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
        wait_for(lambda: sample(server, "nexus_event_subscriptions_active", transport="grpc") == 2, 5)
        started = time.monotonic()
        await activity.run_async(20, limit_per_worker=150)  # ~300 events, 6x the bound
        wait_for(
            lambda: sample(server, "nexus_event_slow_consumer_disconnects_total", transport="grpc")
            >= 1,
            10,
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
        wait_for(lambda: sample(server, "nexus_event_subscriptions_active", transport="grpc") == 1, 5)
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
    activity = Activity(server, workers=2, nodes_per_worker=3, big=True)

    async def body() -> None:
        healthy = GrpcWatcher(server, after_index=0)
        stuck = await PicowsClient.connect(server, rcvbuf=4096)
        await stuck.subscribe()
        stuck.pause_reading()  # never reads again: the server's socket fills
        # ~600 events of ~16 KB: more than the socket buffers hold, then 50 more.
        await activity.run_async(20, limit_per_worker=300)
        wait_for(
            lambda: sample(server, "nexus_event_slow_consumer_disconnects_total", transport="websocket")
            >= 1,
            10,
            message="stuck websocket subscriber cut off",
        )
        stuck.resume_reading()
        code, reason = await asyncio.wait_for(stuck.rec.closed, 5)
        assert code == 4008 and re.fullmatch(r"slow consumer; resume after index \d+", reason)
        end = last_event_index(server)
        stream = await healthy.until(end)
        assert_exactly_once_in_order(stream.indices, 0, end, "healthy watcher")
        await healthy.close()
        await stuck.close()

    run(body())
