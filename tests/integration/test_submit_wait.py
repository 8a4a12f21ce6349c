"""Submit and wait (``SubmitCommandsRequest.wait_ms``) against the real server and nexus-node.

The reply carries the final records of the commands that finished within ``wait_ms``; the
others come back as submitted, without an error; the records it reports are durable.
"""

from __future__ import annotations

import grpc
import pytest

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import ServerProcess, list_all_nodes, wait_for

pytestmark = pytest.mark.integration


def _spec(tier: str, key: str = "") -> pb.CommandSpec:
    return pb.CommandSpec(
        idempotency_key=key,
        kind="run",
        payload=b"p",
        placement=pb.Placement(label_selector={"tier": tier}),
    )


def test_submit_and_wait_returns_final_records_or_the_submitted_state(
    server: ServerProcess, fleet_factory: type
) -> None:
    fleet_factory.create(server, 1, "--exec-duration", "0", "--labels", "tier=fast")
    fleet_factory.create(
        server, 1, "--exec-duration", "60", "--labels", "tier=slow", "--id-prefix", "slow-"
    )
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        wait_for(
            lambda: len(list_all_nodes(control, (pb.NODE_STATUS_READY,))) == 2, 30, message="nodes"
        )
        # Two fast commands, one of them twice (a duplicate counts once in `final`).
        reply = control.SubmitCommands(
            pb.SubmitCommandsRequest(
                commands=[_spec("fast", "sw-a"), _spec("fast", "sw-b"), _spec("fast", "sw-a")],
                wait_ms=20_000,
            ),
            timeout=30,
        )
        assert [r.id for r in reply.results] == ["sw-a", "sw-b", "sw-a"]
        assert [r.state for r in reply.results] == [pb.COMMAND_STATE_SUCCEEDED] * 3
        assert [r.duplicate for r in reply.results] == [False, False, True]
        assert [(f.id, f.state) for f in reply.final] == [
            ("sw-a", pb.COMMAND_STATE_SUCCEEDED),
            ("sw-b", pb.COMMAND_STATE_SUCCEEDED),
        ]
        assert reply.final[0].output == b"ok" and reply.final[0].finished_ms > 0
        # What the reply reported is what the server keeps.
        stored = control.GetCommand(pb.GetCommandRequest(id="sw-a"), timeout=5)
        assert stored.state == pb.COMMAND_STATE_SUCCEEDED

        # Already final: a repeat answers with the final record at once.
        again = control.SubmitCommands(
            pb.SubmitCommandsRequest(commands=[_spec("fast", "sw-b")], wait_ms=5000), timeout=30
        )
        assert again.results[0].duplicate and [f.id for f in again.final] == ["sw-b"]

        # Not final within wait_ms: it comes back as it is, no error, no final record.
        slow = control.SubmitCommands(
            pb.SubmitCommandsRequest(commands=[_spec("slow", "sw-slow")], wait_ms=300),
            timeout=30,
        )
        assert not slow.final
        assert slow.results[0].state in (
            pb.COMMAND_STATE_PLACED,
            pb.COMMAND_STATE_DISPATCHED,
            pb.COMMAND_STATE_ACKED,
        )
        assert slow.results[0].node_id.startswith("slow-")

        # wait_ms 0 is the plain submit: answered once durable, before the command ends.
        plain = control.SubmitCommands(
            pb.SubmitCommandsRequest(commands=[_spec("slow", "sw-plain")]), timeout=30
        )
        assert plain.results[0].state == pb.COMMAND_STATE_PLACED and not plain.final

        # A bad batch is refused before anything is submitted, waiting or not.
        with pytest.raises(grpc.RpcError) as refused:
            control.SubmitCommands(pb.SubmitCommandsRequest(wait_ms=1000), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
