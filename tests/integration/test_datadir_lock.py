"""One server per data directory, and the directory is private (issue 10 #1, issue 9)."""

from __future__ import annotations

import json
import signal
import stat
import subprocess

import pytest

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import ServerProcess, http_get

pytestmark = pytest.mark.integration


def test_second_server_on_the_same_data_dir_exits_1_naming_dir_and_pid(
    server_factory: type,
) -> None:
    first: ServerProcess = server_factory.create().start()
    assert first.proc is not None
    second: ServerProcess = server_factory.create(data_dir=first.data_dir)  # other ports
    result = subprocess.run(
        second.command(),
        capture_output=True,
        text=True,
        timeout=60,
        env={**second.env(), "NEXUS_LOG_LEVEL": "warning"},
    )
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    message = json.loads(lines[0])["msg"]
    assert f"database {first.data_dir} is in use by pid {first.proc.pid}" in message, message

    # The first server was not disturbed: it still writes and says healthy.
    with first.channel() as channel:
        reply = pb_grpc.NodeServiceStub(channel).Register(
            pb.RegisterRequest(node_id="after-second"), timeout=5
        )
    assert reply.session_epoch == 1
    assert http_get(first.http_base + "/health")[0] == 200

    # Once the holder stops, the directory is free again.
    assert first.stop(signal.SIGTERM) == 0
    third = server_factory.create(data_dir=first.data_dir).start()
    assert third.stop(signal.SIGTERM) == 0


def test_data_dir_and_files_are_created_private(server_factory: type) -> None:
    server: ServerProcess = server_factory.create().start()
    assert server.stop(signal.SIGTERM) == 0
    assert stat.S_IMODE(server.data_dir.stat().st_mode) == 0o700
    names = sorted(p.name for p in server.data_dir.iterdir())
    assert names == ["data.mdb", "lock.mdb", "nexus.lock"], names
    for path in server.data_dir.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
