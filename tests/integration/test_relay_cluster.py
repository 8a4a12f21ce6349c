"""Followers serve node streams, with real replicas on real etcd.

Three ``nexus-fast`` replicas on one etcd member. A node registers with the leader and
opens its Connect stream on a follower, which relays it to the leader: commands submitted
on the leader reach it and end SUCCEEDED. The leader is then killed (SIGKILL): a new
leader is elected, the follower moves its relay there and re-opens the node's session,
and new commands flow on the node's SAME stream (a failover moves leadership, not node
connections).
"""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc.aio

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc
from tests.integration.etcd_fixtures import etcd1  # noqa: F401
from tests.integration.test_cluster_server import cluster_factory, leader_of, status  # noqa: F401

from .test_relay import RawNode, register, submit, wait_succeeded, wait_until


def test_relayed_node_keeps_its_stream_across_a_leader_kill(
    cluster_factory: type, tmp_path: Path
) -> None:
    replicas = cluster_factory.create().start(3)
    leader, followers = leader_of(replicas)
    holder = followers[0]  # the replica holding the node's stream

    async def body() -> None:
        control = grpc.aio.insecure_channel(leader.grpc_target)
        node_channel = grpc.aio.insecure_channel(holder.grpc_target)
        node = None
        try:
            epoch = await register(control, "relay-c1")  # Register: on the leader
            node = await RawNode("relay-c1", epoch, node_channel).start()
            await wait_until(lambda: node is not None and node.configs == 1, 15, "relayed")
            ids = await submit(control, "relay-c1", 20)
            await wait_succeeded(control, ids, 30)
            assert sorted(set(node.ran)) == sorted(ids)

            call = node.call
            await asyncio.to_thread(leader.stop, signal.SIGKILL)
            rest = [s for s in replicas if s is not leader]
            new_leader, _ = await asyncio.to_thread(leader_of, rest)
            assert (await asyncio.to_thread(status, new_leader)).role == "leader"
            # The holder re-opened the node on the new leader (itself or the other one).
            await wait_until(lambda: node is not None and node.configs >= 2, 20, "re-opened")
            await control.close()
            control = grpc.aio.insecure_channel(new_leader.grpc_target)
            ids2 = await submit(control, "relay-c1", 20)
            await wait_succeeded(control, ids2, 30)
            assert set(ids2) <= set(node.ran)
            assert node.ended is None and node.call is call  # the same stream throughout
            got = await pb_grpc.ControlServiceStub(control).GetNode(
                pb.GetNodeRequest(node_id="relay-c1"), timeout=5
            )
            assert got.connected and got.status == pb.NODE_STATUS_READY
        finally:
            if node is not None:
                await node.stop()
            await control.close()
            await node_channel.close()

    try:
        asyncio.run(asyncio.wait_for(body(), 90))
    except BaseException:
        for server in replicas:
            print(f"--- {server.log_path.name}\n{server.log()[-3000:]}")
        raise
