"""Backup under write load, restore, start on it, check (issue 14, acceptance item 2).

A real server runs a ``nexus-node`` fleet while a client keeps submitting commands over
gRPC; ``nexus-fast backup`` copies the store from another process meanwhile. The copy is
restored into a fresh directory and a second server starts on it: it serves the nodes,
commands and events the copy holds, with the same event indices as the original's log.
``nexus-fast check`` passes on the copy and on the restored dir, and names the record
after one command record's bytes are flipped.
"""

from __future__ import annotations

import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path

import lmdb
import pytest

from nexus_fast.cli import main as cli_main
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import ServerProcess, run_module, wait_for

NODES = 20


def nexus(*args: str) -> tuple[int, str, str]:
    """``nexus-fast ARGS`` as its own process (the backup runs beside the server)."""
    result = run_module("nexus_fast.cli", *args)
    return result.returncode, result.stdout, result.stderr


@pytest.fixture
def tool(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """``nexus-fast ARGS`` run in this process (the same code, without a start-up each)."""

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        code = cli_main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return run


def read_store(path: Path) -> dict[str, dict[bytes, bytes]]:
    """Every record of the nodes, commands, events and meta tables, read-only."""
    env = lmdb.open(str(path), subdir=path.is_dir(), readonly=True, lock=path.is_dir(), max_dbs=32)
    try:
        out = {}
        for name in ("nodes", "commands", "events", "meta"):
            with env.begin(db=env.open_db(name.encode(), create=False)) as txn:
                out[name] = {bytes(k): bytes(v) for k, v in txn.cursor()}
        return out
    finally:
        env.close()


def list_commands(control: pb_grpc.ControlServiceStub) -> dict[str, int]:
    states: dict[str, int] = {}
    token = ""
    while True:
        page = control.ListCommands(pb.ListCommandsRequest(page_size=5000, page_token=token))
        states.update((c.id, c.state) for c in page.commands)
        token = page.next_page_token
        if not token:
            return states


class Submitter(threading.Thread):
    """Submits batches of echo commands until stopped; counts the answered ones."""

    def __init__(self, server: ServerProcess) -> None:
        super().__init__(daemon=True)
        self.server = server
        self.stop = threading.Event()
        self.answered = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            with self.server.channel() as channel:
                control = pb_grpc.ControlServiceStub(channel)
                batch = [pb.CommandSpec(kind="echo", payload=b"load") for _ in range(20)]
                while not self.stop.is_set():
                    control.SubmitCommands(pb.SubmitCommandsRequest(commands=batch), timeout=10)
                    self.answered += len(batch)
                    time.sleep(0.01)
        except BaseException as exc:  # reported by the test
            self.error = exc


def test_backup_under_load_restores_the_same_state(
    server_factory: type,
    fleet_factory: type,
    tmp_path: Path,
    tool: Callable[..., tuple[int, str, str]],
) -> None:
    server: ServerProcess = server_factory.create().start()
    fleet = fleet_factory.create(server, NODES)
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        wait_for(
            lambda: len(control.ListNodes(pb.ListNodesRequest()).nodes) == NODES,
            20,
            message="fleet registered",
        )
    submitter = Submitter(server)
    submitter.start()
    wait_for(lambda: submitter.answered >= 200, 20, message="load running")
    before = submitter.answered
    backup = tmp_path / "nexus.backup"
    code, out, err = nexus("backup", "--db-path", str(server.data_dir), "--out", str(backup))
    after = submitter.answered
    wait_for(lambda: submitter.answered > after, 10, message="load after the backup")
    submitter.stop.set()
    submitter.join(15)
    assert submitter.error is None, submitter.error
    assert code == 0, out + err
    assert after > before  # commands were answered while the copy ran
    assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    assert not list(tmp_path.glob(".nexus.backup.tmp*"))

    held = read_store(backup)
    last = int.from_bytes(held["meta"][b"last_event_index"], "big")
    node_ids = {k.decode() for k in held["nodes"]}
    commands = {
        k[2:].decode(): pb.CommandRecord.FromString(v).state
        for k, v in held["commands"].items()
        if k.startswith(b"c/")
    }
    assert len(node_ids) == NODES and len(commands) >= before and last > len(commands)
    # The copy is a prefix of the original's log: the same events at the same indices.
    original = read_store(server.data_dir)["events"]
    assert held["events"] == {k: v for k, v in original.items() if int.from_bytes(k, "big") <= last}
    fleet.stop()

    code, out, err = tool("check", "--db-path", str(backup))
    assert code == 0 and out.startswith("check ok"), out + err

    # Restore: refused while a server holds the directory, and into a non-empty one.
    code, out, err = tool("restore", str(backup), "--db-path", str(server.data_dir), "--force")
    assert code == 1 and "is in use by pid" in err, out + err
    fresh = tmp_path / "restored"
    code, out, err = tool("restore", str(backup), "--db-path", str(fresh))
    assert code == 0, out + err
    assert stat.S_IMODE((fresh / "data.mdb").stat().st_mode) == 0o600
    code, out, err = tool("restore", str(backup), "--db-path", str(fresh))
    assert code == 1 and "is not empty" in err and "--force" in err, out + err

    # A server on the restored dir (nodes get a long grace: nothing moves while we look).
    restored: ServerProcess = server_factory.create(data_dir=fresh, NEXUS_NODE_TIMEOUT="120s")
    restored.start()
    with restored.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        nodes = control.ListNodes(pb.ListNodesRequest(page_size=1000)).nodes
        assert {n.id for n in nodes} == node_ids
        assert list_commands(control) == commands
    events = read_store(fresh)["events"]
    assert {k: v for k, v in events.items() if int.from_bytes(k, "big") <= last} == held["events"]
    assert max(int.from_bytes(k, "big") for k in events) == last + 1  # + system.started

    code, out, err = tool("check", "--db-path", str(fresh))  # next to the running server
    assert code == 0, out + err
    assert restored.stop() == 0

    # One record's bytes flipped in a copy: check names the table and the key.
    damaged = tmp_path / "damaged.backup"
    damaged.write_bytes(backup.read_bytes())
    victim = sorted(k for k in held["commands"] if k.startswith(b"c/"))[len(commands) // 2]
    env = lmdb.open(str(damaged), subdir=False, lock=False, max_dbs=32)
    with env.begin(write=True, db=env.open_db(b"commands")) as txn:
        txn.put(victim, bytes(b ^ 0xFF for b in held["commands"][victim]))
    env.close()
    code, out, err = tool("check", "--db-path", str(damaged))
    assert code == 1, out + err
    assert out.splitlines()[0].startswith(f"commands {victim.decode()}: "), out
    code, out, err = tool("restore", str(damaged), "--db-path", str(tmp_path / "never"))
    assert code == 1 and "restore refused" in err, out + err
    assert not (tmp_path / "never").exists()
