"""Followers serve node streams: node streams relayed to a real leader process.

The leader is the real ``nexus-fast`` process (embedded mode: it leads itself and serves
``ReplicaService.Relay``). The follower side runs in this test process as a follower
replica does: a gRPC server whose ``NodeService`` hands Connect streams to a
:class:`FollowerRelay` (its local core, on its own LMDB, is never asked). Nodes are raw
gRPC clients of the follower, so the test sees exactly which stream each one uses.
With auth on, Relay is refused to an operator and served to a credential holding
``cluster.relay``.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import grpc
import grpc.aio
import pytest

from nexus_fast.api.grpc_api import NodeService, add_node_service
from nexus_fast.benchmark.procs import free_ports
from nexus_fast.cluster.relay import FollowerRelay
from nexus_fast.core.assembly import CoreFabric
from nexus_fast.node.channel import ClientAuth, channel_credentials
from nexus_fast.pb import cluster_pb2_grpc as cpb_grpc
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc
from nexus_fast.security.tokens import issue_token
from nexus_fast.store.lmdb_store import LmdbStore

from .conftest import ServerProcess

HOST = "127.0.0.1"
DONE = (pb.COMMAND_STATE_SUCCEEDED, pb.COMMAND_STATE_FAILED, pb.COMMAND_STATE_CANCELLED)


class RawNode:
    """A node speaking NodeService.Connect by hand on ONE stream to the follower."""

    def __init__(self, node_id: str, epoch: int, channel: grpc.aio.Channel) -> None:
        self.node_id = node_id
        self.epoch = epoch
        self.call = pb_grpc.NodeServiceStub(channel).Connect()
        self.configs = 0  # ControlMessage.config seen: one per session opened for it
        self.ran: list[str] = []
        self.ended: grpc.aio.AioRpcError | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self, read: bool = True) -> RawNode:
        await self.call.write(
            pb.NodeMessage(node_id=self.node_id, session_epoch=self.epoch, heartbeat=pb.Heartbeat())
        )
        loop = asyncio.get_running_loop()
        self._tasks.append(loop.create_task(self._heartbeats()))
        if read:
            self._tasks.append(loop.create_task(self._run()))
        return self

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(0.3)
            await self.call.write(pb.NodeMessage(heartbeat=pb.Heartbeat()))

    async def _run(self) -> None:
        try:
            async for message in self.call:
                if message.HasField("config"):
                    self.configs += 1
                if message.commands:
                    report = pb.NodeMessage()
                    for command in message.commands:
                        self.ran.append(command.id)
                        report.acks.add(command_id=command.id, attempt=command.attempt)
                        report.results.add(
                            command_id=command.id, attempt=command.attempt, success=True
                        )
                    await self.call.write(report)
        except grpc.aio.AioRpcError as exc:
            self.ended = exc

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        self.call.cancel()


class Follower:
    """The follower's side in process: a NodeService on its own port relaying to the leader."""

    def __init__(
        self, leader: ServerProcess, tmp: Path, credentials: grpc.ChannelCredentials | None = None
    ) -> None:
        self.leader = leader
        self.core = CoreFabric(LmdbStore(tmp / "follower-data"))
        self.relay = FollowerRelay(
            lambda: leader.grpc_target, credentials=credentials, no_leader_wait=10.0
        )
        self.port = free_ports(1)[0]
        self.server = grpc.aio.server()

    async def start(self) -> Follower:
        await self.core.start()
        service = NodeService(
            self.core.nodes, self.core.commands, self.core.agents, relay=self.relay
        )
        add_node_service(service, self.server)
        self.server.add_insecure_port(f"{HOST}:{self.port}")
        await self.server.start()
        self.relay.start()
        assert await self.relay.wait_connected(15), "relay never connected to the leader"
        return self

    def channel(self) -> grpc.aio.Channel:
        return grpc.aio.insecure_channel(f"{HOST}:{self.port}")

    async def stop(self) -> None:
        await self.relay.stop()
        await self.server.stop(1)
        await self.core.stop()


async def register(control: grpc.aio.Channel, node_id: str) -> int:
    reply = await pb_grpc.NodeServiceStub(control).Register(
        pb.RegisterRequest(node_id=node_id, capacity=pb.Resources(cpu=8, memory=1 << 30)),
        timeout=10,
    )
    return int(reply.session_epoch)


async def submit(
    control: grpc.aio.Channel, node_id: str, n: int, payload: bytes = b""
) -> list[str]:
    per_request = max(1, min(n, (2 << 20) // max(1, len(payload))))  # under the 4 MB limit
    ids: list[str] = []
    while len(ids) < n:
        count = min(per_request, n - len(ids))
        spec = pb.CommandSpec(kind="echo", target_node=node_id, payload=payload, timeout_ms=60_000)
        reply = await pb_grpc.ControlServiceStub(control).SubmitCommands(
            pb.SubmitCommandsRequest(commands=[spec] * count), timeout=10
        )
        assert len(reply.results) == count and all(r.id for r in reply.results), reply
        ids += [r.id for r in reply.results]
    return ids


async def wait_succeeded(control: grpc.aio.Channel, ids: list[str], timeout: float) -> None:
    stub = pb_grpc.ControlServiceStub(control)
    deadline = time.monotonic() + timeout
    states: dict[str, int] = {}
    while time.monotonic() < deadline:
        for command_id in ids:
            if states.get(command_id) not in DONE:
                states[command_id] = (
                    await stub.GetCommand(pb.GetCommandRequest(id=command_id), timeout=5)
                ).state
        if all(states[i] in DONE for i in ids):
            assert all(states[i] == pb.COMMAND_STATE_SUCCEEDED for i in ids), states
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"commands not final within {timeout}s: {states}")


async def wait_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s: {what}")


def test_relayed_nodes_run_commands_and_survive_a_leader_restart(
    server_factory: type, tmp_path: Path
) -> None:
    leader: ServerProcess = server_factory.create().start()

    async def body() -> None:
        follower = await Follower(leader, tmp_path).start()
        control = grpc.aio.insecure_channel(leader.grpc_target)
        node_channel = follower.channel()
        nodes: list[RawNode] = []
        try:
            epoch = await register(control, "relay-a")
            node = await RawNode("relay-a", epoch, node_channel).start()
            nodes.append(node)
            await wait_until(lambda: node.configs == 1, 10, "the leader's config via the relay")

            # Commands submitted on the leader reach the node through the relay, end SUCCEEDED.
            ids = await submit(control, "relay-a", 20)
            await wait_succeeded(control, ids, 20)
            assert sorted(set(node.ran)) == sorted(ids)
            listed = await pb_grpc.ControlServiceStub(control).GetNode(
                pb.GetNodeRequest(node_id="relay-a"), timeout=5
            )
            assert listed.connected and listed.status == pb.NODE_STATUS_READY

            # The leader restarts (SIGTERM, same ports and data): the relay reconnects and
            # re-opens the node's session; the node's own stream never ends.
            call = node.call
            assert await asyncio.to_thread(leader.stop) == 0
            restarted = server_factory.create(data_dir=leader.data_dir, same_ports_as=leader)
            await asyncio.to_thread(restarted.start)
            await wait_until(lambda: follower.relay.connects == 2, 15, "the relay reconnected")
            await wait_until(lambda: node.configs == 2, 10, "the session re-opened on the leader")
            assert node.ended is None and node.call is call
            ids2 = await submit(control, "relay-a", 20)
            await wait_succeeded(control, ids2, 20)
            assert set(ids2) <= set(node.ran)
            assert node.ended is None and follower.relay.held_count() == 1

            # Killed outright this time (the relay stream just breaks): the same again.
            await asyncio.to_thread(restarted.kill)
            again = server_factory.create(data_dir=leader.data_dir, same_ports_as=leader)
            await asyncio.to_thread(again.start)
            await wait_until(lambda: follower.relay.connects == 3, 15, "the relay reconnected")
            await wait_until(lambda: node.configs == 3, 10, "the session re-opened again")
            ids2 = await submit(control, "relay-a", 20)
            await wait_succeeded(control, ids2, 20)
            assert set(ids2) <= set(node.ran) and node.ended is None and node.call is call

            # The leader's refusal of a session reaches the node's own stream as its status.
            stale = await RawNode("relay-a", epoch + 7, node_channel).start()
            nodes.append(stale)
            await wait_until(lambda: stale.ended is not None, 10, "stale epoch refused")
            assert stale.ended is not None
            assert stale.ended.code() == grpc.StatusCode.FAILED_PRECONDITION, stale.ended
            assert "session epoch" in (stale.ended.details() or "")
            assert node.ended is None  # the live stream of that node is untouched

            # A node that stops reading does not stall another node on the same relay.
            epoch_b = await register(control, "relay-slow")
            slow = await RawNode("relay-slow", epoch_b, node_channel).start(read=False)
            nodes.append(slow)
            await wait_until(lambda: follower.relay.held_count() == 2, 10, "slow node held")
            big = b"x" * (512 * 1024)  # 512 KiB each: far past the stream's flow-control window
            slow_ids = await submit(control, "relay-slow", 40, big)
            ids3 = await submit(control, "relay-a", 50)
            started = time.monotonic()
            await wait_succeeded(control, ids3, 20)
            took = time.monotonic() - started
            states = [
                (
                    await pb_grpc.ControlServiceStub(control).GetCommand(
                        pb.GetCommandRequest(id=i), timeout=5
                    )
                ).state
                for i in slow_ids
            ]
            assert pb.COMMAND_STATE_SUCCEEDED not in states  # it never read, never ran any
            # ... and it is really stuck: the follower holds messages its stream cannot take.
            backlog = follower.relay.backlog()
            assert backlog.get("relay-slow", 0) > 0, backlog
            assert took < 15, took
        finally:
            for n in nodes:
                await n.stop()
            await follower.stop()
            await control.close()
            await node_channel.close()

    try:
        asyncio.run(asyncio.wait_for(body(), 50))
    except BaseException:
        print(leader.log())
        raise


@pytest.mark.parametrize("auth_mode", ["auth"], indirect=True)
def test_relay_needs_a_replica_credential(server_factory: type, tmp_path: Path) -> None:
    leader: ServerProcess = server_factory.create().start()
    pki = leader.pki
    assert pki is not None

    async def body() -> None:
        # An operator may do much, but not speak for nodes: Relay is refused.
        async with grpc.aio.secure_channel(
            leader.grpc_target, channel_credentials(leader.auth)
        ) as channel:
            call = cpb_grpc.ReplicaServiceStub(channel).Relay()
            assert await call.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "cluster.relay" in (await call.details() or "")
        # A credential holding cluster.relay (admin here; replicas in cluster mode) relays.
        admin = ClientAuth(
            tls_ca=str(pki.ca),
            tls_cert=str(pki.root / "viewer-handshake.pem"),
            tls_key=str(pki.root / "viewer-handshake-key.pem"),
            token=issue_token("root", "admin", 3600, secret=pki.secret),
        )
        follower = await Follower(leader, tmp_path, channel_credentials(admin)).start()
        control = leader.aio_channel()
        node_channel = follower.channel()
        node = None
        try:
            cert, key = pki.node_cert("relay-auth")  # the node registers as itself
            node_creds = grpc.ssl_channel_credentials(pki.ca.read_bytes(), key, cert)
            async with grpc.aio.secure_channel(leader.grpc_target, node_creds) as own:
                epoch = await register(own, "relay-auth")
            node = await RawNode("relay-auth", epoch, node_channel).start()
            ids = await submit(control, "relay-auth", 5)
            await wait_succeeded(control, ids, 20)
            assert sorted(set(node.ran)) == sorted(ids)
        finally:
            if node is not None:
                await node.stop()
            await follower.stop()
            await control.close()
            await node_channel.close()

    try:
        asyncio.run(asyncio.wait_for(body(), 40))
    except BaseException:
        print(leader.log())
        raise
