"""Failpoints on the real server: NEXUS_FAILPOINTS at start, the admin-only
SetFailpoints/ListFailpoints RPCs, /health/detailed, and what an injected fault does."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .auth_util import SecureServer, bearer, grpc_channel, running, secure_server, token
from .conftest import REPO, ServerProcess, wait_for


def submit(control: pb_grpc.ControlServiceStub, key: str, timeout: float = 10) -> str:
    spec = pb.CommandSpec(kind="echo", idempotency_key=key)
    answer = control.SubmitCommands(pb.SubmitCommandsRequest(commands=[spec]), timeout=timeout)
    return answer.results[0].id


def detailed(server: ServerProcess) -> tuple[int, dict[str, object]]:
    status, body, _ = server.http("/health/detailed")
    return status, json.loads(body)


def test_env_sets_them_health_lists_them_and_the_rpc_replaces_them(server_factory: type) -> None:
    server: ServerProcess = server_factory.create(
        NEXUS_FAILPOINTS="stream.send=delay(1ms);store.backup=error@3"
    ).start()
    assert "failpoints set: stream.send=delay(1ms);store.backup=error@3" in server.log()
    _, health = detailed(server)
    assert [fp["spec"] for fp in health["failpoints"]] == [  # type: ignore[union-attr,index]
        "stream.send=delay(1ms)",
        "store.backup=error@3",
    ]
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        listed = control.ListFailpoints(pb.ListFailpointsRequest(), timeout=5)
        assert [fp.name for fp in listed.failpoints] == ["stream.send", "store.backup"]
        names = {line.split(":")[0] for line in listed.available}
        assert {"store.after_commit", "commands.before_reply", "store.map_grow"} <= names

        # Injected ENOSPC on every commit: the clear refusal, reads serve, health says so.
        submit(control, "before")
        answer = control.SetFailpoints(
            pb.SetFailpointsRequest(spec="store.commit=error(enospc)"), timeout=5
        )
        assert [fp.spec for fp in answer.failpoints] == ["store.commit=error(enospc)"]
        with pytest.raises(grpc.RpcError) as full:
            submit(control, "refused")
        assert full.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, full.value.details()
        assert full.value.details().startswith("store full: no space left"), full.value.details()
        status, health = detailed(server)
        assert status == 503 and health["failpoints"][0]["fired"] >= 1  # type: ignore[index]
        store = health["components"]["store"]  # type: ignore[index]
        assert store["reason"].startswith("store full"), store
        assert control.GetCommand(pb.GetCommandRequest(id="before"), timeout=5).id == "before"
        # Any other write error: UNAVAILABLE with the reason, never INTERNAL.
        control.SetFailpoints(pb.SetFailpointsRequest(spec="store.commit=error"), timeout=5)
        with pytest.raises(grpc.RpcError) as failing:
            submit(control, "refused")
        assert failing.value.code() == grpc.StatusCode.UNAVAILABLE, failing.value.details()
        assert failing.value.details().startswith("commit failed:"), failing.value.details()
        assert "failpoint store.commit: injected write error" in failing.value.details()

        # Space is back: the next write heals the store.
        control.SetFailpoints(pb.SetFailpointsRequest(spec="stream.send=delay(1ms)"), timeout=5)
        submit(control, "after")
        status, health = detailed(server)
        assert status == 200, health
        with pytest.raises(grpc.RpcError) as missing:
            control.GetCommand(pb.GetCommandRequest(id="refused"), timeout=5)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

        with pytest.raises(grpc.RpcError) as bad:
            control.SetFailpoints(pb.SetFailpointsRequest(spec="store.commit=explode"), timeout=5)
        assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "unknown action 'explode'" in bad.value.details()
        assert len(control.ListFailpoints(pb.ListFailpointsRequest()).failpoints) == 1  # kept

        cleared = control.SetFailpoints(pb.SetFailpointsRequest(spec=""), timeout=5)
        assert list(cleared.failpoints) == []
    _, health = detailed(server)
    assert health["failpoints"] == []
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]


def test_a_paused_writer_holds_writes_while_reads_and_health_serve(server_factory: type) -> None:
    server: ServerProcess = server_factory.create().start()
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        submit(control, "first")
        control.SetFailpoints(pb.SetFailpointsRequest(spec="store.before_commit=pause"))
        answered: list[str] = []
        writer = threading.Thread(target=lambda: answered.append(submit(control, "held", 30)))
        writer.start()
        wait_for(
            lambda: detailed(server)[1]["failpoints"][0]["fired"] >= 1,  # type: ignore[index]
            10,
            message="the writer reached the pause",
        )
        for _ in range(5):  # the loop answers reads while the writer thread waits
            assert control.GetCommand(pb.GetCommandRequest(id="first"), timeout=2).id == "first"
            assert server.http("/live")[0] == 200
        assert not answered
        control.SetFailpoints(pb.SetFailpointsRequest(spec=""), timeout=5)
        writer.join(30)
        assert answered == ["held"]


def test_a_bad_spec_stops_start_up_with_exit_2(server_factory: type) -> None:
    server: ServerProcess = server_factory.create(NEXUS_FAILPOINTS="store.nothing=crash")
    done = subprocess.run(
        server.command(), env=server.env(), capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("nexus-fast: invalid NEXUS_FAILPOINTS: failpoint"), done.stderr
    assert "unknown name 'store.nothing'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.fixture(scope="module")
def secure(tmp_path_factory: pytest.TempPathFactory, pki: Path) -> Iterator[SecureServer]:
    with running(secure_server(tmp_path_factory.mktemp("failpoints"), pki)) as process:
        yield process


def test_only_admins_set_or_list_failpoints(secure: SecureServer, pki: Path) -> None:
    admin = bearer(token(pki, "ada", "admin"))
    with grpc_channel(secure, pki) as channel:
        control = pb_grpc.ControlServiceStub(channel)
        for role in ("operator", "viewer"):
            who = bearer(token(pki, f"{role}-1", role))
            for call, request in (
                (control.SetFailpoints, pb.SetFailpointsRequest(spec="stream.send=pause")),
                (control.ListFailpoints, pb.ListFailpointsRequest()),
            ):
                with pytest.raises(grpc.RpcError) as denied:
                    call(request, metadata=who, timeout=5)
                assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED, role
        set_ = control.SetFailpoints(
            pb.SetFailpointsRequest(spec="stream.send=delay(1ms)"), metadata=admin, timeout=5
        )
        assert [fp.spec for fp in set_.failpoints] == ["stream.send=delay(1ms)"]
        listed = control.ListFailpoints(pb.ListFailpointsRequest(), metadata=admin, timeout=5)
        assert [fp.name for fp in listed.failpoints] == ["stream.send"]
