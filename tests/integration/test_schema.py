"""Schema versions and damaged data files, against the real server process.

* A data dir written by the previous record layout (``tests/fixtures/datadir-v1``, made by
  the code before schema versions existed) is migrated at start, after a backup, and
  serves the same nodes, commands, agents and events.
* A data dir stamped with a newer version is refused by this (older) server: one line,
  exit 1.
* A damaged data file (a page in the middle overwritten, or the file truncated) stops the
  start with one line naming the file and what to run, exit 1, every time (no crash),
  and ``nexus-fast check`` names the problem.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import random
import shutil
import stat
import struct
from pathlib import Path
from typing import Any

import lmdb
import pytest

from nexus_fast.store import LmdbStore

from .conftest import REPO, ServerProcess, run_module
from .test_startup_errors import failed_start

FIXTURE = REPO / "tests" / "fixtures" / "datadir-v1"
PAGE = 4096


def v1_data_dir(path: Path) -> Path:
    path.mkdir(mode=0o700)
    with gzip.open(FIXTURE / "data.mdb.gz", "rb") as src, (path / "data.mdb").open("wb") as dst:
        shutil.copyfileobj(src, dst)
    return path


def v2_data_dir(path: Path) -> Path:
    """The fixture, migrated by this code's store (opened and closed once)."""
    v1_data_dir(path)

    async def open_close() -> None:
        store = LmdbStore(path)
        await store.open()
        await store.close()

    asyncio.run(open_close())
    for backup in path.glob("pre-migration-*"):
        backup.unlink()
    return path


def nexus(*args: str) -> tuple[int, str, str]:
    result = run_module("nexus_fast.cli", *args)
    return result.returncode, result.stdout, result.stderr


def get_json(server: ServerProcess, path: str) -> Any:
    status, body, _ = server.http(path)
    assert status == 200, (path, status, body)
    return json.loads(body)


_NODE_FIELDS = (
    "id",
    "address",
    "labels",
    "capacity",
    "status",
    "eligible",
    "draining",
    "drain_reason",
    "session_epoch",
    "registered_ms",
    "version",
)


def test_a_v1_data_dir_is_migrated_after_a_backup_and_keeps_its_data(
    server_factory: type, tmp_path: Path
) -> None:
    expected = json.loads((FIXTURE / "expected.json").read_text())
    data = v1_data_dir(tmp_path / "data")
    code, out, _ = nexus("check", "--db-path", str(data))
    assert code == 0 and "schema version 1" in out, out

    server: ServerProcess = server_factory.create(data_dir=data).start()
    nodes = get_json(server, "/api/v1/nodes")["nodes"]
    agents = get_json(server, "/api/v1/agents")["agents"]
    commands = [get_json(server, f"/api/v1/commands/{c['id']}") for c in expected["commands"]]
    last = get_json(server, "/health/detailed")["components"]["store"]["last_event_index"]
    assert server.stop() == 0
    assert "migrating database" in server.log() and "to schema version 2" in server.log()

    def pick(node: dict[str, Any]) -> dict[str, Any]:
        return {k: node[k] for k in _NODE_FIELDS}

    assert [pick(n) for n in nodes] == [pick(n) for n in expected["nodes"]]
    assert commands == expected["commands"]
    assert [(a["id"], a["node_id"], a["spec"]) for a in agents] == [
        (a["id"], a["node_id"], a["spec"]) for a in expected["agents"]
    ]
    # The old events are all there, and the new ones follow them without a gap.
    assert last > expected["last_event_index"]
    server.start()
    status, body, _ = server.http("/api/v1/events?limit=5")
    assert status == 200 and json.loads(body)["events"][0]["index"] == 1
    assert server.stop() == 0

    backups = list(data.glob("pre-migration-v1-*.mdb"))
    assert len(backups) == 1 and stat.S_IMODE(backups[0].stat().st_mode) == 0o600
    code, out, _ = nexus("check", "--db-path", str(backups[0]))
    assert code == 0 and "schema version 1" in out, out
    # The second start (above) did not migrate again; the result passes check.
    assert server.log().count("migrating database") == 1
    code, out, err = nexus("check", "--db-path", str(data))
    assert code == 0 and "schema version 2" in out, out + err


def test_an_older_server_refuses_a_newer_data_dir(server_factory: type, tmp_path: Path) -> None:
    data = v2_data_dir(tmp_path / "data")
    env = lmdb.open(str(data), max_dbs=32)
    with env.begin(write=True, db=env.open_db(b"meta")) as txn:
        txn.put(b"schema_version", struct.pack(">Q", 3))
    env.close()
    line = failed_start(server_factory.create(data_dir=data))
    assert line == (
        f"database {data} has schema version 3, newer than this server's 2: run the newer "
        "nexus-fast, or restore a backup made by this version"
    ), line


def _command_page(data: bytes) -> int:
    """The number of a leaf page holding command records (the server reads it at start)."""
    for number in range(2, len(data) // PAGE):
        page = data[number * PAGE : (number + 1) * PAGE]
        if page[10:12] == b"\x02\x00" and b"c/1a235eb7" in page:  # P_LEAF
            return number
    raise AssertionError("no command leaf page")


@pytest.mark.parametrize("damage", ["page", "truncated"])
def test_a_damaged_data_file_stops_the_start_in_one_line(
    server_factory: type, tmp_path: Path, damage: str
) -> None:
    data = v2_data_dir(tmp_path / "data")
    file = data / "data.mdb"
    raw = bytearray(file.read_bytes())
    if damage == "page":
        number = _command_page(raw)
        rnd = random.Random(7)
        raw[number * PAGE + 16 : (number + 1) * PAGE] = rnd.randbytes(PAGE - 16)
    else:
        raw = raw[: len(raw) // 2]
    file.write_bytes(bytes(raw))

    server: ServerProcess = server_factory.create(data_dir=data)
    for _ in range(2):  # every start ends the same way: exit 1, never a crash by signal
        line = failed_start(server)
        assert str(file) in line and f"nexus-fast check --db-path {data}" in line, line
        assert "nexus-fast restore" in line, line
    if damage == "truncated":
        assert "truncated" in line, line

    code, out, err = nexus("check", "--db-path", str(data))
    assert code == 1, out + err
    problem = out.strip().splitlines()[0]
    if damage == "page":
        assert problem.startswith("commands"), out
    else:
        assert problem.startswith("data.mdb") and "truncated" in problem, out
