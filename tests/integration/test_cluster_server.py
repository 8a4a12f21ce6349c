"""Cluster mode end to end: real etcd (one member), real replica processes, real clients.

Every replica is a full ``nexus-fast`` process with its own data dir and ports; they share
one etcd and a key prefix of their own per test. Checked here: one leader that every
replica names, followers forwarding what needs the core (SubmitCommands, reads), the same
contiguous events on a follower's WatchEvents as on the leader's, a fast handover on
SIGTERM, the on-behalf-of header accepted from replicas only, the standalone answer, and
one-line refusals of bad ``[cluster]`` configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus_fast.cluster.etcd_procs import EtcdCluster
from nexus_fast.node.channel import ClientAuth, channel_credentials
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc
from nexus_fast.security.tokens import issue_token
from nexus_fast.security.tools import main as credentials_main
from tests.integration.conftest import REPO, ServerProcess, TestPki, wait_for
from tests.integration.etcd_fixtures import etcd1  # noqa: F401
from tests.integration.events_util import PicowsClient

DEV = (REPO / "configs" / "development.toml").read_text().partition("[cluster]")[0]
FINAL = {pb.COMMAND_STATE_SUCCEEDED, pb.COMMAND_STATE_FAILED, pb.COMMAND_STATE_CANCELLED}


class Cluster:
    """Replicas on one etcd under a prefix of their own; killed at teardown by pid."""

    def __init__(self, etcd: EtcdCluster, root: Path, pki: TestPki | None = None) -> None:
        self.etcd = etcd
        self.root = root
        self.pki = pki
        self.prefix = f"/t{uuid.uuid4().hex[:10]}"
        self.replicas: list[ServerProcess] = []

    def add(self, name: str, **cluster: str) -> ServerProcess:
        config = self.root / f"{name}.toml"
        keys = {
            "enabled": "true",
            "name": json.dumps(name),
            "etcd_endpoints": json.dumps(self.etcd.endpoints),
            "etcd_prefix": json.dumps(self.prefix),
            "lease_ttl": '"2s"',
            **cluster,
        }
        env: dict[str, str] = {}
        if self.pki is not None:  # the replica's own certificate: O=nexus-replica
            env["NEXUS_TLS_CERT_FILE"] = str(self.pki.root / f"replica-{name}.pem")
            env["NEXUS_TLS_KEY_FILE"] = str(self.pki.root / f"replica-{name}-key.pem")
        body = "".join(f"{k} = {v}\n" for k, v in keys.items())
        config.write_text(DEV + "[cluster]\n" + body)
        server = ServerProcess(
            self.root / name, self.root / f"{name}.log", config, pki=self.pki, **env
        )
        # The advertise address is the gRPC port the process will listen on.
        config.write_text(config.read_text() + f'advertise = "127.0.0.1:{server.grpc_port}"\n')
        if server.config != config:  # auth mode wrote its own copy from the old text
            text = server.config.read_text() + f'advertise = "127.0.0.1:{server.grpc_port}"\n'
            server.config.write_text(text)
        self.replicas.append(server)
        return server

    def start(self, n: int) -> list[ServerProcess]:
        """Start ``n`` replicas at once; return when every one is ready."""
        started = [self.add(f"r{i + 1}") for i in range(n)]
        for server in started:
            with server.log_path.open("ab") as log:
                server.proc = subprocess.Popen(
                    server.command(), stdout=log, stderr=subprocess.STDOUT, env=server.env()
                )
        for server in started:
            server.wait_ready(30.0)
        return self.replicas

    def kill(self) -> None:
        for server in self.replicas:
            server.kill()


@pytest.fixture
def cluster_factory(etcd1: EtcdCluster, tmp_path: Path) -> Iterator[type]:
    made: list[Cluster] = []

    class Factory:
        @staticmethod
        def create(pki: TestPki | None = None) -> Cluster:
            made.append(Cluster(etcd1, tmp_path / f"c{len(made)}", pki))
            made[-1].root.mkdir()
            return made[-1]

    yield Factory
    for cluster in made:
        cluster.kill()


def status(server: ServerProcess) -> pb.ClusterStatus:
    with server.channel() as channel:
        answer: pb.ClusterStatus = pb_grpc.ControlServiceStub(channel).GetClusterStatus(
            pb.GetClusterStatusRequest(), timeout=5.0
        )
    return answer


def leader_of(replicas: list[ServerProcess]) -> tuple[ServerProcess, list[ServerProcess]]:
    """(the one leader, the followers) once every replica agrees on one leader."""

    def agreed() -> bool:
        answers = [status(s) for s in replicas]
        leaders = [a.name for a in answers if a.role == "leader"]
        return len(leaders) == 1 and all(a.leader_name == leaders[0] for a in answers)

    wait_for(agreed, 15.0, 0.2, "one leader named by every replica")
    names = [status(s).role for s in replicas]
    leader = replicas[names.index("leader")]
    return leader, [s for s in replicas if s is not leader]


def test_one_leader_named_everywhere_with_every_replica(cluster_factory: type) -> None:
    replicas = cluster_factory.create().start(3)
    leader, followers = leader_of(replicas)
    head = status(leader)
    assert head.enabled and head.term > 0 and head.ready
    for follower in followers:
        answer = status(follower)
        assert answer.role == "follower" and answer.ready and answer.state == "follower"
        assert answer.leader_advertise == leader.grpc_target and answer.term == head.term
        assert [e.ok for e in answer.etcd] == [True]
        with follower.channel() as channel:  # followers serve: gRPC health says so
            health = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=5.0
            )
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    wait_for(lambda: len(status(followers[0]).replicas) == 3, 10.0, 0.2, "3 replicas listed")
    listed = {r.name: r for r in status(followers[0]).replicas}
    assert set(listed) == {"r1", "r2", "r3"}
    assert listed[head.name].role == "leader" and listed[head.name].advertise == leader.grpc_target
    assert listed[head.name].state == "leader" and head.state == "leader"
    # nexusctl cluster status says the same (table and JSON).
    nexusctl = Path(sys.executable).with_name("nexusctl")
    shown = subprocess.run(
        [str(nexusctl), "--target", followers[0].grpc_target, "cluster", "status", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    doc = json.loads(shown.stdout)
    assert shown.returncode == 0 and doc["role"] == "follower", shown.stderr
    assert doc["leader_name"] == head.name and len(doc["replicas"]) == 3
    table = subprocess.run(
        [str(nexusctl), "--target", leader.grpc_target, "cluster", "status"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert table.returncode == 0 and "leader" in table.stdout and "REPLICA" in table.stdout
    # /health/detailed has the same, and a follower answers core reads with 503 naming the leader.
    code, body, _ = followers[0].http("/health/detailed")
    section = json.loads(body)["cluster"]
    assert code == 200 and section["role"] == "follower" and section["leader_name"] == head.name
    code, body, headers = followers[0].http("/api/v1/nodes")
    error = json.loads(body)["error"]
    assert code == 503 and error["code"] == "not_leader" and leader.grpc_target in error["message"]
    assert headers.get("Retry-After") == "1" and headers.get("Nexus-Leader") == leader.grpc_target
    assert followers[0].stop() == 0  # a follower (no core loaded) stops cleanly too


def _watch(server: ServerProcess, until_index: int, out: list[pb.Event]) -> threading.Thread:
    def run() -> None:
        with server.channel() as channel:
            stream = pb_grpc.ControlServiceStub(channel).WatchEvents(
                pb.WatchEventsRequest(after_index=0), timeout=30.0
            )
            for batch in stream:
                out.extend(batch.events)
                if out and out[-1].index >= until_index:
                    stream.cancel()
                    return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_follower_forwards_submit_and_serves_the_same_events(
    cluster_factory: type, fleet_factory: type
) -> None:
    replicas = cluster_factory.create().start(3)
    leader, followers = leader_of(replicas)
    fleet = fleet_factory.create(leader, 2)
    with followers[0].channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        wait_for(lambda: len(control.ListNodes(pb.ListNodesRequest()).nodes) == 2, 20.0)
        spec = pb.CommandSpec(kind="run", payload=b"hi", idempotency_key="k1")
        answer = control.SubmitCommands(
            pb.SubmitCommandsRequest(commands=[spec], wait_ms=15000), timeout=20.0
        )
        assert len(answer.final) == 1, answer  # reached a final state within wait_ms
        record = answer.final[0]
        assert record.state == pb.COMMAND_STATE_SUCCEEDED, answer
        again = control.GetCommand(pb.GetCommandRequest(id=record.id), timeout=5.0)
        assert again.state == record.state  # a forwarded read
    assert fleet.proc.poll() is None
    # A WebSocket submit on a follower is forwarded too.
    reply = asyncio.run(_ws_submit(followers[1]))
    assert reply["type"] == "submitted" and reply["results"][0]["node_id"], reply
    # A subscriber on a follower sees the leader's events: same indices, same order.
    with leader.channel() as channel:
        last = pb_grpc.ControlServiceStub(channel).ListCommands(pb.ListCommandsRequest())
    assert last.commands
    on_leader: list[pb.Event] = []
    on_follower: list[pb.Event] = []
    head = _head_index(leader)
    threads = [_watch(leader, head, on_leader), _watch(followers[1], head, on_follower)]
    for thread in threads:
        thread.join(20.0)
    keys = [(e.index, e.type, e.key) for e in on_leader if e.index <= head]
    assert keys and keys == [(e.index, e.type, e.key) for e in on_follower if e.index <= head]
    indices = [k[0] for k in keys]
    assert indices == list(range(indices[0], indices[0] + len(indices)))  # contiguous
    assert any(t == "command.succeeded" or t.startswith("command.") for _, t, _ in keys)


async def _ws_submit(server: ServerProcess) -> dict[str, object]:
    client = await PicowsClient.connect(server)
    try:
        client.send({"op": "submit", "id": "w1", "commands": [{"kind": "run", "payload": "aGk="}]})
        return await client.rec.reply(10.0)
    finally:
        await client.close()


def _head_index(server: ServerProcess) -> int:
    _, body, _ = server.http("/api/v1/events?after_index=0&limit=1")
    return int(json.loads(body)["last_index"])


def test_sigterm_of_the_leader_hands_over_fast(cluster_factory: type) -> None:
    replicas = cluster_factory.create().start(2)
    leader, (follower,) = leader_of(replicas)
    old = status(leader).term
    started = time.monotonic()
    assert leader.stop() == 0
    wait_for(lambda: status(follower).role == "leader", 10.0, 0.1, "the follower leads")
    took = time.monotonic() - started
    assert took < 5.0, took
    assert status(follower).term > old
    wait_for(lambda: status(follower).ready, 10.0, 0.1, "new leader ready")
    with follower.channel() as channel:  # and it acts: its core is loaded
        pb_grpc.ControlServiceStub(channel).ListNodes(pb.ListNodesRequest(), timeout=5.0)
    assert follower.stop() == 0


def test_embedded_mode_is_standalone(tmp_path: Path) -> None:
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log").start()
    try:
        answer = status(server)
        assert answer.role == "standalone" and not answer.enabled and not answer.replicas
        _, body, _ = server.http("/health/detailed")
        assert json.loads(body)["cluster"] == {"role": "standalone"}
    finally:
        server.kill()


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('lease_ttl = "100ms"', "cluster.lease_ttl"),
        ('etcd_endpoints = ["nohost"]', "cluster.etcd_endpoints"),
        ('etcd_prefix = "nexus/"', "cluster.etcd_prefix"),
    ],
)
def test_bad_cluster_config_exits_2_with_one_line(tmp_path: Path, line: str, key: str) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(DEV + "[cluster]\nenabled = true\n" + line + "\n")
    done = subprocess.run(
        [sys.executable, "-m", "nexus_fast.cli", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and key in lines[0], done.stderr


def test_unreachable_etcd_is_one_line_and_exit_1(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        DEV + '[cluster]\nenabled = true\netcd_endpoints = ["127.0.0.1:9"]\netcd_timeout = "1s"\n'
    )
    server = ServerProcess(tmp_path / "data", tmp_path / "server.log", config)
    server.proc = subprocess.Popen(
        server.command(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=server.env()
    )
    out, _ = server.proc.communicate(timeout=60)
    assert server.proc.returncode == 1
    errors = [json.loads(x) for x in out.decode().splitlines() if '"level":"error"' in x]
    assert len(errors) == 1 and "etcd unavailable" in errors[0]["msg"], out.decode()[-2000:]


def test_auth_forwarding_speaks_for_the_caller_and_only_replicas_may(
    cluster_factory: type, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("pki")
    argv = ["certs", "--out", str(root), "--replica", "r1", "r2", "--viewer", "handshake"]
    assert credentials_main(argv) == 0
    pki = TestPki(
        root,
        issue_token("ops", "operator", 3600, secret=(root / "jwt.secret").read_bytes().strip()),
    )
    replicas = cluster_factory.create(pki).start(2)
    leader, (follower,) = leader_of(replicas)
    # Accepted: the follower forwards as replica r*, on behalf of the operator.
    with follower.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        assert control.ListNodes(pb.ListNodesRequest(), timeout=10.0).total_matched == 0
    reply = asyncio.run(_ws_submit(follower))  # a WebSocket submit: forwarded as the operator
    assert reply["type"] == "submitted", reply
    admin = ClientAuth(
        tls_ca=str(pki.ca),
        tls_cert=str(pki.root / "viewer-handshake.pem"),
        tls_key=str(pki.root / "viewer-handshake-key.pem"),
        token=issue_token("root", "admin", 3600, secret=pki.secret),
    )
    # A node registers through the follower: forwarded on its behalf, held to its own id.
    node = ClientAuth(
        tls_ca=str(pki.ca),
        tls_cert=str(pki.root / "viewer-handshake.pem"),
        tls_key=str(pki.root / "viewer-handshake-key.pem"),
        token=issue_token("node:fw-n1", "node", 3600, secret=pki.secret),
    )
    with grpc.secure_channel(follower.grpc_target, channel_credentials(node)) as channel:
        nodes = pb_grpc.NodeServiceStub(channel)
        registered = nodes.Register(
            pb.RegisterRequest(node_id="fw-n1", address="10.0.0.9:1", version="test/1"),
            timeout=10.0,
        )
        assert registered.session_epoch > 0
        with pytest.raises(grpc.RpcError) as other:
            nodes.Register(pb.RegisterRequest(node_id="fw-n2", address="10.0.0.9:2"), timeout=10.0)
        assert other.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "only as itself" in (other.value.details() or "")
    with grpc.secure_channel(leader.grpc_target, channel_credentials(admin)) as channel:
        listed = pb_grpc.ControlServiceStub(channel).GetNode(
            pb.GetNodeRequest(node_id="fw-n1"), timeout=5.0
        )
        assert listed.id == "fw-n1"  # registered on the leader's core
        page = pb_grpc.ControlServiceStub(channel).ListAudit(pb.ListAuditRequest(), timeout=5.0)
    submits = [e for e in page.entries if e.method.endswith("SubmitCommands")]
    assert submits and submits[-1].principal == "ops" and submits[-1].role == "operator"
    viewer = ClientAuth(
        tls_ca=str(pki.ca),
        tls_cert=str(pki.root / "viewer-handshake.pem"),
        tls_key=str(pki.root / "viewer-handshake-key.pem"),
        token=issue_token("bob", "viewer", 3600, secret=pki.secret),
    )
    with grpc.secure_channel(follower.grpc_target, channel_credentials(viewer)) as channel:
        control = pb_grpc.ControlServiceStub(channel)
        assert control.GetClusterStatus(pb.GetClusterStatusRequest(), timeout=5.0).ready
        with pytest.raises(grpc.RpcError) as refused:  # the caller's rights, not the replica's
            control.RemoveNode(pb.RemoveNodeRequest(node_id="n1"), timeout=10.0)
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Refused: an operator naming someone else to the leader directly.
    with leader.channel() as channel:
        with pytest.raises(grpc.RpcError) as info:
            pb_grpc.ControlServiceStub(channel).ListNodes(
                pb.ListNodesRequest(), metadata=[("nexus-on-behalf-of", "admin:root")], timeout=5.0
            )
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "replica role" in (info.value.details() or "")


def _open_files(pid: int, name: str) -> int:
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):
            if os.readlink(fd).endswith(name):
                count += 1
    return count


@pytest.mark.once
def test_a_paused_leader_steps_down_and_comes_back_a_clean_follower(
    cluster_factory: type,
) -> None:
    replicas = cluster_factory.create().start(2)
    leader, (follower,) = leader_of(replicas)
    assert leader.proc is not None
    pid = leader.proc.pid
    data_fds = _open_files(pid, "data.mdb")
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: status(follower).role == "leader", 10.0, 0.1, "the follower leads")
    finally:
        os.kill(pid, signal.SIGCONT)
    # Its own clock says the lease is gone: it re-execs (same pid) and follows.
    wait_for(lambda: "restarting as a follower" in leader.log(), 10.0, 0.1, "demotion logged")
    leader.wait_ready(30.0)
    answer = status(leader)
    assert answer.role == "follower" and answer.leader_name == status(follower).name
    assert leader.proc.poll() is None and leader.proc.pid == pid
    # Nothing leaked across exec: the data file is open as often as before.
    assert _open_files(pid, "data.mdb") == data_fds
    assert _open_files(pid, "lock.mdb") <= 1
