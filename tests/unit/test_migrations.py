"""Schema versions and migrations on a real LMDB environment in a temporary directory."""

from __future__ import annotations

import asyncio
import struct
from pathlib import Path

import lmdb
import pytest

from nexus_fast.core import agents as core_agents
from nexus_fast.core import command_log
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store import LmdbStore, StoreError, check
from nexus_fast.store import migrations as m
from nexus_fast.store.lmdb_store import DATABASES

SPEC = b'{"image": "web:1"}'


def raw_env(path: Path) -> tuple[lmdb.Environment, dict[str, lmdb._Database]]:
    path.mkdir(exist_ok=True)
    env = lmdb.open(str(path), max_dbs=32, map_size=1 << 24)
    with env.begin(write=True) as txn:
        dbh = {name: env.open_db(name.encode(), txn=txn) for name in DATABASES}
    return env, dbh


def version_of(env: lmdb.Environment, dbh: dict[str, lmdb._Database]) -> int | None:
    with env.begin() as txn:
        return m.read_version(txn, dbh)


def test_a_new_store_is_born_at_the_current_version(tmp_path: Path) -> None:
    env, dbh = raw_env(tmp_path / "d")
    assert version_of(env, dbh) is None
    assert m.upgrade(env, dbh, tmp_path / "d") == m.SCHEMA_VERSION
    assert version_of(env, dbh) == m.SCHEMA_VERSION
    assert not list((tmp_path / "d").glob(f"{m.BACKUP_PREFIX}*"))  # nothing to back up


def old_replicas(env: lmdb.Environment, dbh: dict[str, lmdb._Database]) -> None:
    """Two replicas of one deployment with the spec inline (early version 1)."""
    with env.begin(write=True) as txn:
        for replica in range(2):
            agent = pb.Agent(
                id=f"web-{replica}",
                name="web",
                replica=replica,
                created_ms=1700000000123,
                spec=pb.AgentSpec(name="web", spec=SPEC, replicas=2),
                state=pb.AGENT_STATE_RUNNING,
            )
            txn.put(agent.id.encode(), agent.SerializeToString(), db=dbh["agents"])
        txn.put(b"last_event_index", struct.pack(">Q", 0), db=dbh["meta"])


def test_v1_to_v2_stores_each_inline_spec_once_and_strips_the_replicas(tmp_path: Path) -> None:
    env, dbh = raw_env(tmp_path / "d")
    old_replicas(env, dbh)
    assert version_of(env, dbh) == m.UNVERSIONED
    assert m.upgrade(env, dbh, tmp_path / "d") == 1
    assert version_of(env, dbh) == 2
    with env.begin(db=dbh["agents"]) as txn:
        records = dict(txn.cursor())
    spec_key = b"spec/web/" + f"{1700000000123:016x}".encode()
    assert records.pop(spec_key) == SPEC
    for value in records.values():
        agent = pb.Agent.FromString(value)
        assert agent.spec.spec == b"" and agent.spec_size == len(SPEC)
        assert agent.spec.name == "web" and agent.state == pb.AGENT_STATE_RUNNING
    # The key is the one the agent service reads: it finds the spec after the migration.
    assert core_agents._spec_key("web", 1700000000123) == spec_key
    backups = list((tmp_path / "d").glob(f"{m.BACKUP_PREFIX}1-*.mdb"))
    assert len(backups) == 1
    # A second open finds version 2: nothing runs, no second backup.
    assert m.upgrade(env, dbh, tmp_path / "d") == 2
    assert len(list((tmp_path / "d").glob(f"{m.BACKUP_PREFIX}*"))) == 1


def test_the_backup_holds_the_store_as_it_was_before(tmp_path: Path) -> None:
    env, dbh = raw_env(tmp_path / "d")
    old_replicas(env, dbh)
    m.upgrade(env, dbh, tmp_path / "d")
    (backup,) = (tmp_path / "d").glob(f"{m.BACKUP_PREFIX}*")
    copy = lmdb.open(str(backup), subdir=False, readonly=True, lock=False, max_dbs=32)
    with copy.begin(db=copy.open_db(b"agents", create=False)) as txn:
        agent = pb.Agent.FromString(txn.get(b"web-0"))
    copy.close()
    assert agent.spec.spec == SPEC


def test_a_failing_migration_commits_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env, dbh = raw_env(tmp_path / "d")
    old_replicas(env, dbh)

    def half_then_fail(txn: lmdb.Transaction, handles: dict[str, lmdb._Database]) -> None:
        txn.put(b"web-0", b"half-written", db=handles["agents"])
        raise RuntimeError("boom")

    monkeypatch.setitem(m.MIGRATIONS, 1, half_then_fail)  # type: ignore[index]
    with pytest.raises(StoreError, match="migration from schema version 1 to 2 failed"):
        m.upgrade(env, dbh, tmp_path / "d")
    assert version_of(env, dbh) == 1
    with env.begin(db=dbh["agents"]) as txn:
        assert pb.Agent.FromString(txn.get(b"web-0")).spec.spec == SPEC


def test_a_newer_store_is_refused_in_one_line(tmp_path: Path) -> None:
    env, dbh = raw_env(tmp_path / "d")
    with env.begin(write=True) as txn:
        txn.put(m.SCHEMA_KEY, m.encode_version(m.SCHEMA_VERSION + 1), db=dbh["meta"])
    with pytest.raises(m.SchemaTooNew) as info:
        m.upgrade(env, dbh, tmp_path / "d")
    assert "\n" not in str(info.value) and "newer than this server's" in str(info.value)


def test_the_store_refuses_to_open_a_newer_dir(tmp_path: Path) -> None:
    env, dbh = raw_env(tmp_path / "d")
    with env.begin(write=True) as txn:
        txn.put(m.SCHEMA_KEY, m.encode_version(m.SCHEMA_VERSION + 5), db=dbh["meta"])
    env.close()

    async def open_store() -> None:
        await LmdbStore(tmp_path / "d").open()

    with pytest.raises(m.SchemaTooNew):
        asyncio.run(open_store())


def test_every_version_below_the_current_one_has_a_migration() -> None:
    assert sorted(m.MIGRATIONS) == list(range(m.UNVERSIONED, m.SCHEMA_VERSION))


def test_check_knows_the_layout_the_core_writes() -> None:
    assert check.COMMAND_RECORD == command_log._RECORD
    assert check.COMMAND_EXPIRY == command_log._EXPIRY
    assert check.AGENT_SPEC == core_agents._SPEC_PREFIX
    assert check.DATABASES == DATABASES
