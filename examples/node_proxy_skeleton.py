#!/usr/bin/env python3
"""The smallest correct node proxy: register, stream, de-duplicate, ack, result, reconnect.

Copy it as the start of a proxy in any language; every rule it follows is in docs/api.md:

1. ``Register`` gives a ``session_epoch``; the first ``NodeMessage`` on ``Connect`` carries it
   with the node id. The server then sends ``NodeConfig`` (heartbeat interval) first.
2. Send something at least every ``heartbeat_interval_ms`` or the node goes down.
3. Delivery is at-least-once: the same command id comes again after a reconnect or a server
   restart. Ack every command at once, run each id only once, and answer a repeat of a
   finished one with its stored result (the first answer may have been lost). One exception:
   a command that failed here and comes back with a higher ``attempt`` is a retry on this
   node (``target_node`` commands retry on their node): run it again. This skeleton keeps
   its record in memory, so "once" holds only while it lives; a proxy that must not run a
   command twice across its own restarts keeps the record durably (fsync "started" before
   running, the outcome before reporting it, answer an interrupted one "failed"): see
   docs/reliability.md and ``nexus-node --state-dir`` (nexus_fast/node/dedup.py).
4. The stream ends (``ABORTED`` superseded, ``UNAVAILABLE`` server gone or restarting,
   ``FAILED_PRECONDITION``/``NOT_FOUND`` after a restore or removal, or OK): register again
   with exponential backoff and jitter. Only ``INVALID_ARGUMENT`` is a bug to fix, not retry.

Run against a server:  python examples/node_proxy_skeleton.py --target 127.0.0.1:50053
It runs two command kinds: ``echo`` (output = payload) and ``sleep`` (payload = seconds).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import random
import signal
from collections import OrderedDict
from collections.abc import AsyncIterator
from typing import Any

import grpc

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

log = logging.getLogger("proxy")

# Stream endings after which registering again is the fix.
RETRYABLE = {
    grpc.StatusCode.UNAVAILABLE,  # server down, restarting, or this stream fell behind
    grpc.StatusCode.ABORTED,  # superseded by a newer Register/stream of this node id
    grpc.StatusCode.FAILED_PRECONDITION,  # session epoch no longer current
    grpc.StatusCode.NOT_FOUND,  # the node was removed by an operator
    grpc.StatusCode.RESOURCE_EXHAUSTED,  # store full: wait and retry
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
}
MAX_REMEMBERED = 10_000  # finished command ids kept for de-duplication (bounded)


class Proxy:
    """One node: its identity, the commands it runs, and what it has already answered."""

    def __init__(self, target: str, node_id: str, labels: dict[str, str]) -> None:
        self.target = target
        self.node_id = node_id
        self.labels = labels
        self.running: dict[str, asyncio.Task[None]] = {}
        self.finished: OrderedDict[str, pb.CommandResult] = OrderedDict()
        # Survives reconnects: a result produced while disconnected goes out on the next stream.
        self.outbox: asyncio.Queue[pb.NodeMessage] = asyncio.Queue()
        self.heartbeat_interval = 5.0

    async def run_forever(self, stop: asyncio.Event) -> None:
        backoff = 0.5
        while not stop.is_set():
            try:
                async with grpc.aio.insecure_channel(self.target) as channel:
                    await self.session(pb_grpc.NodeServiceStub(channel), stop)
                backoff = 0.5  # the stream ended cleanly (server asked us to go)
            except grpc.aio.AioRpcError as exc:
                if exc.code() not in RETRYABLE:
                    raise  # INVALID_ARGUMENT and friends: a bug in this proxy, not a blip
                log.info("stream ended: %s %s", exc.code().name, exc.details())
            if stop.is_set():
                return
            delay = backoff * random.uniform(0.5, 1.5)
            backoff = min(backoff * 2, 30.0)
            log.info("reconnecting in %.1fs", delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    async def session(self, node: pb_grpc.NodeServiceStub, stop: asyncio.Event) -> None:
        """Register, then serve one Connect stream until it ends or ``stop`` is set."""
        registered = await node.Register(
            pb.RegisterRequest(
                node_id=self.node_id,
                labels=self.labels,
                capacity=pb.Resources(cpu=4, memory=8 << 30),
                version="skeleton/1",
            ),
            timeout=10,
        )
        self.heartbeat_interval = registered.config.heartbeat_interval_ms / 1000 or 5.0
        log.info("registered %s epoch %d", self.node_id, registered.session_epoch)
        call = node.Connect(self.upstream(registered.session_epoch))
        ended = asyncio.ensure_future(stop.wait())
        try:
            async for message in _until(call, ended):
                self.handle(message)
        finally:
            ended.cancel()
            call.cancel()

    async def upstream(self, epoch: int) -> AsyncIterator[pb.NodeMessage]:
        """Messages to the server: who we are first, then reports, with heartbeats between."""
        yield pb.NodeMessage(node_id=self.node_id, session_epoch=epoch, heartbeat=pb.Heartbeat())
        while True:
            try:
                message = await asyncio.wait_for(self.outbox.get(), self.heartbeat_interval)
            except TimeoutError:
                message = pb.NodeMessage(
                    heartbeat=pb.Heartbeat(usage=pb.Resources(cpu=len(self.running)))
                )
            yield message

    def handle(self, message: pb.ControlMessage) -> None:
        if message.HasField("config"):
            self.heartbeat_interval = message.config.heartbeat_interval_ms / 1000 or 5.0
        if message.HasField("drain"):
            log.info("drain=%s %s", message.drain.draining, message.drain.reason)
        acks = []
        repeats = []
        for command in message.commands:
            acks.append(pb.CommandAck(command_id=command.id, attempt=command.attempt))
            done = self.finished.get(command.id)
            if done is not None and not done.success and command.attempt > done.attempt:
                del self.finished[command.id]  # a retry of a failed one: run it again
                done = None
            if done is not None:  # a repeat of a finished one: answer again
                log.info("repeat of finished %s: sending its result again", command.id)
                repeats.append(done)
            elif command.id in self.running:  # a repeat of a running one: nothing to do
                log.info("repeat of running %s: ignored", command.id)
            else:
                self.running[command.id] = asyncio.ensure_future(self.execute(command))
        if acks or repeats:
            self.outbox.put_nowait(pb.NodeMessage(acks=acks, results=repeats))
        for command_id in message.cancel_command_ids:
            running = self.running.get(command_id)
            if running is not None:
                running.cancel()

    async def execute(self, command: pb.Command) -> None:
        log.info("executing %s kind=%s attempt=%d", command.id, command.kind, command.attempt)
        result = pb.CommandResult(command_id=command.id, attempt=command.attempt)
        try:
            if command.kind == "echo":
                result.success, result.output = True, command.payload
            elif command.kind == "sleep":
                await asyncio.sleep(float(command.payload or b"1"))
                result.success, result.output = True, b"slept"
            else:
                result.error = f"unknown kind {command.kind!r}"
        except asyncio.CancelledError:
            result.error = "cancelled"
        finally:
            del self.running[command.id]
        self.finished[command.id] = result
        while len(self.finished) > MAX_REMEMBERED:
            self.finished.popitem(last=False)
        log.info("finished %s success=%s", command.id, result.success)
        self.outbox.put_nowait(pb.NodeMessage(results=[result]))


async def _until(
    call: AsyncIterator[pb.ControlMessage], ended: asyncio.Future[Any]
) -> AsyncIterator[pb.ControlMessage]:
    """Messages of the stream until it ends or ``ended`` (a stop request) completes."""
    stream = call.__aiter__()
    while True:
        nxt = asyncio.ensure_future(stream.__anext__())
        await asyncio.wait({nxt, ended}, return_when=asyncio.FIRST_COMPLETED)
        if not nxt.done():
            nxt.cancel()
            return
        try:
            yield nxt.result()
        except StopAsyncIteration:
            return


async def main() -> None:
    parser = argparse.ArgumentParser(description="Minimal nexus_fast node proxy.")
    parser.add_argument("--target", default="127.0.0.1:50053")
    parser.add_argument("--node-id", default="skeleton-1")
    parser.add_argument("--labels", default="", help="k=v,k2=v2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    labels = dict(p.split("=", 1) for p in args.labels.split(",") if p)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await Proxy(args.target, args.node_id, labels).run_forever(stop)


if __name__ == "__main__":
    asyncio.run(main())
