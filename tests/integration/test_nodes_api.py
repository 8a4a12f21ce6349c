"""NodeService and ControlService against the real server over loopback gRPC."""

from __future__ import annotations

import math
import queue
import threading
from collections.abc import Iterator

import grpc
import pytest

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import ServerProcess, list_all_nodes, wait_for

GiB = 1024**3


def register(stub: pb_grpc.NodeServiceStub, node_id: str, **labels: str) -> pb.RegisterResponse:
    return stub.Register(
        pb.RegisterRequest(
            node_id=node_id,
            address="10.0.0.1:7000",
            labels=labels,
            capacity=pb.Resources(cpu=8, memory=32 * GiB, gpu=1, disk=100 * GiB),
            version="test/1",
        ),
        timeout=5,
    )


class NodeStream:
    """A node's Connect stream driven from the test thread."""

    def __init__(self, stub: pb_grpc.NodeServiceStub, node_id: str, epoch: int) -> None:
        self._outbox: queue.Queue[pb.NodeMessage | None] = queue.Queue()
        self._outbox.put(
            pb.NodeMessage(
                node_id=node_id,
                session_epoch=epoch,
                heartbeat=pb.Heartbeat(usage=pb.Resources(cpu=1, memory=GiB)),
            )
        )
        self.call = stub.Connect(self._requests(), timeout=30)
        self.inbox: queue.Queue[pb.ControlMessage | grpc.RpcError | None] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _requests(self) -> Iterator[pb.NodeMessage]:
        while (message := self._outbox.get()) is not None:
            yield message

    def _pump(self) -> None:
        try:
            for message in self.call:
                self.inbox.put(message)
            self.inbox.put(None)
        except grpc.RpcError as err:
            self.inbox.put(err)

    def send(self, message: pb.NodeMessage) -> None:
        self._outbox.put(message)

    def next(self, timeout: float = 5.0) -> pb.ControlMessage | grpc.RpcError | None:
        return self.inbox.get(timeout=timeout)

    def error(self, timeout: float = 5.0) -> grpc.RpcError:
        while True:
            item = self.next(timeout)
            if isinstance(item, grpc.RpcError):
                return item
            assert item is not None, "stream ended cleanly, expected an error status"

    def close(self) -> None:
        self._outbox.put(None)
        self.call.cancel()


def test_register_connect_heartbeat_and_inspect(
    node_stub: pb_grpc.NodeServiceStub, control: pb_grpc.ControlServiceStub
) -> None:
    reply = register(node_stub, "alpha", zone="a")
    assert reply.session_epoch == 1
    assert reply.config.heartbeat_interval_ms == 500
    assert reply.config.node_timeout_ms == 3000
    assert reply.node.status == pb.NODE_STATUS_READY

    stream = NodeStream(node_stub, "alpha", reply.session_epoch)
    first = stream.next()
    assert isinstance(first, pb.ControlMessage) and first.config.heartbeat_interval_ms == 500

    stream.send(pb.NodeMessage(heartbeat=pb.Heartbeat(usage=pb.Resources(cpu=3.5, memory=GiB))))
    wait_for(
        lambda: control.GetNode(pb.GetNodeRequest(node_id="alpha")).usage.cpu == 3.5,
        5,
        message="heartbeat usage visible",
    )
    node = control.GetNode(pb.GetNodeRequest(node_id="alpha"))
    assert node.connected and node.status == pb.NODE_STATUS_READY
    assert node.labels["zone"] == "a" and node.capacity.gpu == 1

    # Drain reaches the node on its stream and shows in the status.
    drained = control.DrainNode(pb.DrainNodeRequest(node_id="alpha", drain=True, reason="kernel"))
    assert drained.status == pb.NODE_STATUS_DRAINING and drained.draining
    notice = stream.next()
    assert isinstance(notice, pb.ControlMessage)
    assert notice.drain.draining and notice.drain.reason == "kernel"
    undrained = control.DrainNode(pb.DrainNodeRequest(node_id="alpha", drain=False))
    assert undrained.status == pb.NODE_STATUS_READY

    ineligible = control.SetNodeEligibility(
        pb.SetNodeEligibilityRequest(node_id="alpha", eligible=False)
    )
    assert not ineligible.eligible
    stream.close()


def test_reregister_supersedes_old_stream_and_stale_epoch_is_refused(
    node_stub: pb_grpc.NodeServiceStub,
) -> None:
    first = register(node_stub, "beta")
    stream = NodeStream(node_stub, "beta", first.session_epoch)
    assert isinstance(stream.next(), pb.ControlMessage)

    second = register(node_stub, "beta")
    assert second.session_epoch == first.session_epoch + 1
    err = stream.error()
    assert err.code() == grpc.StatusCode.ABORTED
    assert "superseded" in (err.details() or "")

    stale = NodeStream(node_stub, "beta", first.session_epoch)
    err = stale.error()
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "epoch" in (err.details() or "")

    current = NodeStream(node_stub, "beta", second.session_epoch)
    assert isinstance(current.next(), pb.ControlMessage)
    current.close()


def test_unknown_node_stream_and_deregister(
    node_stub: pb_grpc.NodeServiceStub, control: pb_grpc.ControlServiceStub
) -> None:
    err = NodeStream(node_stub, "ghost", 1).error()
    assert err.code() == grpc.StatusCode.NOT_FOUND and "ghost" in (err.details() or "")

    reply = register(node_stub, "gamma")
    stream = NodeStream(node_stub, "gamma", reply.session_epoch)
    assert isinstance(stream.next(), pb.ControlMessage)
    with pytest.raises(grpc.RpcError) as info:
        node_stub.Deregister(pb.DeregisterRequest(node_id="gamma", session_epoch=99))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    node_stub.Deregister(pb.DeregisterRequest(node_id="gamma", session_epoch=reply.session_epoch))
    assert stream.next() is None  # the stream ended cleanly
    with pytest.raises(grpc.RpcError) as info:
        control.GetNode(pb.GetNodeRequest(node_id="gamma"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_remove_node_ends_its_stream(
    node_stub: pb_grpc.NodeServiceStub, control: pb_grpc.ControlServiceStub
) -> None:
    reply = register(node_stub, "delta")
    stream = NodeStream(node_stub, "delta", reply.session_epoch)
    assert isinstance(stream.next(), pb.ControlMessage)
    control.RemoveNode(pb.RemoveNodeRequest(node_id="delta"))
    assert stream.error().code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as info:
        control.RemoveNode(pb.RemoveNodeRequest(node_id="delta"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_list_nodes_filters_and_pages(
    node_stub: pb_grpc.NodeServiceStub, control: pb_grpc.ControlServiceStub
) -> None:
    for i in range(25):
        register(node_stub, f"n-{i:02d}", zone="a" if i % 2 == 0 else "b")
    control.DrainNode(pb.DrainNodeRequest(node_id="n-03", drain=True))

    zone_a = control.ListNodes(pb.ListNodesRequest(label_selector={"zone": "a"}, page_size=100))
    assert {n.id for n in zone_a.nodes} == {f"n-{i:02d}" for i in range(0, 25, 2)}
    assert zone_a.total_matched == 13 and zone_a.next_page_token == ""

    draining = control.ListNodes(pb.ListNodesRequest(statuses=[pb.NODE_STATUS_DRAINING]))
    assert [n.id for n in draining.nodes] == ["n-03"]

    seen: list[str] = []
    token = ""
    while True:
        page = control.ListNodes(pb.ListNodesRequest(page_size=10, page_token=token))
        assert len(page.nodes) <= 10 and page.total_matched == 25
        seen.extend(n.id for n in page.nodes)
        token = page.next_page_token
        if not token:
            break
    assert seen == sorted(f"n-{i:02d}" for i in range(25))


# ---------------------------------------------------------------- bad input

BAD_REGISTRATIONS = [
    ("", {}, {}, "node_id"),
    ("x" * 200, {}, {}, "node_id"),
    ("bad id with spaces", {}, {}, "node_id"),
    ("ok-1", {f"k{i}": "v" for i in range(65)}, {}, "labels"),
    ("ok-2", {"k" * 100: "v"}, {}, "labels"),
    ("ok-3", {"zone": "v" * 300}, {}, "labels"),
    ("ok-4", {}, {"cpu": -1.0}, "capacity.cpu"),
    ("ok-5", {}, {"memory": math.nan}, "capacity.memory"),
    ("ok-6", {}, {"gpu": math.inf}, "capacity.gpu"),
]


@pytest.mark.parametrize(("node_id", "labels", "capacity", "field"), BAD_REGISTRATIONS)
def test_bad_registration_is_invalid_argument_and_changes_nothing(
    node_stub: pb_grpc.NodeServiceStub,
    control: pb_grpc.ControlServiceStub,
    node_id: str,
    labels: dict[str, str],
    capacity: dict[str, float],
    field: str,
) -> None:
    register(node_stub, "keeper")
    before = list_all_nodes(control)
    with pytest.raises(grpc.RpcError) as info:
        node_stub.Register(
            pb.RegisterRequest(node_id=node_id, labels=labels, capacity=pb.Resources(**capacity)),
            timeout=5,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in (info.value.details() or "")
    after = list_all_nodes(control)
    assert [n.SerializeToString() for n in after] == [n.SerializeToString() for n in before]


def test_bad_heartbeat_usage_ends_stream_with_invalid_argument(
    node_stub: pb_grpc.NodeServiceStub, control: pb_grpc.ControlServiceStub
) -> None:
    reply = register(node_stub, "epsilon")
    stream = NodeStream(node_stub, "epsilon", reply.session_epoch)
    assert isinstance(stream.next(), pb.ControlMessage)
    stream.send(pb.NodeMessage(heartbeat=pb.Heartbeat(usage=pb.Resources(cpu=-5))))
    err = stream.error()
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "heartbeat.usage.cpu" in (err.details() or "")
    node = control.GetNode(pb.GetNodeRequest(node_id="epsilon"))
    assert node.usage.cpu == 1.0  # the first, valid heartbeat stands


def test_oversized_message_is_rejected_and_server_survives(
    server_factory: type,
) -> None:
    server: ServerProcess = server_factory.create().start()
    with server.channel() as channel:
        stub = pb_grpc.NodeServiceStub(channel)
        huge = pb.RegisterRequest(node_id="big", address="a" * (5 * 1024 * 1024))
        with pytest.raises(grpc.RpcError) as info:
            stub.Register(huge, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert register(stub, "after-big").session_epoch == 1
        control = pb_grpc.ControlServiceStub(channel)
        assert [n.id for n in list_all_nodes(control)] == ["after-big"]


def test_bad_control_requests(control: pb_grpc.ControlServiceStub) -> None:
    cases = [
        (control.GetNode, pb.GetNodeRequest(node_id=""), grpc.StatusCode.INVALID_ARGUMENT),
        (control.GetNode, pb.GetNodeRequest(node_id="nope"), grpc.StatusCode.NOT_FOUND),
        (
            control.ListNodes,
            pb.ListNodesRequest(page_size=100000),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            control.ListNodes,
            pb.ListNodesRequest(page_token="!!!not-base64"),
            grpc.StatusCode.INVALID_ARGUMENT,
        ),
        (
            control.DrainNode,
            pb.DrainNodeRequest(node_id="nope", drain=True),
            grpc.StatusCode.NOT_FOUND,
        ),
    ]
    for method, request, code in cases:
        with pytest.raises(grpc.RpcError) as info:
            method(request, timeout=5)
        assert info.value.code() == code, (request, info.value.details())
