"""ReplicaService.Relay in process: the leader's refusals and the follower's "no leader".

The end-to-end behaviour (a real leader process, restarts, a slow node) is in
tests/integration/test_relay.py; these pin the edges cheaply, over real gRPC on loopback.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import grpc
import grpc.aio
import pytest
from prometheus_client import REGISTRY

from nexus_fast.api.grpc_api import NodeService, add_node_service
from nexus_fast.api.node_stream import NodeStreams
from nexus_fast.cluster.relay import FollowerRelay, RelayServicer, add_replica_service
from nexus_fast.core.assembly import CoreFabric
from nexus_fast.pb import cluster_pb2 as cpb
from nexus_fast.pb import cluster_pb2_grpc as cpb_grpc
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc
from nexus_fast.store import LmdbStore

from .fabric import run, until


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def _leader(tmp_path: Path) -> tuple[CoreFabric, grpc.aio.Server, int, RelayServicer]:
    core = await CoreFabric(LmdbStore(tmp_path / "leader")).start()
    servicer = RelayServicer(NodeStreams(core.nodes, core.commands, core.agents))
    server = grpc.aio.server()
    add_replica_service(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return core, server, port, servicer


def test_leader_ends_bad_sessions_and_refuses_bad_frames(tmp_path: Path) -> None:
    async def body() -> None:
        core, server, port, _ = await _leader(tmp_path)
        await core.node("n1", connect=False)
        epoch = core.nodes.get("n1").session_epoch
        sessions = _sample("nexus_relay_sessions")
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = cpb_grpc.ReplicaServiceStub(channel).Relay()
                assert list((await call.read()).frames) == []  # "connected"
                up = cpb.RelayUp()
                up.frames.add(stream=1, open=cpb.RelayOpen(node_id="nope", session_epoch=1))
                up.frames.add(stream=2, open=cpb.RelayOpen(node_id="n1", session_epoch=epoch + 1))
                up.frames.add(stream=3, open=cpb.RelayOpen(node_id="n1", session_epoch=epoch))
                up.frames.add(stream=3, message=pb.NodeMessage(heartbeat=pb.Heartbeat()))
                await call.write(up)
                seen: dict[int, list[cpb.RelayDownFrame]] = {}
                while not (1 in seen and 2 in seen and 3 in seen):
                    for frame in (await call.read()).frames:
                        seen.setdefault(frame.stream, []).append(frame)
                assert seen[1][0].end.code == grpc.StatusCode.NOT_FOUND.value[0]
                assert seen[2][0].end.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
                assert seen[3][0].message.HasField("config")  # a session, as Connect's
                assert core.nodes.get("n1").connected
                assert _sample("nexus_relay_sessions") == sessions + 1
                # The same stream id opened twice is the caller's bug: the relay ends.
                again = cpb.RelayUp()
                again.frames.add(stream=3, open=cpb.RelayOpen(node_id="n1", session_epoch=epoch))
                await call.write(again)
                try:
                    while True:
                        if await call.read() is grpc.aio.EOF:
                            break
                except grpc.aio.AioRpcError:
                    pass
                assert await call.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "already open" in (await call.details() or "")
                # Its sessions ended with it: the node counts as disconnected.
                assert not core.nodes.get("n1").connected
                assert _sample("nexus_relay_sessions") == sessions
        finally:
            await server.stop(0)
            await core.stop()

    run(body())


def test_follower_without_a_leader_answers_unavailable(tmp_path: Path) -> None:
    async def body() -> None:
        core = await CoreFabric(LmdbStore(tmp_path / "follower")).start()
        relay = FollowerRelay(lambda: None, no_leader_wait=0.3)
        server = grpc.aio.server()
        add_node_service(NodeService(core.nodes, core.commands, core.agents, relay=relay), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        relay.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                call = pb_grpc.NodeServiceStub(channel).Connect()
                await call.write(pb.NodeMessage(node_id="n1", session_epoch=1))
                assert await call.code() == grpc.StatusCode.UNAVAILABLE
                assert "no leader" in (await call.details() or "")
            assert relay.held_count() == 0
        finally:
            await relay.stop()
            await server.stop(0)
            await core.stop()

    run(body())


def test_a_node_that_stops_reading_is_cut_off_alone_and_the_leader_told(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def body() -> None:
        core, server, port, _ = await _leader(tmp_path)
        follower = await CoreFabric(LmdbStore(tmp_path / "follower")).start()
        relay = FollowerRelay(lambda: f"127.0.0.1:{port}")
        node_server = grpc.aio.server()
        service = NodeService(follower.nodes, follower.commands, follower.agents, relay=relay)
        add_node_service(service, node_server)
        node_port = node_server.add_insecure_port("127.0.0.1:0")
        await node_server.start()
        streams = _sample("nexus_relay_node_streams")
        connects = _sample("nexus_relay_connects_total")
        relay.start()
        try:
            assert await relay.wait_connected(5)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{node_port}") as channel:
                calls = {}
                for node_id in ("slow", "fine"):
                    await core.node(node_id, connect=False)
                    epoch = core.nodes.get(node_id).session_epoch
                    calls[node_id] = pb_grpc.NodeServiceStub(channel).Connect()
                    await calls[node_id].write(pb.NodeMessage(node_id=node_id, session_epoch=epoch))
                await until(lambda: core.nodes.get("slow").connected, what="slow relayed")
                await until(lambda: core.nodes.get("fine").connected, what="fine relayed")
                assert _sample("nexus_relay_node_streams") == streams + 2
                assert _sample("nexus_relay_connects_total") == connects + 1
                fine_got = 0

                async def read_fine() -> None:
                    nonlocal fine_got
                    async for _ in calls["fine"]:
                        fine_got += 1

                reader = asyncio.get_running_loop().create_task(read_fine())
                # "slow" never reads: far more than its flow-control window and its queue.
                notice = pb.ControlMessage(cancel_command_ids=["x" * 2000])
                fine_sent = 0

                def send_fine() -> None:
                    nonlocal fine_sent
                    core.nodes.session_of("fine").send(pb.ControlMessage())  # type: ignore[union-attr]
                    fine_sent += 1

                for _ in range(60):
                    slow = core.nodes.session_of("slow")
                    if slow is None:
                        break
                    for _ in range(200):
                        slow.send(notice)
                    send_fine()
                    await asyncio.sleep(0.02)
                # The follower cut "slow" off and told the leader: not connected there.
                await until(lambda: not core.nodes.get("slow").connected, 8, "slow cut off")
                # "fine" shares the relay: it got every message sent to it while "slow" was
                # choking (how many depends on how soon "slow" was cut off: a busy machine
                # cuts it sooner) and every one after (and what its session sent on opening).
                for _ in range(10):
                    send_fine()
                await until(lambda: fine_got >= fine_sent, 8, f"fine got all {fine_sent}")
                assert core.nodes.get("fine").connected and relay.held_count() >= 1
                reader.cancel()
                for call in calls.values():
                    call.cancel()
        finally:
            await relay.stop()
            await node_server.stop(0)
            await server.stop(0)
            await follower.stop()
            await core.stop()

    run(body())
    # Its write, stuck on its flow control, failed when its call ended: that is the node
    # gone, not a handler error (no ERROR line, no traceback).
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
