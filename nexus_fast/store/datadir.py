"""The data directory: one server per directory, and data at rest kept private.

A serving process holds an exclusive ``flock`` on ``nexus.lock`` in the directory from
before LMDB opens until it exits, with its pid written inside so a second server can say
who holds it (LMDB's own lock file coordinates readers and one writer *within* the rules;
it does not stop a second process from clobbering the event counter). Read-only tools
(backup, check) do not take it.

The directory is created 0700 and every file 0600, by the modes given at creation
(``os.makedirs``/``os.open``), never chmod-ed afterwards, so nothing is ever readable by
others, not even for a moment.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path

from nexus_fast.store.base import StoreError, StoreLocked

LOCK_FILE = "nexus.lock"
"""File in the data directory that a serving process holds an exclusive flock on."""
DIR_MODE = 0o700
FILE_MODE = 0o600


def create_private_dir(path: Path) -> None:
    """Create ``path`` (and missing parents) with the leaf 0700; StoreError naming it."""
    try:
        # The mode applies to the leaf only; parents are created like mkdir -p would.
        os.makedirs(path, mode=DIR_MODE, exist_ok=True)
    except FileExistsError:
        raise StoreError(f"database path {path} exists and is not a directory") from None
    except OSError as exc:
        raise StoreError(
            f"cannot create database directory {path}: {exc.strerror or exc}"
        ) from None
    if not path.is_dir():
        raise StoreError(f"database path {path} is not a directory")


def lock_dir(path: Path) -> int:
    """Take the exclusive lock of data directory ``path``; returns the fd that holds it.

    Raises :class:`StoreLocked` naming the directory and the holder's pid when another
    process holds it. Close the fd (:func:`unlock_dir`) to release the lock.
    """
    lock_path = path / LOCK_FILE
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
    except OSError as exc:
        raise StoreError(f"cannot open lock file {lock_path}: {exc.strerror or exc}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise StoreLocked(
                f"database {path} is in use by pid {holder} "
                f"(it holds {lock_path}); one server per data directory"
            ) from None
        raise StoreError(f"cannot lock {lock_path}: {exc.strerror or exc}") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def unlock_dir(fd: int) -> None:
    """Release a lock taken by :func:`lock_dir` (the file stays: deleting it would race)."""
    os.close(fd)


def create_private_file(path: Path) -> int:
    """Create ``path`` 0600 for writing (it must not exist); returns the fd."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, FILE_MODE)


LOW_SPACE_BYTES = 16 << 20
"""Free space under which an EIO from a write is taken for a full disk (see below)."""


def is_disk_full(exc: BaseException, path: Path | None = None) -> bool:
    """True for ENOSPC/EDQUOT from the filesystem, whichever exception carries it.

    With ``path`` (the data directory) also for EIO while its filesystem has less than
    ``LOW_SPACE_BYTES`` free: LMDB reports a short write as EIO ("mdb_txn_commit:
    Input/output error"), and a disk that fills mid-commit gives exactly that.
    """
    if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left" in text:
        return True
    if path is None or not (getattr(exc, "errno", None) == errno.EIO or "Input/output" in text):
        return False
    try:
        fs = os.statvfs(path)
    except OSError:
        return False
    return fs.f_bavail * fs.f_frsize < LOW_SPACE_BYTES
