"""Commands reach their node in messages under the gRPC limit (server.max_message_size).

The dispatcher batched by count only: ten 1 MB commands queued for one node went out as
one 10 MB ControlMessage, over the 4 MB limit, so the node's stream failed and none of
them arrived (a reconnect re-sent the same batch and failed again).
"""

from __future__ import annotations

import pytest

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import ServerProcess
from .test_nodes_api import NodeStream, register

pytestmark = pytest.mark.integration

MB = 1024 * 1024
LIMIT = 4 * MB  # server.max_message_size default, and grpc's default receive limit


def test_ten_1mb_commands_reach_one_node_under_the_message_limit(server: ServerProcess) -> None:
    with server.channel() as channel:
        nodes = pb_grpc.NodeServiceStub(channel)
        control = pb_grpc.ControlServiceStub(channel)
        epoch = register(nodes, "n1").session_epoch
        ids = [f"big-{i}" for i in range(10)]
        # Queued while the node has no stream, so they all leave in one dispatch pass.
        for n, command_id in enumerate(ids):  # one per call: a request is capped at 4 MB too
            control.SubmitCommands(
                pb.SubmitCommandsRequest(
                    commands=[
                        pb.CommandSpec(
                            idempotency_key=command_id,
                            kind="run",
                            target_node="n1",
                            payload=bytes([n]) * MB,
                        )
                    ]
                ),
                timeout=10,
            )
        stream = NodeStream(nodes, "n1", epoch)
        got: list[pb.Command] = []
        sizes: list[int] = []
        try:
            while len(got) < len(ids):
                message = stream.next(timeout=15)
                assert isinstance(message, pb.ControlMessage), message  # not an RpcError
                if message.commands:
                    sizes.append(message.ByteSize())
                    got.extend(message.commands)
            assert [c.id for c in got] == ids
            assert all(c.payload == bytes([n]) * MB for n, c in enumerate(got))
            assert all(size <= LIMIT for size in sizes) and len(sizes) >= 3, sizes
            stream.send(
                pb.NodeMessage(
                    results=[
                        pb.CommandResult(command_id=c.id, attempt=c.attempt, success=True)
                        for c in got
                    ]
                )
            )
            final = list(control.WaitCommands(pb.WaitCommandsRequest(ids=ids), timeout=15))
        finally:
            stream.close()
    assert sorted(r.id for r in final) == sorted(ids)
    assert all(r.state == pb.COMMAND_STATE_SUCCEEDED for r in final), final
    assert "Traceback" not in server.log()
