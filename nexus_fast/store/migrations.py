"""The store's schema version and the migrations that bring an older data dir forward.

The version lives in ``meta`` under ``schema_version`` (8-byte big-endian). A data dir
written before versions were recorded has none: that is version 1. A new, empty store is
stamped with :data:`SCHEMA_VERSION` when it is created.

At a writable open (the server's start) :func:`upgrade` runs, before anything reads a
record:

* a version newer than this code's: :class:`SchemaTooNew`, one line, the server exits 1
  (an older server never touches a newer layout);
* an older version: a compacted backup is written next to ``data.mdb``
  (``pre-migration-v<from>-<UTC time>.mdb``), then each migration runs once, in order,
  each in ONE write transaction that also stamps its target version: a crash between
  two migrations resumes from the last one committed.

Each migration is a small function of a write transaction, frozen with the layout it
migrates (it names its own keys rather than importing today's, which may move on), and
tested on its own (tests/unit/test_migrations.py) and on a data dir written by the
previous layout (tests/integration/test_schema.py).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import lmdb

from nexus_fast.logs import get_logger
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store.backup import write_copy
from nexus_fast.store.base import StoreError
from nexus_fast.store.datafile import DATA_FILE, DataFileError

log = get_logger("store.migrations")

SCHEMA_VERSION: Final = 2
"""The record layout this code reads and writes."""
SCHEMA_KEY: Final = b"schema_version"
"""Key in ``meta`` holding the schema version (8-byte big-endian)."""
UNVERSIONED: Final = 1
"""The version of a data dir with data but no ``schema_version`` (before it was recorded)."""
BACKUP_PREFIX: Final = "pre-migration-v"

_VERSION = struct.Struct(">Q")
_STATE_DBS: Final = ("nodes", "commands", "agents", "events", "audit")

Migration = Callable[[lmdb.Transaction, Mapping[str, lmdb._Database]], None]


class SchemaTooNew(StoreError):
    """The data dir was written by a newer server (its schema version is above ours)."""


def encode_version(version: int) -> bytes:
    return _VERSION.pack(version)


def read_version(txn: lmdb.Transaction, dbh: Mapping[str, lmdb._Database]) -> int | None:
    """The recorded version; :data:`UNVERSIONED` for an old dir with data, None if empty.

    ``ValueError`` when the stored value is not 8 bytes.
    """
    raw = txn.get(SCHEMA_KEY, db=dbh["meta"])
    if raw is not None:
        if len(raw) != _VERSION.size:
            raise ValueError(f"meta {SCHEMA_KEY.decode()} is {len(raw)} bytes, expected 8")
        return int(_VERSION.unpack(raw)[0])
    has_data = (
        any(txn.stat(dbh[name])["entries"] for name in _STATE_DBS)
        or txn.stat(dbh["meta"])["entries"]
    )
    return UNVERSIONED if has_data else None


# ----------------------------------------------------------------------- migrations


def _v1_to_v2(txn: lmdb.Transaction, dbh: Mapping[str, lmdb._Database]) -> None:
    """Version 1 -> 2: agent specs stored once per deployment, never inline.

    Early version-1 replicas carried their deployment's spec bytes in every record; later
    ones keep it once under ``spec/<name>/<created_ms as 16 hex digits>`` and only
    ``spec_size`` in the replica. Move every inline spec to its key (the first replica
    of a deployment provides it) and strip it from the record, so readers meet one layout.
    """
    agents = dbh["agents"]
    rewrites: list[tuple[bytes, bytes]] = []
    specs: dict[bytes, bytes] = {}
    for raw_key, raw_value in txn.cursor(db=agents):
        key, value = bytes(raw_key), bytes(raw_value)
        if key.startswith(b"spec/"):
            continue
        agent = pb.Agent.FromString(value)
        if not agent.spec.spec:
            continue
        spec_key = b"spec/" + f"{agent.name}/{agent.created_ms:016x}".encode()
        if txn.get(spec_key, db=agents) is None:
            specs.setdefault(spec_key, agent.spec.spec)
        agent.spec_size = len(agent.spec.spec)
        agent.spec.spec = b""
        rewrites.append((key, agent.SerializeToString()))
    for spec_key, spec in specs.items():
        txn.put(spec_key, spec, db=agents)
    for key, value in rewrites:
        txn.put(key, value, db=agents)


MIGRATIONS: Final[Mapping[int, Migration]] = {1: _v1_to_v2}
"""version -> the function that turns a store of that version into version + 1."""


def upgrade(env: lmdb.Environment, dbh: Mapping[str, lmdb._Database], path: Path) -> int:
    """Bring the freshly opened writable store at ``path`` to :data:`SCHEMA_VERSION`.

    Returns the version found. Raises :class:`SchemaTooNew` for a newer store and
    :class:`StoreError` when a migration fails (nothing of it is committed).
    """
    with env.begin(write=True) as txn:
        try:
            found = read_version(txn, dbh)
        except ValueError as exc:
            raise StoreError(f"database {path}: {exc}") from None
        if found is None:  # a new store: born at the current version
            txn.put(SCHEMA_KEY, encode_version(SCHEMA_VERSION), db=dbh["meta"])
            return SCHEMA_VERSION
    if found > SCHEMA_VERSION:
        raise SchemaTooNew(
            f"database {path} has schema version {found}, newer than this server's "
            f"{SCHEMA_VERSION}: run the newer nexus-fast, or restore a backup made by this "
            "version"
        )
    if found == SCHEMA_VERSION:
        return found
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    backup = path / f"{BACKUP_PREFIX}{found}-{stamp}.mdb"
    try:
        write_copy(env, backup)
    except lmdb.Error as exc:  # the copy reads every page: damage shows here first
        raise DataFileError(f"{path / DATA_FILE}: damaged: {exc}") from None
    except OSError as exc:
        raise StoreError(f"database {path}: cannot back up before migrating: {exc}") from None
    log.warning(
        "migrating database %s from schema version %d to %d (backup: %s)",
        path,
        found,
        SCHEMA_VERSION,
        backup,
    )
    version = found
    while version < SCHEMA_VERSION:
        migration = MIGRATIONS[version]
        try:
            with env.begin(write=True) as txn:
                migration(txn, dbh)
                txn.put(SCHEMA_KEY, encode_version(version + 1), db=dbh["meta"])
        except Exception as exc:
            raise StoreError(
                f"database {path}: migration from schema version {version} to {version + 1} "
                f"failed ({exc}); nothing of it was committed, the backup is {backup}"
            ) from None
        version += 1
        log.warning("database %s migrated to schema version %d", path, version)
    return found
