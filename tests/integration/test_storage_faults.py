"""Storage faults on the real server: the map grows when full; a full disk (a small tmpfs
the test mounts) gives a clear RESOURCE_EXHAUSTED while reads serve and health says so,
writes recover when space returns, and nothing acknowledged is lost across a restart.

Mounting needs root (CAP_SYS_ADMIN). Without it the disk-full test falls back to the
writer failpoint ``store.commit=error(enospc)``, which raises the error LMDB gives on a full
disk; the test's output says which ran (``-rP`` shows it).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import ServerProcess, wait_for

PAYLOAD = 100_000


def submit(control: pb_grpc.ControlServiceStub, key: str, size: int = PAYLOAD) -> str:
    spec = pb.CommandSpec(kind="fill", payload=os.urandom(size), idempotency_key=key)
    answer = control.SubmitCommands(pb.SubmitCommandsRequest(commands=[spec]), timeout=10)
    return answer.results[0].id


def store_status(server: ServerProcess) -> tuple[int, dict[str, object]]:
    status, body, _ = server.http("/health/detailed")
    return status, json.loads(body)["components"]["store"]


def grpc_serving(channel: grpc.Channel) -> int:
    stub = health_pb2_grpc.HealthStub(channel)
    return int(stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5).status)


def metric(server: ServerProcess, name: str, labels: str) -> float:
    _, body, _ = server.http("/metrics")
    found = re.search(rf"^{name}\{{{labels}\}} (\S+)$", body.decode(), re.M)
    return float(found.group(1)) if found else 0.0


def test_a_full_map_grows_and_keeps_everything(server_factory: type) -> None:
    server: ServerProcess = server_factory.create(
        NEXUS_DB_CACHE_SIZE="1MB", NEXUS_DB_MAX_MAP_SIZE="256MB"
    ).start()
    _, store = store_status(server)
    assert store["map_size"] == 1 << 20, store
    keys = [f"grow-{i}" for i in range(40)]  # 4 MB of payloads into a 1 MB map
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        for key in keys:
            assert submit(control, key) == key
    status, store = store_status(server)
    assert status == 200 and store["status"] == "ok", store
    assert isinstance(store["map_size"], int) and store["map_size"] >= 4 << 20, store
    assert metric(server, "nexus_db_operations_total", 'operation="grow"') >= 2
    assert server.stop() == 0
    again = server_factory.create(data_dir=server.data_dir, same_ports_as=server).start()
    with again.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        for key in keys:
            record = control.GetCommand(pb.GetCommandRequest(id=key), timeout=5)
            assert len(record.spec.payload) == PAYLOAD


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A 6 MB tmpfs (``"tmpfs"``), or a plain directory when mounting is refused."""
    where = tmp_path / "disk"
    where.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=6m,mode=0700", "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        print(f"disk full: mount refused ({mounted.stderr.strip()}); failpoint ENOSPC instead")
        yield where, "failpoint"
        return
    print("disk full: a real 6 MB tmpfs")
    try:
        yield where, "tmpfs"
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_refuses_writes_clearly_and_recovers(
    server_factory: type, small_disk: tuple[Path, str]
) -> None:
    disk, kind = small_disk
    env = {"NEXUS_DB_CACHE_SIZE": "64MB"}  # a map far larger than the disk
    ballast = disk / "ballast"
    if kind == "tmpfs":
        ballast.write_bytes(bytes(1 << 20))  # freed later: "space returns"
    else:
        env["NEXUS_FAILPOINTS"] = "stream.send=delay(1ms)"  # set later, over the RPC
    server: ServerProcess = server_factory.create(data_dir=disk / "data", **env).start()
    accepted: list[str] = []
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        with pytest.raises(grpc.RpcError) as info:
            for i in range(200):
                if kind == "failpoint" and i == 5:
                    control.SetFailpoints(
                        pb.SetFailpointsRequest(spec="store.commit=error(enospc)"), timeout=5
                    )
                accepted.append(submit(control, f"fill-{i}"))
        error = info.value
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, error.details()
        assert error.details().startswith("store full: no space left on the device"), (
            error.details()
        )
        assert ("retry-after-ms", "5000") in tuple(error.trailing_metadata() or ())
        assert len(accepted) >= 5, accepted
        refused = f"fill-{len(accepted)}"

        # Health says so, on every surface.
        status, store = store_status(server)
        assert status == 503 and store["status"] == "failed", store
        assert str(store["reason"]).startswith("store full: no space left"), store
        assert server.http("/health")[0] == 503 and server.http("/ready")[0] == 503
        wait_for(
            lambda: grpc_serving(channel) == health_pb2.HealthCheckResponse.NOT_SERVING,
            10,
            message="gRPC health NOT_SERVING",
        )
        # Reads keep serving: every acknowledged command is there.
        for key in accepted:
            record = control.GetCommand(pb.GetCommandRequest(id=key), timeout=5)
            assert len(record.spec.payload) == PAYLOAD
        with pytest.raises(grpc.RpcError) as again:  # still full: still refused, still clear
            submit(control, refused)
        assert again.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED

        # Space returns: the next write goes through and health recovers.
        if kind == "tmpfs":
            ballast.unlink()
        else:
            control.SetFailpoints(pb.SetFailpointsRequest(spec=""), timeout=5)
        assert submit(control, "after-space-returned", 1000) == "after-space-returned"
        status, store = store_status(server)
        assert status == 200 and store["status"] == "ok", store
        wait_for(
            lambda: grpc_serving(channel) == health_pb2.HealthCheckResponse.SERVING,
            10,
            message="gRPC health SERVING again",
        )
    assert server.stop() == 0

    # Nothing acknowledged lost, nothing refused half-written, across a restart.
    server = server_factory.create(data_dir=disk / "data", same_ports_as=server).start()
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        for key in [*accepted, "after-space-returned"]:
            assert control.GetCommand(pb.GetCommandRequest(id=key), timeout=5).id == key
        with pytest.raises(grpc.RpcError) as missing:
            control.GetCommand(pb.GetCommandRequest(id=refused), timeout=5)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    log = server.log_path.read_text(errors="replace")
    assert "Traceback" not in log and "unhandled error" not in log, log[-3000:]
