"""Size caps against the real server: agent specs stored once, node output capped, list
pages that always fit the message limit, node capacity bounded (issue 9, "Size caps")."""

from __future__ import annotations

import json
import math
from pathlib import Path

import grpc
import orjson
import pytest

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import REPO, ServerProcess, http_get
from .test_nodes_api import NodeStream

KB = 1024
MB = 1024 * KB
GiB = 1024 * MB
TB = 1024 * GiB


def store_size(server: ServerProcess) -> int:
    """Bytes in use in the LMDB data file, as /health/detailed reports them."""
    status, body, _ = http_get(server.http_base + "/health/detailed")
    assert status == 200, body
    return int(json.loads(body)["components"]["store"]["size_bytes"])


def register(
    stub: pb_grpc.NodeServiceStub,
    node_id: str,
    capacity: pb.Resources | None = None,
    **labels: str,
) -> pb.RegisterResponse:
    return stub.Register(
        pb.RegisterRequest(
            node_id=node_id,
            labels=labels,
            capacity=capacity or pb.Resources(cpu=64, memory=64 * GiB, gpu=1, disk=100 * GiB),
        ),
        timeout=5,
    )


def next_commands(stream: NodeStream, count: int) -> list[pb.Command]:
    got: list[pb.Command] = []
    while len(got) < count:
        message = stream.next(timeout=10)
        assert isinstance(message, pb.ControlMessage), message
        got.extend(message.commands)
    return got


def test_agent_spec_is_stored_once_not_per_replica(server: ServerProcess) -> None:
    """A max-size spec x 100 replicas grows the store by about one spec (it was ~3 x 100)."""
    spec = b"s" * (256 * KB)  # agents.max_spec_bytes
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        nodes = pb_grpc.NodeServiceStub(channel)
        # "idle" never connects: its start commands stay queued (and stored) as placed.
        register(nodes, "idle", pool="a")
        before = store_size(server)
        reply = control.DeployAgent(
            pb.DeployAgentRequest(
                spec=pb.AgentSpec(
                    name="big",
                    spec=spec,
                    request=pb.Resources(cpu=0.1),
                    replicas=100,
                    placement=pb.Placement(label_selector={"pool": "a"}),
                )
            ),
            timeout=30,
        )
        assert len(reply.agents) == 100
        assert all(a.node_id == "idle" and a.spec_size == len(spec) for a in reply.agents)
        assert not any(a.spec.spec for a in reply.agents)  # the response holds no copies
        grown = store_size(server) - before
        # Before: 100 replica records + 100 events + 100 start commands, each with the spec.
        assert grown < 4 * len(spec), f"store grew {grown} bytes for one {len(spec)}-byte spec"
        assert control.GetAgent(pb.GetAgentRequest(id="big-42"), timeout=5).spec.spec == spec
        listed = control.ListAgents(pb.ListAgentsRequest(name="big"), timeout=5)
        assert len(listed.agents) == 100 and not listed.next_page_token

        # A connected node gets the spec in its agent.start commands, built at dispatch.
        epoch = register(nodes, "live", pool="b").session_epoch
        stream = NodeStream(nodes, "live", epoch)
        control.DeployAgent(
            pb.DeployAgentRequest(
                spec=pb.AgentSpec(
                    name="live",
                    spec=spec,
                    request=pb.Resources(cpu=1),
                    replicas=3,
                    placement=pb.Placement(label_selector={"pool": "b"}),
                )
            ),
            timeout=10,
        )
        starts = [c for c in next_commands(stream, 3) if c.kind == "agent.start"]
        assert len(starts) == 3
        assert all(orjson.loads(c.payload)["spec"] == spec.decode() for c in starts)
        stored = control.GetCommand(pb.GetCommandRequest(id=starts[0].id), timeout=5)
        assert len(stored.spec.payload) < 1 * KB  # the record keeps a reference
        stream.close()

        # Over either limit: INVALID_ARGUMENT naming the field, nothing written.
        for bad, field in (
            (pb.AgentSpec(name="huge", spec=spec + b"!"), "spec.spec"),
            (pb.AgentSpec(name="many", spec=b"x", replicas=1001), "spec.replicas"),
        ):
            with pytest.raises(grpc.RpcError) as err:
                control.DeployAgent(pb.DeployAgentRequest(spec=bad), timeout=5)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert field in (err.value.details() or "")
        names = {a.name for a in control.ListAgents(pb.ListAgentsRequest(), timeout=5).agents}
        assert names == {"big", "live"}


def test_node_reported_output_and_error_are_capped(server: ServerProcess) -> None:
    cap = 64 * KB  # commands.max_output_size
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        nodes = pb_grpc.NodeServiceStub(channel)
        stream = NodeStream(nodes, "n1", register(nodes, "n1").session_epoch)
        control.SubmitCommands(
            pb.SubmitCommandsRequest(
                commands=[
                    # One attempt: a failed target_node command would otherwise be retried.
                    pb.CommandSpec(idempotency_key=i, kind="run", target_node="n1", max_attempts=1)
                    for i in ("loud", "angry", "quiet")
                ]
            ),
            timeout=5,
        )
        assert {c.id for c in next_commands(stream, 3)} == {"loud", "angry", "quiet"}
        stream.send(
            pb.NodeMessage(
                results=[
                    pb.CommandResult(command_id="loud", success=True, output=b"o" * (2 * MB)),
                    pb.CommandResult(command_id="angry", success=False, error="e" * (1 * MB)),
                    pb.CommandResult(command_id="quiet", success=True, output=b"fine"),
                ]
            )
        )
        done = list(
            control.WaitCommands(pb.WaitCommandsRequest(ids=["loud", "angry", "quiet"]), timeout=10)
        )
        assert len(done) == 3
        loud = control.GetCommand(pb.GetCommandRequest(id="loud"), timeout=5)
        assert loud.output == b"o" * cap and loud.output_truncated
        angry = control.GetCommand(pb.GetCommandRequest(id="angry"), timeout=5)
        assert angry.state == pb.COMMAND_STATE_FAILED and angry.error_truncated
        assert angry.reason == "e" * cap and not angry.output_truncated
        quiet = control.GetCommand(pb.GetCommandRequest(id="quiet"), timeout=5)
        assert quiet.output == b"fine" and not quiet.output_truncated
        stream.close()


def test_five_1mb_commands_then_the_default_list_pages_through_them(
    server: ServerProcess,
) -> None:
    """Five 1 MB commands made the default ListCommands fail for everyone (over 4 MB)."""
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        ids = [f"big-{i}" for i in range(5)]
        for command_id in ids:  # no node: they wait, pending, with their payloads
            control.SubmitCommands(
                pb.SubmitCommandsRequest(
                    commands=[
                        pb.CommandSpec(idempotency_key=command_id, kind="run", payload=b"p" * MB)
                    ]
                ),
                timeout=10,
            )
        control.SubmitCommands(
            pb.SubmitCommandsRequest(commands=[pb.CommandSpec(idempotency_key="tiny", kind="x")]),
            timeout=5,
        )
        seen: list[str] = []
        token = ""
        pages = 0
        while True:
            reply = control.ListCommands(pb.ListCommandsRequest(page_token=token), timeout=10)
            assert reply.ByteSize() <= 4 * MB
            assert reply.commands, "a page always makes progress"
            seen += [c.id for c in reply.commands]
            pages += 1
            token = reply.next_page_token
            if not token:
                break
        assert seen == [*ids, "tiny"] and pages >= 2
        # Paging by bytes left every record whole.
        for command_id in ids:
            record = control.GetCommand(pb.GetCommandRequest(id=command_id), timeout=5)
            assert len(record.spec.payload) == MB


def test_list_nodes_pages_fit_the_message_limit(server: ServerProcess) -> None:
    """250 nodes with 64 long labels each are ~5 MB: one default page used to overflow."""
    labels = {f"label-{i:02d}-" + "k" * 50: "v" * 256 for i in range(64)}
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        nodes = pb_grpc.NodeServiceStub(channel)
        ids = [f"node-{i:03d}" for i in range(250)]
        for node_id in ids:
            register(nodes, node_id, **labels)
        seen: list[str] = []
        token = ""
        while True:
            reply = control.ListNodes(pb.ListNodesRequest(page_token=token), timeout=10)
            assert reply.nodes and reply.ByteSize() <= 4 * MB
            assert reply.total_matched == 250
            seen += [n.id for n in reply.nodes]
            token = reply.next_page_token
            if not token:
                break
        assert seen == ids


OVER_THE_BOUND = [
    (pb.Resources(cpu=1e300), "capacity.cpu"),
    (pb.Resources(cpu=4097), "capacity.cpu"),
    (pb.Resources(memory=65 * TB), "capacity.memory"),
    (pb.Resources(gpu=1025), "capacity.gpu"),
    (pb.Resources(disk=1025 * TB), "capacity.disk"),
    (pb.Resources(cpu=math.nan), "capacity.cpu"),
    (pb.Resources(gpu=math.inf), "capacity.gpu"),
    (pb.Resources(memory=-1), "capacity.memory"),
]


def test_register_with_capacity_over_the_bound_is_refused(server: ServerProcess) -> None:
    """A rogue node with 1e300 cpus would win every untargeted placement: refused."""
    with server.channel() as channel:
        nodes = pb_grpc.NodeServiceStub(channel)
        control = pb_grpc.ControlServiceStub(channel)
        for capacity, field in OVER_THE_BOUND:
            with pytest.raises(grpc.RpcError) as err:
                register(nodes, "rogue", capacity)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, capacity
            assert field in (err.value.details() or ""), (capacity, err.value.details())
        assert not control.ListNodes(pb.ListNodesRequest(), timeout=5).nodes
        # At the bound it registers.
        at_bound = pb.Resources(cpu=4096, memory=64 * TB, gpu=1024, disk=1024 * TB)
        assert register(nodes, "big-but-fine", at_bound).node.capacity.cpu == 4096


def test_capacity_bound_comes_from_the_config(server_factory: type, tmp_path: Path) -> None:
    config = tmp_path / "caps.toml"
    config.write_text(
        (REPO / "configs" / "development.toml")
        .read_text()
        .replace("max_cpu = 4096.0", "max_cpu = 16")
    )
    server = server_factory.create(config=config).start()
    with server.channel() as channel:
        nodes = pb_grpc.NodeServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            register(nodes, "n1", pb.Resources(cpu=17))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "capacity.cpu" in (err.value.details() or "")
        assert "nodes.max_cpu" in (err.value.details() or "")
        assert register(nodes, "n1", pb.Resources(cpu=16)).node.capacity.cpu == 16
