"""The LMDB data file seen from outside: read-only opens and a sanity check of its header.

Tools (backup, restore, check, replay) open a store read-only, next to a running server:
they never take the server's ``nexus.lock`` and read in short transactions, a chunk at a
time (a long read txn pins old pages and grows the file under the writer). A store is a
data directory (``DIR/data.mdb``) or a single copy file written by ``nexus-fast backup``.

:func:`inspect` reads the two meta pages of ``data.mdb`` with plain file reads, before
LMDB maps the file: a truncated file would otherwise be a SIGBUS on the first read past
its end, and a file that is not LMDB at all a confusing error. It checks what LMDB itself
trusts blindly (magic, version, page size, the newest meta's last page within the file);
damage inside other pages is what ``nexus-fast check`` finds by reading every record.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import struct
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final, NamedTuple

import lmdb
from google.protobuf.message import DecodeError

from nexus_fast.store.base import StoreError

DATA_FILE = "data.mdb"
MAX_DBS = 32  # the store's MAX_DBS: room for every named database
CHUNK = 4096
"""Records read per read transaction by :func:`iter_records`."""

_MAGIC = 0xBEEFC0DE
_DATA_VERSION = 1  # MDB_DATA_VERSION of liblmdb 0.9
# MDB_page header (16 bytes) then MDB_meta: magic u32, version u32, address ptr, mapsize,
# two MDB_db (48 bytes each; the first's md_pad is the page size), last_pg, txnid.
_META = struct.Struct("<II8xQI44x48xQQ")
_META_OFFSET = 16


class DataFileError(StoreError):
    """The data file is missing, not an LMDB file, or damaged; the message names it."""


class FileHeader(NamedTuple):
    """What the newest meta page says about the data file."""

    page_size: int
    last_page: int
    txn_id: int
    file_size: int


def data_file(path: Path) -> Path:
    """``path/data.mdb`` for a directory, ``path`` itself for a copy file."""
    return path / DATA_FILE if path.is_dir() else path


def _meta(raw: bytes) -> tuple[int, int, int] | None:
    """``(page size, last page, txn id)`` of a meta page, None when it is not one."""
    if len(raw) < _META_OFFSET + _META.size:
        return None
    magic, version, _mapsize, psize, last_pg, txnid = _META.unpack_from(raw, _META_OFFSET)
    if magic != _MAGIC or version != _DATA_VERSION:
        return None
    return psize, last_pg, txnid


def inspect(path: Path) -> FileHeader:
    """Check the header of the data file at ``path`` (a directory or a copy file).

    Raises :class:`DataFileError` with one line naming the file and the damage.
    """
    file = data_file(path)
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            first = f.read(4096 + _META_OFFSET + _META.size)
            metas = [_meta(first)]
            psize = metas[0][0] if metas[0] is not None else 4096
            if psize < 512 or psize & (psize - 1) or psize > 65536:
                psize = 4096
            f.seek(psize)
            metas.append(_meta(f.read(_META_OFFSET + _META.size)))
    except FileNotFoundError:
        raise DataFileError(f"{file}: no such file") from None
    except OSError as exc:
        raise DataFileError(f"{file}: cannot read: {exc.strerror or exc}") from None
    good = [m for m in metas if m is not None]
    if not good:
        raise DataFileError(
            f"{file}: not an LMDB data file (both meta pages are damaged or it is "
            f"{size} bytes of something else)"
        )
    psize, last_pg, txnid = max(good, key=lambda m: m[2])
    if psize < 512 or psize & (psize - 1) or psize > 65536:
        raise DataFileError(f"{file}: damaged meta page (page size {psize})")
    needed = (last_pg + 1) * psize
    if size < needed:
        raise DataFileError(
            f"{file}: truncated: {size} bytes, but its newest meta page (txn {txnid}) "
            f"uses {needed} bytes"
        )
    if len(good) == 1:
        # LMDB falls back to the other meta page silently; say that one was damaged.
        which = 0 if metas[0] is None else 1
        raise DataFileError(f"{file}: meta page {which} is damaged")
    return FileHeader(psize, last_pg, txnid, size)


def open_read_only(path: Path) -> tuple[lmdb.Environment, bool]:
    """Open the store at ``path`` read-only; returns ``(env, shared)``.

    A directory opens with LMDB's lock file (``shared=True``: the reader table keeps a
    running writer from reusing pages we read); a copy file, or a directory whose lock
    file cannot be opened (a read-only mount), opens without it (``shared=False``: then
    no process may be writing to it).
    """
    inspect(path)
    is_dir = path.is_dir()

    def open_env(lock: bool) -> lmdb.Environment:
        return lmdb.open(
            str(path),
            subdir=is_dir,
            readonly=True,
            create=False,
            lock=lock,
            readahead=False,
            max_dbs=MAX_DBS,
            max_readers=512,
        )

    if is_dir:
        try:
            return open_env(lock=True), True
        except lmdb.Error:
            pass
    try:
        return open_env(lock=False), False
    except lmdb.Error as exc:
        raise DataFileError(f"{data_file(path)}: cannot open: {exc}") from None


def open_db(env: lmdb.Environment, name: str) -> lmdb._Database | None:
    """The named database ``name``, or None when the store has none by that name."""
    try:
        return env.open_db(name.encode(), create=False)
    except lmdb.NotFoundError:
        return None


def iter_records(
    env: lmdb.Environment, db: lmdb._Database, start: bytes = b""
) -> Iterator[tuple[bytes, bytes]]:
    """Every ``(key, value)`` of ``db`` with key >= ``start``, in key order, CHUNK per txn."""
    while True:
        chunk: list[tuple[bytes, bytes]] = []
        with env.begin(db=db) as txn:
            cur = txn.cursor()
            if cur.set_range(start) if start else cur.first():
                for key, value in cur:
                    chunk.append((key, value))
                    if len(chunk) >= CHUNK:
                        break
        yield from chunk
        if len(chunk) < CHUNK:
            return
        start = chunk[-1][0] + b"\x00"


def fsync_dir(path: Path) -> None:
    """Make a rename in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


LOAD_ERRORS: tuple[type[Exception], ...] = (lmdb.Error, DecodeError, ValueError)
"""What reading a damaged page or record raises (UnicodeDecodeError is a ValueError); the
server turns them into one line at start-up."""


def damaged_hint(problem: str, db_path: str | Path) -> str:
    """The one line a start on a damaged data file prints: the problem and what to do."""
    return (
        f"{problem}; the database is damaged: run `nexus-fast check --db-path {db_path}` "
        f"to list the problems, then `nexus-fast restore BACKUP --db-path {db_path} --force`"
    )


_FATAL_SIGNALS: Final = (signal.SIGBUS, signal.SIGSEGV)
_guard_callbacks: list[Any] = []  # ctypes callbacks must outlive their installation


@contextlib.contextmanager
def crash_guard(message: str | Callable[[], str], fd: int = 2) -> Iterator[None]:
    """While inside, a SIGBUS or SIGSEGV writes ``message`` (one line) to ``fd``, exits 1.

    ``message`` may be a function, called then (e.g. to name the record being read).

    LMDB trusts the data file: a damaged page can make it read past the end of the map
    (a node claiming a huge overflow run, say), which is a SIGBUS no ``except`` can catch,
    and a process dying of a signal is restarted by its supervisor: a crash loop. Python's
    own handlers cannot help (they run between bytecodes, after the faulting instruction
    re-faulted forever), so this installs a C-level handler through ctypes for the span
    of the reads of a start-up or a check, and restores the previous one afterwards.
    """

    def on_fatal(signum: int) -> None:
        text = message() if callable(message) else message
        for stream in (sys.stdout, sys.stderr):  # what was printed before goes out first
            with contextlib.suppress(Exception):
                stream.flush()
        os.write(fd, (text.rstrip("\n") + "\n").encode(errors="replace"))
        os._exit(1)

    libc = ctypes.CDLL(None, use_errno=True)
    handler_type = ctypes.CFUNCTYPE(None, ctypes.c_int)
    libc.signal.restype = ctypes.c_void_p
    libc.signal.argtypes = [ctypes.c_int, handler_type]
    callback = handler_type(on_fatal)
    _guard_callbacks.append(callback)
    previous = [libc.signal(sig, callback) for sig in _FATAL_SIGNALS]
    try:
        yield
    finally:
        libc.signal.argtypes = [ctypes.c_int, ctypes.c_void_p]
        for sig, old in zip(_FATAL_SIGNALS, previous, strict=True):
            libc.signal(sig, old)
        _guard_callbacks.remove(callback)
