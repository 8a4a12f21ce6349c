"""Backups and restores of a data directory: compacted copies, written atomically, private.

One implementation of the copy (:func:`write_copy`): the server's periodic backups
(:meth:`LmdbStore.backup`), ``nexus-fast backup`` from another process while the server
runs, and the backup taken before a schema migration all go through it. It writes a
consistent, compacted snapshot (``env.copyfd(compact=True)``: one read txn, so a running
writer goes on committing) into a temporary file created 0600 next to the target, fsyncs
it and renames it into place: a crash never leaves something that looks complete.

A restore (:func:`restore`) takes the data directory's ``nexus.lock`` for its whole
duration, so it refuses while a server runs there and no server can start half-way.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import lmdb

from nexus_fast import failpoints
from nexus_fast.store import datadir
from nexus_fast.store.base import StoreError
from nexus_fast.store.datafile import DATA_FILE, data_file, fsync_dir, open_read_only

LMDB_LOCK_FILE = "lock.mdb"


def write_copy(env: lmdb.Environment, target: Path) -> int:
    """Write a compacted, consistent copy of ``env`` to ``target`` (0600, atomically).

    Returns its size in bytes. ``target`` is replaced if it exists; its directory must.
    """
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by a crashed copy of ours
    fd = datadir.create_private_file(tmp)  # env.copy() would create it 0644
    try:
        try:
            if failpoints.ACTIVE:  # the periodic backup holds the resize lock: growth waits too
                failpoints.hit("store.backup")
            env.copyfd(fd, compact=True)
            os.fsync(fd)
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        tmp.rename(target)  # last: a crash mid-copy never leaves a complete-looking file
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)
    return size


def backup_to_file(db_path: Path, out: Path) -> int:
    """Copy the store at ``db_path`` (a running server's too) to the file ``out``.

    Opens it read-only without the server's lock. Returns the copy's size in bytes.
    """
    if out.is_dir():
        raise StoreError(f"{out} is a directory; --out names the copy file to write")
    if not out.parent.is_dir():
        raise StoreError(f"{out.parent}: no such directory")
    env, _ = open_read_only(db_path)
    try:
        return write_copy(env, out)
    except lmdb.Error as exc:
        raise StoreError(f"backup of {db_path} failed: {exc}") from None
    finally:
        env.close()


def backup_source(path: Path) -> Path:
    """The data file of a backup: a copy file, or a server backup directory's data.mdb."""
    return data_file(path)


def is_empty_data_dir(path: Path) -> bool:
    """True when ``path`` does not exist or holds no data file (``nexus.lock`` aside)."""
    if not path.exists():
        return True
    return not any(p.name != datadir.LOCK_FILE for p in path.iterdir())


def restore(source: Path, db_path: Path, force: bool = False) -> int:
    """Install the backup ``source`` as the data of ``db_path``; returns bytes written.

    The caller checks the backup first (``nexus-fast check``). Refuses a directory that
    holds anything but ``nexus.lock`` unless ``force`` (then ``data.mdb`` and LMDB's
    ``lock.mdb`` are replaced; other files stay), and refuses while a server holds the
    directory's lock (:class:`~nexus_fast.store.base.StoreLocked`).
    """
    src = backup_source(source)
    if not src.is_file():
        raise StoreError(f"{source}: no backup here (no {DATA_FILE})")
    datadir.create_private_dir(db_path)
    lock_fd = datadir.lock_dir(db_path)  # StoreLocked while a server runs there
    try:
        if not force and not is_empty_data_dir(db_path):
            raise StoreError(
                f"{db_path} is not empty; restore into an empty directory, or pass --force "
                "to replace its data"
            )
        target = db_path / DATA_FILE
        tmp = db_path / f".{DATA_FILE}.restore-{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        fd = datadir.create_private_file(tmp)
        try:
            with os.fdopen(fd, "wb", closefd=False) as dst, src.open("rb") as f:
                shutil.copyfileobj(f, dst, 1 << 20)
            os.fsync(fd)
            size = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        # LMDB's reader table belongs to the old file; a fresh one is made at the next open.
        with contextlib.suppress(FileNotFoundError):
            (db_path / LMDB_LOCK_FILE).unlink()
        tmp.rename(target)
        fsync_dir(db_path)
        return size
    finally:
        datadir.unlock_dir(lock_fd)
