"""The dispatch baseline: our wire pattern with no work behind it (``--baseline``).

A grpc.aio server that speaks the RPCs ``nexus-bench dispatch`` uses (Register, the
Connect stream, SubmitCommands, WaitCommands, and ``/metrics`` for the succeeded count and
CPU) but does nothing a control plane must do: no validation, no placement (round robin),
no durable write, no state machine, no events. What is left is the transport: one unary
call per batch, one ``ControlMessage`` written to each node stream that gets a command
(through an ``asyncio.Queue`` and a writer task, as nexus_fast does), one ``NodeMessage``
read back. Its commands/s is the most any grpc.aio server with this message pattern can
reach on the machine, with the same client; the unary echo x batch size (the dispatch
target's yardstick) leaves out the node streams.

Started by nexus-bench as ``python -m nexus_fast.benchmark.baselines dispatch-floor --port P
--http-port H``.
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any

import grpc
from prometheus_client import Counter, start_http_server

from nexus_fast.benchmark.base import MAX_MESSAGE, until_signal
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

SUCCEEDED = Counter(
    "nexus_commands_processed_total", "Commands that reached a final state.", ["status"]
).labels(status="succeeded")
STREAM_QUEUE = 1024  # messages per node stream, as nexus_fast's session queue
DONE_KEPT = 200_000  # finished ids remembered for WaitCommands


class Floor(pb_grpc.NodeServiceServicer, pb_grpc.ControlServiceServicer):
    """Round-robin nodes, answer at once; remember only open streams and finished ids."""

    def __init__(self) -> None:
        self.queues: list[asyncio.Queue[pb.ControlMessage | None]] = []
        self.turn = itertools.count()
        self.ids = itertools.count(1)
        self.done: dict[str, None] = {}  # insertion-ordered: the oldest go first
        self.waiters: dict[str, asyncio.Future[None]] = {}

    async def Register(self, request: Any, context: Any) -> pb.RegisterResponse:
        return pb.RegisterResponse(
            session_epoch=1, config=pb.NodeConfig(heartbeat_interval_ms=5000)
        )

    async def Connect(self, request_iterator: Any, context: Any) -> None:
        first = await context.read()
        if first is grpc.aio.EOF:
            return
        queue: asyncio.Queue[pb.ControlMessage | None] = asyncio.Queue(STREAM_QUEUE)
        self.queues.append(queue)
        reader = asyncio.ensure_future(self._read_loop(context))
        try:
            while (message := await queue.get()) is not None:
                await context.write(message)
        finally:
            self.queues.remove(queue)
            reader.cancel()

    async def _read_loop(self, context: Any) -> None:
        while (message := await context.read()) is not grpc.aio.EOF:
            if message.results:
                SUCCEEDED.inc(len(message.results))
                for result in message.results:
                    self._finished(result.command_id)

    def _finished(self, command_id: str) -> None:
        self.done[command_id] = None
        if len(self.done) > DONE_KEPT:
            del self.done[next(iter(self.done))]
        waiter = self.waiters.pop(command_id, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def SubmitCommands(self, request: Any, context: Any) -> pb.SubmitCommandsResponse:
        queues = self.queues
        if not queues:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "no node is connected")
        # Messages built in place (add()), as nexus_fast builds them: no copies.
        per_node: dict[int, pb.ControlMessage] = {}
        response = pb.SubmitCommandsResponse()
        for spec in request.commands:
            command_id = spec.idempotency_key or f"c{next(self.ids)}"
            node = next(self.turn) % len(queues)
            message = per_node.get(node)
            if message is None:
                message = per_node[node] = pb.ControlMessage()
            message.commands.add(id=command_id, kind=spec.kind, payload=spec.payload, attempt=1)
            response.results.add(
                id=command_id, state=pb.COMMAND_STATE_PLACED, node_id=f"node-{node}"
            )
        for node, message in per_node.items():
            queues[node].put_nowait(message)
        return response

    async def WaitCommands(self, request: Any, context: Any) -> Any:
        timeout = request.timeout_ms / 1000 or None
        for command_id in request.ids:
            if command_id not in self.done:
                waiter = self.waiters.get(command_id)
                if waiter is None:
                    waiter = self.waiters[command_id] = asyncio.get_running_loop().create_future()
                await asyncio.wait_for(asyncio.shield(waiter), timeout)
            yield pb.CommandRecord(id=command_id, state=pb.COMMAND_STATE_SUCCEEDED)


async def serve(grpc_port: int, http_port: int) -> None:
    """Serve on 127.0.0.1 until SIGTERM or SIGINT."""
    start_http_server(http_port, addr="127.0.0.1")
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            ("grpc.max_send_message_length", MAX_MESSAGE),
        ]
    )
    floor = Floor()
    pb_grpc.add_NodeServiceServicer_to_server(floor, server)
    pb_grpc.add_ControlServiceServicer_to_server(floor, server)
    server.add_insecure_port(f"127.0.0.1:{grpc_port}")
    await server.start()
    await until_signal()
    await server.stop(1)
