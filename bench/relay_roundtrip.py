"""Cost of relaying node streams through a follower, against nodes connected directly.

A real leader process (embedded mode); in this process, a follower (a NodeService whose
Connect streams go through :class:`~nexus_fast.cluster.relay.FollowerRelay`) and raw nodes
that ack and succeed every command at once. Same run, same nodes code, two paths:

* ``direct``: the nodes' Connect streams go to the leader;
* ``relay``: they go to the follower, which relays them over ONE stream to the leader.

Round trip: one ``SubmitCommands(wait_ms)`` at a time (submit -> dispatch -> ack/result ->
SUCCEEDED answer). Throughput: ``--commands`` submitted to ``--nodes`` nodes, until every
one is SUCCEEDED (``WaitCommands``). The follower and the nodes share this process, so the
relay figure includes the follower's CPU on the same 2-core machine.

    .venv/bin/python bench/relay_roundtrip.py --nodes 50 --commands 5000 --roundtrips 300
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import grpc
import grpc.aio
import uvloop

from nexus_fast.api.grpc_api import NodeService, add_node_service
from nexus_fast.benchmark.procs import ProcessGroup, free_ports, spawn_server
from nexus_fast.cluster.relay import FollowerRelay
from nexus_fast.core.assembly import CoreFabric
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc
from nexus_fast.store.lmdb_store import LmdbStore


async def node(channel: grpc.aio.Channel, node_id: str, epoch: int) -> asyncio.Task[None]:
    call = pb_grpc.NodeServiceStub(channel).Connect()
    await call.write(pb.NodeMessage(node_id=node_id, session_epoch=epoch, heartbeat=pb.Heartbeat()))

    async def run() -> None:
        async for message in call:
            if message.commands:
                report = pb.NodeMessage()
                for command in message.commands:
                    report.acks.add(command_id=command.id, attempt=command.attempt)
                    report.results.add(command_id=command.id, attempt=command.attempt, success=True)
                await call.write(report)

    return asyncio.get_running_loop().create_task(run())


async def measure(
    control: grpc.aio.Channel, ids: list[str], args: argparse.Namespace
) -> dict[str, float]:
    stub = pb_grpc.ControlServiceStub(control)
    rtts = []
    for i in range(args.roundtrips):
        spec = pb.CommandSpec(kind="echo", target_node=ids[i % len(ids)])
        started = time.perf_counter()
        reply = await stub.SubmitCommands(
            pb.SubmitCommandsRequest(commands=[spec], wait_ms=10_000), timeout=15
        )
        rtts.append(time.perf_counter() - started)
        assert [r.state for r in reply.final] == [pb.COMMAND_STATE_SUCCEEDED], reply
    started = time.perf_counter()
    submitted: list[str] = []
    batch = 500
    for i in range(0, args.commands, batch):
        reply = await stub.SubmitCommands(
            pb.SubmitCommandsRequest(
                commands=[pb.CommandSpec(kind="echo")] * min(batch, args.commands - i)
            ),
            timeout=30,
        )
        submitted += [r.id for r in reply.results]
    done = 0
    async for record in stub.WaitCommands(
        pb.WaitCommandsRequest(ids=submitted, timeout_ms=120_000)
    ):
        assert record.state == pb.COMMAND_STATE_SUCCEEDED, record
        done += 1
    took = time.perf_counter() - started
    assert done == len(submitted)
    rtts.sort()
    return {
        "rtt_p50_ms": statistics.median(rtts) * 1000,
        "rtt_p99_ms": rtts[int(len(rtts) * 0.99) - 1] * 1000,
        "commands_per_s": len(submitted) / took,
    }


async def main(args: argparse.Namespace) -> None:
    group = ProcessGroup()
    try:
        leader = spawn_server(group, extra_env={"NEXUS_NODE_TIMEOUT": "60s"})
        control = grpc.aio.insecure_channel(leader.grpc)
        tmp = Path(tempfile.mkdtemp(prefix="relay-bench-"))
        group.dirs.append(tmp)
        core = await CoreFabric(LmdbStore(tmp / "follower")).start()
        relay = FollowerRelay(lambda: leader.grpc)
        server = grpc.aio.server()
        add_node_service(NodeService(core.nodes, core.commands, core.agents, relay=relay), server)
        port = free_ports(1)[0]
        server.add_insecure_port(f"127.0.0.1:{port}")
        await server.start()
        relay.start()
        assert await relay.wait_connected(10)
        earlier: list[str] = []  # nodes of earlier rounds: drained, so they take no work
        for round_no, mode in enumerate(args.modes.split(",")):
            target = leader.grpc if mode == "direct" else f"127.0.0.1:{port}"
            channel = grpc.aio.insecure_channel(target)
            ids = [f"{mode}{round_no}-{i}" for i in range(args.nodes)]
            tasks = []
            for node_id in ids:
                reply = await pb_grpc.NodeServiceStub(control).Register(
                    pb.RegisterRequest(
                        node_id=node_id, capacity=pb.Resources(cpu=64, memory=1 << 34)
                    )
                )
                tasks.append(await node(channel, node_id, reply.session_epoch))
            await asyncio.sleep(1.0)
            stub = pb_grpc.ControlServiceStub(control)
            for other in earlier:
                await stub.DrainNode(pb.DrainNodeRequest(node_id=other, drain=True))
            earlier += ids
            result = await measure(control, ids, args)
            print(mode, {k: round(v, 2) for k, v in result.items()}, flush=True)
            for task in tasks:
                task.cancel()
            await channel.close()
        await relay.stop()
        await server.stop(0)
        await core.stop()
        await control.close()
    finally:
        group.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--commands", type=int, default=5000)
    parser.add_argument("--roundtrips", type=int, default=300)
    parser.add_argument("--modes", default="direct,relay,direct,relay")
    uvloop.run(main(parser.parse_args()))
