"""The audit log against the real server: mutating calls land in the ``audit`` table (with
who, from where, on what, how it ended), ``ListAudit`` is admin-only, and the offline
``nexus-fast audit verify`` finds a flipped byte and names the entry."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import lmdb
import pytest
from websockets.sync.client import connect

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .auth_util import (
    SecureServer,
    bearer,
    grpc_channel,
    nexus_cli,
    running,
    secure_server,
    token,
    ws_op,
)
from .conftest import ServerProcess, wait_for
from .events_util import GiB, ws_url

CONTROL = "ControlService/"


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[SecureServer]:
    with running(secure_server(tmp_path_factory.mktemp("audit"), pki)) as process:
        yield process


def _all_entries(control: pb_grpc.ControlServiceStub, metadata: object) -> list[pb.AuditEntry]:
    entries: list[pb.AuditEntry] = []
    after = 0
    while True:
        page = control.ListAudit(pb.ListAuditRequest(after_seq=after, limit=3), metadata=metadata)
        entries.extend(page.entries)
        assert len(page.entries) <= 3
        if not page.more:
            return entries
        assert page.next_after_seq == page.entries[-1].seq
        after = page.next_after_seq


def _find(entries: list[pb.AuditEntry], method: str, outcome: str = "ok") -> pb.AuditEntry:
    found = [e for e in entries if e.method == method and e.outcome == outcome]
    assert found, f"no {method} {outcome} entry in {[(e.method, e.outcome) for e in entries]}"
    return found[-1]


def test_mutating_calls_are_audited_with_who_what_and_outcome(
    secure: SecureServer, pki: Path
) -> None:
    operator = bearer(token(pki, "olga", "operator"))
    admin = bearer(token(pki, "ada", "admin"))
    viewer = bearer(token(pki, "vic", "viewer"))
    node = bearer(token(pki, "node:n1", "node"))
    with grpc_channel(secure, pki) as channel:
        nodes = pb_grpc.NodeServiceStub(channel)
        control = pb_grpc.ControlServiceStub(channel)
        nodes.Register(
            pb.RegisterRequest(
                node_id="n1", address="10.0.0.1:7000", capacity=pb.Resources(cpu=8, memory=GiB)
            ),
            metadata=node,
            timeout=5,
        )
        submitted = control.SubmitCommands(
            pb.SubmitCommandsRequest(
                commands=[
                    pb.CommandSpec(kind="echo", idempotency_key="audit-cmd-1", target_node="n1"),
                    pb.CommandSpec(kind="echo", idempotency_key="audit-cmd-2", target_node="n1"),
                ]
            ),
            metadata=(*operator, ("x-request-id", "req-submit-7")),
            timeout=5,
        )
        assert [r.id for r in submitted.results] == ["audit-cmd-1", "audit-cmd-2"]
        control.DeployAgent(
            pb.DeployAgentRequest(
                spec=pb.AgentSpec(name="audited", replicas=1, request=pb.Resources(cpu=1))
            ),
            metadata=operator,
            timeout=5,
        )
        control.DrainNode(pb.DrainNodeRequest(node_id="n1", drain=True), metadata=operator)
        with pytest.raises(grpc.RpcError) as refused:
            control.SubmitCommands(
                pb.SubmitCommandsRequest(commands=[pb.CommandSpec(kind="echo")]), metadata=viewer
            )
        assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as bad:  # a failure, not a refusal: audited too
            control.DrainNode(pb.DrainNodeRequest(node_id="no-such-node"), metadata=operator)
        assert bad.value.code() == grpc.StatusCode.NOT_FOUND

        # Only admins read the log.
        for who in (viewer, operator):
            with pytest.raises(grpc.RpcError) as denied:
                control.ListAudit(pb.ListAuditRequest(), metadata=who)
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED

        # A refusal's entry is its own commit, made as the refusal is sent: poll for it.
        entries: list[pb.AuditEntry] = []

        def refusals_logged() -> bool:
            entries[:] = _all_entries(control, admin)
            return {e.outcome for e in entries} >= {"PERMISSION_DENIED", "NOT_FOUND"}

        wait_for(refusals_logged, 10, message="refusal entries")

    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
    register = _find(entries, "NodeService/Register")
    assert (register.principal, register.role, register.target) == ("node:n1", "node", "n1")
    submit = _find(entries, CONTROL + "SubmitCommands")
    assert (submit.principal, submit.role) == ("olga", "operator")
    assert submit.target == "2 commands: audit-cmd-1,audit-cmd-2"
    assert submit.request_id == "req-submit-7"
    assert submit.peer.startswith("ipv4:127.0.0.1:") and len(submit.hash) == 32
    deploy = _find(entries, CONTROL + "DeployAgent")
    assert (deploy.principal, deploy.target) == ("olga", "audited")
    drain = _find(entries, CONTROL + "DrainNode")
    assert (drain.principal, drain.target) == ("olga", "n1") and drain.request_id
    denied_entry = _find(entries, CONTROL + "SubmitCommands", "PERMISSION_DENIED")
    assert (denied_entry.principal, denied_entry.role) == ("vic", "viewer")
    failed = _find(entries, CONTROL + "DrainNode", "NOT_FOUND")
    assert failed.target == "no-such-node"
    # Reads are not audited; the ListAudit refusals are (audit.read is no write).
    assert not [e for e in entries if e.method.endswith(("ListAudit", "GetNode"))]


def test_auth_off_audits_anonymous_and_verify_finds_a_flipped_byte(
    server_factory: type, tmp_path: Path
) -> None:
    data = tmp_path / "open-data"
    server: ServerProcess = server_factory.create(data_dir=data).start()
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        for i in range(3):
            control.SubmitCommands(
                pb.SubmitCommandsRequest(
                    commands=[pb.CommandSpec(kind="echo", idempotency_key=f"open-{i}")]
                ),
                timeout=5,
            )
        with connect(ws_url(server), open_timeout=15) as conn:
            reply = ws_op(conn, {"op": "submit", "commands": [{"kind": "echo",
                                 "idempotency_key": "ws-1"}], "request_id": "ws-req"})  # fmt: skip
            assert reply["type"] == "submitted", reply
        again = control.SubmitCommands(  # no change, still a call: its own entry
            pb.SubmitCommandsRequest(
                commands=[pb.CommandSpec(kind="echo", idempotency_key="open-0")]
            ),
            timeout=5,
        )
        assert again.results[0].duplicate
        entries = control.ListAudit(pb.ListAuditRequest(), timeout=5).entries
    assert [(e.principal, e.method, e.target) for e in entries[:3]] == [
        ("anonymous", CONTROL + "SubmitCommands", f"1 commands: open-{i}") for i in range(3)
    ]
    ws_entry = entries[3]
    assert (ws_entry.principal, ws_entry.method, ws_entry.target, ws_entry.request_id) == (
        "anonymous",
        "ws/submit",
        "1 commands: ws-1",
        "ws-req",
    )
    assert ws_entry.peer.startswith("127.0.0.1:")
    assert [(e.method, e.target, e.outcome) for e in entries[4:]] == [
        (CONTROL + "SubmitCommands", "1 commands: open-0", "ok")
    ]
    assert server.stop() == 0

    ok = nexus_cli("audit", "verify", "--db-path", str(data))
    assert ok.returncode == 0, ok.stderr

    # Flip one byte inside entry 2's body, as someone editing the file would.
    env = lmdb.open(str(data), max_dbs=32, subdir=True)
    try:
        audit = env.open_db(b"audit")
        with env.begin(write=True, db=audit) as txn:
            key = (2).to_bytes(8, "big")
            value = bytearray(txn.get(key))
            at = value.index(b"anonymous")
            value[at] ^= 0x01
            txn.put(key, bytes(value))
    finally:
        env.close()
    broken = nexus_cli("audit", "verify", "--db-path", str(data))
    assert broken.returncode != 0
    assert "BROKEN at entry 2:" in broken.stderr, broken.stderr
