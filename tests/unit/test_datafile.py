"""The data file's header check, the crash guard, the event-log fold and check's findings."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
from pathlib import Path

import lmdb
import pytest

from nexus_fast.codec.protowire import event
from nexus_fast.core.replay import EventLogPruned, ReplayError, fold
from nexus_fast.data_cli import load_snapshot
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store import LmdbStore, Put
from nexus_fast.store.check import check_store
from nexus_fast.store.datafile import DataFileError, inspect


def make_store(path: Path, events: list[bytes], ops: list[Put] | None = None) -> None:
    async def write() -> None:
        store = LmdbStore(path, map_size=1 << 22)
        await store.open()
        first_ops = list(ops or [])
        for body in events:
            await store.commit(first_ops, [body])
            first_ops = []
        await store.close()

    asyncio.run(write())


def node_event(node_id: str, kind: str, status: int = pb.NODE_STATUS_READY, ts: int = 1) -> bytes:
    body = pb.Node(id=node_id, status=status).SerializeToString()  # type: ignore[arg-type]
    return event("node", kind, node_id, body, ts)


def test_inspect_accepts_a_store_and_names_a_truncated_or_foreign_file(tmp_path: Path) -> None:
    make_store(tmp_path / "d", [node_event("n1", "node.registered")])
    header = inspect(tmp_path / "d")
    assert header.page_size == 4096 and header.file_size >= (header.last_page + 1) * 4096
    file = tmp_path / "d" / "data.mdb"
    file.write_bytes(file.read_bytes()[: 3 * 4096])
    with pytest.raises(DataFileError, match="truncated"):
        inspect(tmp_path / "d")
    file.write_bytes(b"not a database" * 1000)
    with pytest.raises(DataFileError, match="not an LMDB data file"):
        inspect(tmp_path / "d")
    with pytest.raises(DataFileError, match="no such file"):
        inspect(tmp_path / "nowhere")


def test_a_crash_inside_the_guard_is_one_line_and_exit_1() -> None:
    code = (
        "import ctypes\n"
        "from nexus_fast.store.datafile import crash_guard\n"
        "with crash_guard('data.mdb: reading it crashed'):\n"
        "    ctypes.string_at(0)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr == "data.mdb: reading it crashed\n"


def test_fold_rebuilds_nodes_and_drops_removed_ones() -> None:
    log = [
        (1, node_event("a", "node.registered")),
        (2, node_event("b", "node.registered")),
        (3, node_event("a", "node.down", pb.NODE_STATUS_DOWN, ts=5)),
        (4, node_event("b", "node.removed", pb.NODE_STATUS_REMOVED, ts=9)),
    ]
    assert fold(log, 2).nodes.keys() == {"a", "b"}
    at3 = fold(log, 3)
    assert at3.nodes["a"].status == pb.NODE_STATUS_DOWN and at3.time_ms == 5
    assert fold(log).nodes.keys() == {"a"} and fold(log).index == 4
    assert fold(log, until_time_ms=5).index == 3
    with pytest.raises(ReplayError, match="the log ends at 4"):
        fold(log, 7)
    with pytest.raises(EventLogPruned, match="oldest event kept is 3"):
        fold(log[2:], 3)
    with pytest.raises(ReplayError, match="event 2 is missing"):
        fold([log[0], log[2]], 3)


def test_replay_of_a_pruned_log_names_the_oldest_index(tmp_path: Path) -> None:
    make_store(tmp_path / "d", [node_event(f"n{i}", "node.registered") for i in range(5)])

    async def prune() -> None:
        store = LmdbStore(tmp_path / "d")
        await store.open()
        await store.prune_events(2)
        await store.close()

    asyncio.run(prune())
    with pytest.raises(EventLogPruned) as info:
        load_snapshot(tmp_path / "d", 4)
    assert info.value.oldest == 3


def test_check_names_a_gap_a_bad_record_and_a_state_that_disagrees(tmp_path: Path) -> None:
    node = pb.Node(id="n1", status=pb.NODE_STATUS_READY)
    make_store(
        tmp_path / "d",
        [node_event(f"n{i}", "node.registered") for i in (1, 2, 3)],
        [Put("nodes", b"n1", node.SerializeToString())],
    )
    assert check_store(tmp_path / "d") == []
    env = lmdb.open(str(tmp_path / "d"), max_dbs=32)
    events, nodes = env.open_db(b"events"), env.open_db(b"nodes")
    with env.begin(write=True) as txn:
        txn.delete(struct.pack(">Q", 2), db=events)
        down = pb.Node(id="n1", status=pb.NODE_STATUS_DOWN).SerializeToString()
        txn.put(b"n1", down, db=nodes)
        txn.put(b"n9", b"\xff\xff\xff", db=nodes)
    env.close()
    problems = [str(p) for p in check_store(tmp_path / "d")]
    assert problems == [
        "nodes n1: stored state NODE_STATUS_DOWN but its last event 1 (node.registered) "
        "says NODE_STATUS_READY",
        problems[1],
        "events 2: missing: the log jumps from 1 to 3",
    ], problems
    assert problems[1].startswith("nodes n9: does not decode as Node"), problems
