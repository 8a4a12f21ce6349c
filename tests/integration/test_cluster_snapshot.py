"""Snapshot bootstrap end to end: real etcd, real replica processes, a compacted log.

Two replicas commit many commands, the log is compacted, then a third replica starts with an
empty data dir: its next entry is gone, so it fetches a copy of a live replica's store
(ReplicaService.FetchSnapshot), checks and installs it, restarts on it and tails the log
from the seq the copy holds. Its WatchEvents from index 0 is then the leader's, event for
event, and new commits reach it.
"""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import grpc
import pytest

from nexus_fast.cluster.etcd import EtcdClient, prefix_end
from nexus_fast.cluster.etcd_procs import EtcdCluster
from nexus_fast.cluster.snapshot import (
    FETCH_SNAPSHOT,
    SnapshotBootstrap,
    SnapshotError,
    SnapshotServicer,
    add_snapshot_service,
    copy_applied_seq,
)
from nexus_fast.config import Config
from nexus_fast.pb import cluster_pb2 as cpb
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc
from nexus_fast.security.tokens import issue_token
from nexus_fast.security.tools import main as credentials_main
from nexus_fast.store.log_entry import log_prefix, log_seq
from tests.integration.conftest import ServerProcess, TestPki, wait_for
from tests.integration.etcd_fixtures import etcd1  # noqa: F401
from tests.integration.test_cluster_server import (  # noqa: F401  (cluster_factory: fixture)
    _head_index,
    _watch,
    cluster_factory,
    leader_of,
    status,
)
from tests.integration.test_replog import Replica, cluster, commit_many, run, until

FINAL = {pb.COMMAND_STATE_SUCCEEDED, pb.COMMAND_STATE_FAILED}


async def _compact_log(endpoints: list[str], prefix: bytes) -> tuple[int, int]:
    """Delete every log entry but the newest (as the leader's compaction would, further);
    compact etcd's history too. Returns (first seq left, entries deleted)."""
    client = EtcdClient(endpoints)
    await client.connect()
    try:
        start = log_prefix(prefix)
        kvs, _ = await client.range(start, prefix_end(start))
        newest = kvs[-1]
        deleted = await client.delete(start, newest.key)
        await client.compact(kvs[-2].mod_revision)
        left, _ = await client.range(start, prefix_end(start))
        return log_seq(prefix, left[0].key), deleted
    finally:
        await client.close()


def _events(server: ServerProcess, head: int) -> list[tuple[int, str, str]]:
    out: list[pb.Event] = []
    thread: threading.Thread = _watch(server, head, out)
    thread.join(30.0)
    return [(e.index, e.type, e.key) for e in out if e.index <= head]


def test_a_new_replica_bootstraps_from_a_snapshot_then_follows_the_log(
    cluster_factory: type, fleet_factory: type, etcd1: EtcdCluster
) -> None:
    cluster = cluster_factory.create()
    leader, (follower,) = leader_of(cluster.start(2))
    replicas = [leader, follower]
    fleet_factory.create(leader, 2)
    with leader.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        wait_for(lambda: len(control.ListNodes(pb.ListNodesRequest()).nodes) == 2, 20.0)
        for round_ in range(5):  # many commands: many log entries, hundreds of events
            specs = [
                pb.CommandSpec(kind="run", payload=b"x", idempotency_key=f"k{round_}-{i}")
                for i in range(20)
            ]
            answer = control.SubmitCommands(
                pb.SubmitCommandsRequest(commands=specs, wait_ms=15000), timeout=20.0
            )
            assert len(answer.final) == 20 and {r.state for r in answer.final} <= FINAL, answer
    head_seq = status(leader).applied_seq
    wait_for(lambda: status(follower).applied_seq >= head_seq, 10.0, 0.1, "follower in step")
    first, deleted = asyncio.run(_compact_log(etcd1.endpoints, cluster.prefix.encode()))
    assert first > 1 and deleted >= first - 1, (first, deleted)

    joiner = cluster.add("r3")  # an empty data dir: entry 1 is gone from the log
    joiner.start(45.0)
    replicas.append(joiner)
    wait_for(lambda: "snapshot installed" in joiner.log(), 30.0, 0.1, "snapshot installed")
    wait_for(
        lambda: status(joiner).state == "follower" and status(joiner).applied_seq >= first - 1,
        30.0,
        0.2,
        "the joiner follows the log after its snapshot",
    )
    served = leader.log() + follower.log()
    assert "serving a snapshot" in served
    counts = [json.loads(s.http("/health/detailed")[1])["cluster"]["snapshot"] for s in replicas]
    assert sum(c["served"] for c in counts) == 1 and counts[2]["attempts"] == 0, counts
    answer = status(joiner)
    assert answer.role == "follower" and answer.leader_name == status(leader).name
    # WatchEvents from 0: every event of the leader, same indices, types and keys.
    head = _head_index(leader)
    wait_for(lambda: _head_index(joiner) >= head, 20.0, 0.1, "the joiner has every event")
    on_leader, on_joiner = _events(leader, head), _events(joiner, head)
    assert len(on_leader) > 200 and on_leader == on_joiner
    assert [e[0] for e in on_joiner] == list(range(on_joiner[0][0], head + 1))  # contiguous
    # New commits reach it through the log.
    with leader.channel() as channel:
        spec = pb.CommandSpec(kind="run", payload=b"y", idempotency_key="after")
        pb_grpc.ControlServiceStub(channel).SubmitCommands(
            pb.SubmitCommandsRequest(commands=[spec], wait_ms=15000), timeout=20.0
        )
    new_head = _head_index(leader)
    assert new_head > head
    wait_for(lambda: _head_index(joiner) >= new_head, 20.0, 0.1, "new commits reach the joiner")
    assert _events(joiner, new_head)[-3:] == _events(leader, new_head)[-3:]
    assert status(joiner).applied_seq > head_seq
    # A replica far behind (down while the log moved on and was compacted) does the same
    # over its existing data dir.
    stopped_at = status(follower).applied_seq
    assert follower.stop() == 0
    with leader.channel() as channel:
        specs = [
            pb.CommandSpec(kind="run", payload=b"z", idempotency_key=f"z{i}") for i in range(5)
        ]
        pb_grpc.ControlServiceStub(channel).SubmitCommands(
            pb.SubmitCommandsRequest(commands=specs, wait_ms=15000), timeout=20.0
        )
    again, _ = asyncio.run(_compact_log(etcd1.endpoints, cluster.prefix.encode()))
    assert again > stopped_at + 1  # r2's next entry is gone from the log
    follower.start(45.0)
    wait_for(lambda: "snapshot installed" in follower.log(), 30.0, 0.1, "r2 installed one")
    last = _head_index(leader)
    wait_for(lambda: _head_index(follower) >= last, 30.0, 0.1, "r2 has every event")
    assert _events(follower, last) == _events(leader, last)


def test_with_auth_only_replicas_fetch_snapshots_and_a_joiner_bootstraps_over_mtls(
    cluster_factory: type,
    fleet_factory: type,
    etcd1: EtcdCluster,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    root = tmp_path_factory.mktemp("pki")
    argv = ["certs", "--out", str(root), "--replica", "r1", "r2", "r3"]
    assert credentials_main([*argv, "--node", "fleet", "--viewer", "handshake"]) == 0
    secret = (root / "jwt.secret").read_bytes().strip()
    pki = TestPki(root, issue_token("ops", "operator", 3600, secret=secret))
    cluster = cluster_factory.create(pki)
    leader, (follower,) = leader_of(cluster.start(2))
    fleet_factory.create(leader, 1)
    with leader.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        wait_for(lambda: len(control.ListNodes(pb.ListNodesRequest()).nodes) == 1, 20.0)
        specs = [
            pb.CommandSpec(kind="run", payload=b"x", idempotency_key=f"a{i}") for i in range(10)
        ]
        answer = control.SubmitCommands(
            pb.SubmitCommandsRequest(commands=specs, wait_ms=15000), timeout=20.0
        )
        assert len(answer.final) == 10, answer
    head_seq = status(leader).applied_seq
    wait_for(lambda: status(follower).applied_seq >= head_seq, 10.0, 0.1, "follower in step")
    first, _ = asyncio.run(_compact_log(etcd1.endpoints, cluster.prefix.encode()))
    assert first > 1
    # Refused: an operator (a token that may submit commands) asking for the whole store.
    for server in (leader, follower):
        with server.channel() as channel:
            fetch = channel.unary_stream(
                "/nexus.cluster.v1.ReplicaService/FetchSnapshot",
                request_serializer=cpb.FetchSnapshotRequest.SerializeToString,
                response_deserializer=cpb.SnapshotChunk.FromString,
            )
            with pytest.raises(grpc.RpcError) as refused:
                list(fetch(cpb.FetchSnapshotRequest(), timeout=10.0))
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "serving a snapshot" not in leader.log() + follower.log()
    # Accepted: the joiner, with its own replica certificate (role replica), over mTLS.
    joiner = cluster.add("r3")
    joiner.start(45.0)
    wait_for(lambda: "snapshot installed" in joiner.log(), 30.0, 0.1, "snapshot installed")
    wait_for(
        lambda: status(joiner).state == "follower" and status(joiner).applied_seq >= head_seq,
        30.0,
        0.2,
        "the joiner follows the log after its snapshot",
    )
    assert "serving a snapshot" in leader.log() + follower.log()


def test_serving_one_copy_at_a_time_and_refusals_in_process(
    etcd1: EtcdCluster, tmp_path: Path
) -> None:
    """A real ReplicatedStore leading the log, its FetchSnapshot on a real gRPC server."""

    async def body(leader: Replica, _follower: Replica) -> None:
        await commit_many(leader.store, range(1, 40))
        applied = leader.store.applied_seq
        data_dir = Path(leader.local.path)
        servicer = SnapshotServicer(leader.store, data_dir, 64 * 1024)
        servicer.chunk_bytes = 1024  # many chunks: the first stream stays open, unread
        server = grpc.aio.server()
        add_snapshot_service(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                fetch = channel.unary_stream(
                    FETCH_SNAPSHOT,
                    request_serializer=cpb.FetchSnapshotRequest.SerializeToString,
                    response_deserializer=cpb.SnapshotChunk.FromString,
                )

                async def refused(request: cpb.FetchSnapshotRequest) -> grpc.StatusCode:
                    with pytest.raises(grpc.aio.AioRpcError) as info:
                        async for _ in fetch(request, timeout=10.0):
                            pass
                    code: grpc.StatusCode = info.value.code()
                    return code

                first = fetch(cpb.FetchSnapshotRequest(min_applied_seq=applied), timeout=10.0)
                chunk = await first.read()
                assert chunk.applied_seq == applied and chunk.offset == 0 and chunk.size > 0
                assert (data_dir / ".snapshot-serve.mdb").exists()
                # One at a time: a second caller is told to come back (or ask elsewhere).
                busy = await refused(cpb.FetchSnapshotRequest())
                assert busy == grpc.StatusCode.RESOURCE_EXHAUSTED
                first.cancel()  # the reader went away: the copy is deleted, serving is free
                await until(
                    lambda: not (data_dir / ".snapshot-serve.mdb").exists(), 10, "copy gone"
                )
                ahead = await refused(cpb.FetchSnapshotRequest(min_applied_seq=applied + 1))
                assert ahead == grpc.StatusCode.FAILED_PRECONDITION
                # A whole transfer: contiguous chunks, digest, applied seq; then the store
                # check refuses it (these test events are not Event protobufs), and the
                # joiner's own data dir is never touched.
                boot = SnapshotBootstrap(Config(), leader.store, tmp_path / "joiner", _no_restart)
                with pytest.raises(SnapshotError, match="store check"):
                    await boot._fetch(f"127.0.0.1:{port}", applied, tmp_path / "incoming")
                assert (tmp_path / "incoming" / "data.mdb").stat().st_size == chunk.size
                assert copy_applied_seq(tmp_path / "incoming" / "data.mdb") == applied
                assert not (tmp_path / "joiner").exists() and servicer.served == 1
        finally:
            await server.stop(None)

    run(cluster(etcd1.endpoints, tmp_path, body))


async def _no_restart() -> None:
    raise AssertionError("a refused copy must not restart anything")
