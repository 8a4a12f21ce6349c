"""``nexus-fast audit verify|export``: run as a subprocess against real LMDB environments.

The environment is built the way the store builds it (same flags, same sub-databases) and
the audit entries are appended with ``chain_puts`` in the same write transaction as the
change they record, exactly as the store's writer does it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import lmdb
import orjson
import pytest

from nexus_fast.store.audit_chain import (
    AUDIT_DB,
    AuditRecord,
    audit_key,
    chain_puts,
    head_from_last,
)
from nexus_fast.store.lmdb_store import DATABASES, MAX_DBS, MAX_READERS

from .conftest import ServerProcess, run_module

N_ENTRIES = 30


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_module("nexus_fast.security.audit_cli", *args)


def open_like_the_store(path: Path) -> tuple[lmdb.Environment, dict[str, lmdb._Database]]:
    path.mkdir(parents=True, exist_ok=True)
    env = lmdb.open(
        str(path),
        map_size=1 << 24,
        subdir=True,
        sync=True,
        metasync=True,
        lock=True,
        readahead=False,
        max_dbs=MAX_DBS,
        max_readers=MAX_READERS,
    )
    with env.begin(write=True) as txn:
        dbh = {name: env.open_db(name.encode(), txn=txn) for name in DATABASES}
    return env, dbh


def write_changes_with_audit(path: Path, n: int) -> None:
    """n node writes, each audited in its own write txn, batches of 1..3 records."""
    env, dbh = open_like_the_store(path)
    try:
        with env.begin(db=dbh[AUDIT_DB]) as txn:
            cur = txn.cursor()
            head = head_from_last((cur.key(), cur.value()) if cur.last() else None)
        i = 0
        while i < n:
            batch = [
                AuditRecord(
                    principal=f"operator-{j % 3}",
                    role="operator",
                    peer=f"ipv4:127.0.0.1:{40000 + j}",
                    method="/nexus.NodeService/Register",
                    target=f"node:n{j}",
                    request_id=f"req-{j}",
                    outcome="ok" if j % 7 else "PERMISSION_DENIED",
                    time_ms=1_700_000_000_000 + j,
                )
                for j in range(i, min(n, i + 1 + i % 3))
            ]
            pairs, new_head = chain_puts(head, batch)
            with env.begin(write=True) as txn:
                for record in batch:  # the change itself
                    txn.put(record.target.encode(), b"node record", db=dbh["nodes"])
                # What the store writer adds to its txn: append-only, one C call.
                consumed, added = txn.cursor(db=dbh[AUDIT_DB]).putmulti(
                    pairs, overwrite=False, append=True
                )
                assert consumed == added == len(pairs)
            head = new_head  # adopted after the commit
            i += len(batch)
    finally:
        env.close()


def flip_byte(path: Path, seq: int, offset: int) -> None:
    env, dbh = open_like_the_store(path)
    try:
        with env.begin(write=True, db=dbh[AUDIT_DB]) as txn:
            value = bytearray(txn.get(audit_key(seq)))
            value[offset] ^= 0x01
            txn.put(audit_key(seq), bytes(value))
    finally:
        env.close()


def delete_entry(path: Path, seq: int) -> None:
    env, dbh = open_like_the_store(path)
    try:
        with env.begin(write=True, db=dbh[AUDIT_DB]) as txn:
            assert txn.delete(audit_key(seq))
    finally:
        env.close()


def test_verify_then_flip_one_byte_names_the_entry(tmp_path: Path) -> None:
    db = tmp_path / "data"
    write_changes_with_audit(db, N_ENTRIES)

    ok = run_cli("verify", "--db-path", str(db))
    assert ok.returncode == 0, ok.stderr
    assert f"audit chain ok: {N_ENTRIES} entries, head {N_ENTRIES}:" in ok.stdout

    # One byte inside the JSON body of entry 17 (past the 32-byte hash).
    flip_byte(db, 17, 32 + 20)
    broken = run_cli("verify", "--db-path", str(db))
    assert broken.returncode == 1
    assert "chain BROKEN at entry 17: hash mismatch" in broken.stderr
    assert "16 entries before it are intact" in broken.stderr
    assert "Traceback" not in broken.stderr


def test_flipped_hash_byte_and_deleted_entry(tmp_path: Path) -> None:
    db = tmp_path / "data"
    write_changes_with_audit(db, 10)
    flip_byte(db, 1, 0)  # the stored hash of the very first entry
    first = run_cli("verify", "--db-path", str(db))
    assert first.returncode == 1 and "BROKEN at entry 1:" in first.stderr

    db2 = tmp_path / "data2"
    write_changes_with_audit(db2, 10)
    delete_entry(db2, 4)
    gap = run_cli("verify", "--db-path", str(db2))
    assert gap.returncode == 1
    assert "BROKEN at entry 4: missing (the next stored entry is 5)" in gap.stderr


def test_expect_head_catches_truncation(tmp_path: Path) -> None:
    db = tmp_path / "data"
    write_changes_with_audit(db, 8)
    ok = run_cli("verify", "--db-path", str(db))
    head = ok.stdout.strip().rsplit("head ", 1)[1]
    assert head.startswith("8:")

    delete_entry(db, 8)  # dropping the newest entry leaves a valid, shorter chain...
    assert run_cli("verify", "--db-path", str(db)).returncode == 0
    cut = run_cli("verify", "--db-path", str(db), "--expect-head", head)
    assert cut.returncode == 1  # ...which a head saved elsewhere exposes
    assert "BROKEN at entry 8: missing: the log ends at entry 7" in cut.stderr


def test_export_writes_json_lines(tmp_path: Path) -> None:
    db = tmp_path / "data"
    write_changes_with_audit(db, N_ENTRIES)
    out = run_cli("export", "--db-path", str(db))
    assert out.returncode == 0, out.stderr
    rows = [orjson.loads(line) for line in out.stdout.splitlines()]
    assert [r["seq"] for r in rows] == list(range(1, N_ENTRIES + 1))
    assert rows[0]["method"] == "/nexus.NodeService/Register"
    assert rows[0]["outcome"] == "PERMISSION_DENIED" and rows[1]["outcome"] == "ok"
    assert all(len(r["hash"]) == 64 for r in rows)

    tail = run_cli("export", "--db-path", str(db), "--after", "25")
    assert [orjson.loads(line)["seq"] for line in tail.stdout.splitlines()] == [26, 27, 28, 29, 30]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["verify", "--db-path", "/nonexistent/nexus"], "no LMDB database here"),
        (["verify"], "--db-path"),
        (["frobnicate", "--db-path", "x"], "invalid choice"),
        (["verify", "--db-path", "x", "--expect-head", "nope"], "SEQ:HASH"),
    ],
)
def test_bad_invocations_exit_2(args: list[str], needle: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert needle in result.stderr and "Traceback" not in result.stderr


def test_verify_next_to_a_running_server(server: ServerProcess) -> None:
    """The real server's database verifies (empty chain) while the server keeps running,
    and the CLI takes no lock the server needs."""
    result = run_cli("verify", "--db-path", str(server.data_dir))
    assert result.returncode == 0, result.stderr
    assert "audit chain ok: 0 entries, head 0:" + "0" * 64 in result.stdout
    assert "warning" not in result.stderr  # opened with LMDB's reader lock, not without
    assert server.proc is not None and server.proc.poll() is None
    exported = run_cli("export", "--db-path", str(server.data_dir))
    assert exported.returncode == 0 and exported.stdout == ""
    assert server.stop() == 0


def test_falls_back_to_no_lock_when_the_lock_file_cannot_be_opened(tmp_path: Path) -> None:
    """A copy whose lock.mdb cannot be opened (read-only media; here a directory in its
    place, as root ignores permissions) is still verified, with a warning."""
    db = tmp_path / "data"
    write_changes_with_audit(db, 5)
    (db / "lock.mdb").unlink()
    (db / "lock.mdb").mkdir()
    result = run_cli("verify", "--db-path", str(db))
    assert result.returncode == 0, result.stderr
    assert "audit chain ok: 5 entries" in result.stdout
    assert "warning: opened without LMDB's lock file" in result.stderr
