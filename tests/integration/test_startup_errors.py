"""A server that cannot start says why in one line on stderr and exits 1, no traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import HOST, REPO, ServerProcess

pytestmark = pytest.mark.integration


def failed_start(server: ServerProcess, *, cwd: Path = REPO, **env: str) -> str:
    """Run the server's command to completion; assert exit 1 and return its one line."""
    result = subprocess.run(
        server.command(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**server.env(), "NEXUS_LOG_LEVEL": "warning", **env},
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stdout == "", result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line = lines[0]
    if line.startswith("{"):
        record = json.loads(line)
        assert record["level"] == "error", line
        return str(record["msg"])
    return line


def test_db_path_that_cannot_be_created(server_factory: type) -> None:
    line = failed_start(server_factory.create(data_dir=Path("/proc/nope")))
    assert "cannot create database directory /proc/nope" in line, line


def test_db_path_that_is_a_regular_file(server_factory: type, tmp_path: Path) -> None:
    path = tmp_path / "a-file"
    path.write_text("not a database")
    line = failed_start(server_factory.create(data_dir=path))
    assert f"database path {path} exists and is not a directory" in line, line
    assert path.read_text() == "not a database"


@pytest.mark.parametrize(
    ("name", "attribute", "flag", "env"),
    [
        ("grpc", "grpc_port", "--grpc-port", "NEXUS_GRPC_PORT"),
        ("websocket", "ws_port", "--ws-port", "NEXUS_WS_PORT"),
        ("http", "http_port", "--http-port", "NEXUS_HTTP_PORT"),
    ],
)
def test_port_in_use_names_port_flag_and_env(
    server_factory: type, name: str, attribute: str, flag: str, env: str
) -> None:
    server: ServerProcess = server_factory.create()
    port = getattr(server, attribute)
    with socket.socket() as blocker:
        blocker.bind((HOST, port))
        blocker.listen()
        line = failed_start(server)
    assert line == (
        f"{name}: cannot listen on {HOST}:{port}: address already in use "
        f"(change it with {flag} or {env})"
    ), line
    # The lock taken before the port check was released: the same dir starts now.
    server.start()
    assert server.stop(signal.SIGTERM) == 0


# A pure build as the importer sees it: no compiled twin can be imported (the editable
# install's finder would find the .so files even from a copy of the package without them).
PURE_BUILD = (
    "import sys\n"
    "for name in ('ring', 'queue', 'scoring'):\n"
    "    sys.modules[f'nexus_fast._{name}_c'] = None\n"
    "from nexus_fast.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_pure_build_with_require_extensions(server_factory: type) -> None:
    server: ServerProcess = server_factory.create()
    command = [sys.executable, "-c", PURE_BUILD, *server.command()[3:]]
    # NEXUS_NO_EXTENSIONS (the pure CI run sets it) would override the requirement.
    env = {k: v for k, v in server.env().items() if k != "NEXUS_NO_EXTENSIONS"}
    env["NEXUS_REQUIRE_EXTENSIONS"] = "1"
    result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=REPO, env=env)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and result.stdout == "", result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nexus-fast: cannot start: NEXUS_REQUIRE_EXTENSIONS=1"), lines
    assert "nexus_fast._ring_c" in lines[0] and "make install" in lines[0], lines
    # The same pure build without the requirement runs the twins and says so.
    probe = subprocess.run(
        [sys.executable, "-c", PURE_BUILD, "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if k != "NEXUS_REQUIRE_EXTENSIONS"},
    )
    assert probe.returncode == 0 and "ring=py" in probe.stdout, probe.stdout + probe.stderr
