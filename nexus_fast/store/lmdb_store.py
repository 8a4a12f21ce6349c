"""LMDB state store: one writer thread doing group commit, short synchronous reads on the loop.

Threading model (see ARCHITECTURE.md, "Persistence" and the critical-path rules):

* ``commit()`` runs on the event loop: it validates the request, creates a future and puts
  the request on a queue. It never blocks.
* ONE writer thread takes the first waiting request, drains whatever else is queued (up to
  ``max_batch_ops``, optionally waiting ``sync_window`` seconds for more), applies them all
  in ONE write transaction, commits (one fsync) and hands the whole batch back to the loop
  with ONE ``call_soon_threadsafe``, where every future is resolved.
* Reads (``get``, ``scan``, ...) run on the loop thread in short read transactions that
  never span an ``await``. They must only be called from the loop thread.
* Growing the map (``set_mapsize``) requires that no transaction is open in the process.
  The writer aborts its txn, then asks the loop thread to resize: as loop reads are
  synchronous, none is open while the loop runs the resize callback. The only read txns
  off the loop (``backup``) hold ``_resize_lock``, which the resize also takes.

The writer thread (group commit, map growth, the audit chain) lives in ``writer.py``.

One server per data directory, and private data at rest: see ``datadir.py``. ``open()``
takes the directory lock before LMDB opens and ``close()`` releases it; read-only opens
(backup, check) skip it.
"""

from __future__ import annotations

import asyncio
import os
import queue
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import lmdb

from nexus_fast.eventlog import collect_batch
from nexus_fast.logs import get_logger
from nexus_fast.store import datadir
from nexus_fast.store.audit_chain import (
    AUDIT_DB,
    EMPTY_HEAD,
    HASH_SIZE,
    AuditRecord,
    ChainHead,
    audit_key,
    head_from_last,
)
from nexus_fast.store.backup import write_copy
from nexus_fast.store.base import (
    CommitHook,
    CommitResult,
    Delete,
    DeleteRange,
    EventFallback,
    Op,
    Put,
    StoreBusy,
    StoreClosed,
    StoreError,
    StoreFull,
    StoreReadOnly,
)
from nexus_fast.store.datafile import DATA_FILE, DataFileError
from nexus_fast.store.datafile import inspect as inspect_data_file
from nexus_fast.store.migrations import upgrade as upgrade_schema
from nexus_fast.store.writer import (
    _INDEX,
    _STOP,
    EVENTS_DB,
    LAST_EVENT_KEY,
    META_DB,
    WriterThread,
    _Request,
    _Settled,
)
from nexus_fast.telemetry import metrics

log = get_logger("store")

T = TypeVar("T")

DATABASES: tuple[str, ...] = ("nodes", "commands", "agents", "events", "audit", "meta")
"""Sub-databases opened by :class:`LmdbStore`."""

MAX_DBS = 32  # room for sub-databases added later without a migration
MAX_READERS = 512  # loop reads + backups + external tools (mdb_stat); slots are cheap

BACKUP_PREFIX = "nexus-backup-"
LOCK_FILE = datadir.LOCK_FILE

_Opened = tuple[lmdb.Environment, dict[str, lmdb._Database], int, ChainHead]


def event_key(index: int) -> bytes:
    """Key of event ``index`` in the ``events`` database (big-endian so keys sort by index)."""
    return _INDEX.pack(index)


def event_index(key: bytes | memoryview) -> int:
    """Inverse of :func:`event_key`."""
    return int(_INDEX.unpack(key)[0])


class LmdbStore(WriterThread):
    """:class:`~nexus_fast.store.base.StateStore` on an embedded LMDB environment.

    ``map_size`` is the initial map (LMDB keeps a larger size already recorded in the file);
    it doubles on ``MapFullError`` up to ``max_map_size``. ``sync_window`` (seconds) lets the
    writer wait for more requests before committing when the queue runs dry; 0 commits as
    soon as the queue is drained. ``max_batch_ops`` bounds one transaction (a single larger
    request still goes alone). ``max_queue`` bounds requests queued or in flight.

    ``read_only=True`` opens an existing store for tools (backup, check) while a server
    may be running on it: no directory lock, no writer thread, ``commit()`` raises
    :class:`StoreReadOnly`.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        map_size: int = 1 << 30,
        max_map_size: int = 1 << 40,
        sync_window: float = 0.0,
        max_batch_ops: int = 10000,
        max_queue: int = 100000,
        *,
        read_only: bool = False,
    ) -> None:
        if map_size <= 0 or max_map_size < map_size:
            raise ValueError("need 0 < map_size <= max_map_size")
        if max_batch_ops < 1 or max_queue < 1 or sync_window < 0:
            raise ValueError("max_batch_ops and max_queue must be >= 1, sync_window >= 0")
        self.path = Path(path)
        self._initial_map_size = map_size
        self._max_map_size = max_map_size
        self._sync_window = sync_window
        self._max_batch_ops = max_batch_ops
        self._max_queue = max_queue
        self.read_only = read_only

        self.on_commit: CommitHook | None = None
        """Called on the loop after each committed batch with its (index, body) pairs."""
        self.on_failure: Callable[[str | None], None] | None = None
        """Called on the loop when :attr:`failure` changes (a reason, or None once cleared)."""
        self._failure: str | None = None
        self._lock_fd: int | None = None

        self._env: lmdb.Environment | None = None
        self._dbh: dict[str, lmdb._Database] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None
        self._writer_dead = False
        self._closing = False
        self._close_future: asyncio.Future[None] | None = None
        self._resize_lock = threading.Lock()
        self._max_key = 511

        # Loop-side state.
        self._pending = 0  # requests queued or in flight; only touched on the loop
        self._last_event_index = 0
        # Writer-side state.
        self._w_last_index = 0
        self._w_audit_head = EMPTY_HEAD
        self._map_size = map_size
        self._txn_count = 0  # committed write txns, for tests and stat()
        self._batch_requests = 0  # requests committed, for the average batch size

        ops = metrics.DB_OPERATIONS
        dur = metrics.DB_OPERATION_DURATION
        # Bound label children once: .labels() is a dict lookup plus a lock per call.
        self._m_commit = ops.labels(operation="commit")
        self._m_commit_s = dur.labels(operation="commit")
        self._m_put = ops.labels(operation="put")
        self._m_delete = ops.labels(operation="delete")
        self._m_get = ops.labels(operation="get")
        self._m_scan = ops.labels(operation="scan")
        self._m_scan_s = dur.labels(operation="scan")
        self._m_grow = ops.labels(operation="grow")
        self._m_grow_s = dur.labels(operation="grow")
        self._m_backup = ops.labels(operation="backup")
        self._m_backup_s = dur.labels(operation="backup")

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Create the directory and environment (in a thread) and start the writer."""
        if self._env is not None:
            return
        if self._closing:
            raise StoreClosed("store was closed; create a new LmdbStore")
        loop = asyncio.get_running_loop()
        self._loop = loop
        env, dbh, last, audit_head = await loop.run_in_executor(None, self._open_env)
        self._env = env
        self._dbh = dbh
        self._max_key = env.max_key_size()
        self._map_size = env.info()["map_size"]
        self._last_event_index = last
        self._w_last_index = last
        self._w_audit_head = audit_head
        if self.read_only:
            return
        self._writer = threading.Thread(
            target=self._writer_main, name=f"lmdb-writer:{self.path.name}", daemon=True
        )
        self._writer.start()
        self.size_bytes()

    def _open_env(self) -> _Opened:
        """Executor thread: lock the directory (writable opens), then open LMDB.

        Every failure is a :class:`StoreError` whose message names the directory, so the
        server can print it as the one line of a failed start.
        """
        if self.read_only:
            return self._open_read_only()
        datadir.create_private_dir(self.path)
        self._lock_fd = datadir.lock_dir(self.path)
        try:
            return self._open_writable()
        except BaseException:
            self._unlock_dir()
            raise

    def _unlock_dir(self) -> None:
        fd, self._lock_fd = self._lock_fd, None
        if fd is not None:
            datadir.unlock_dir(fd)

    def _open_read_only(self) -> _Opened:
        if not (self.path / "data.mdb").is_file():
            raise StoreError(f"no database at {self.path}")
        try:
            env = lmdb.open(
                str(self.path),
                subdir=True,
                readonly=True,
                create=False,
                lock=True,  # shares the reader table with a running server
                readahead=False,
                max_dbs=MAX_DBS,
                max_readers=MAX_READERS,
            )
        except lmdb.Error as exc:
            raise StoreError(f"cannot open database {self.path} read-only: {exc}") from None
        try:
            # No txn argument: py-lmdb then opens each handle in a txn it commits, which
            # keeps the handle (one opened in our own read txn would die with it).
            dbh = {name: env.open_db(name.encode(), create=False) for name in DATABASES}
            with env.begin(db=dbh[META_DB]) as txn:
                raw = txn.get(LAST_EVENT_KEY)
        except lmdb.Error as exc:
            env.close()
            raise StoreError(f"database {self.path} is incomplete: {exc}") from None
        except BaseException:
            env.close()
            raise
        return env, dbh, event_index(raw) if raw is not None else 0, EMPTY_HEAD

    def _open_writable(self) -> _Opened:
        if (self.path / DATA_FILE).exists():
            inspect_data_file(self.path)  # a truncated file would be a SIGBUS once mapped
        try:
            env = lmdb.open(
                str(self.path),
                map_size=self._initial_map_size,
                subdir=True,
                sync=True,
                metasync=True,
                lock=True,
                readahead=False,  # random access to a hot working set; readahead wastes RAM
                max_dbs=MAX_DBS,
                max_readers=MAX_READERS,
                mode=datadir.FILE_MODE,  # data.mdb and lock.mdb are created 0600
            )
        except lmdb.Error as exc:
            raise StoreError(f"cannot open database {self.path}: {exc}") from None
        try:
            while True:
                try:
                    with env.begin(write=True) as txn:
                        dbh = {name: env.open_db(name.encode(), txn=txn) for name in DATABASES}
                    break
                except lmdb.MapFullError:
                    # A tiny initial map cannot even hold the db records; nothing else runs yet.
                    size = env.info()["map_size"]
                    if size >= self._max_map_size:
                        raise StoreFull("database full: cannot create sub-databases") from None
                    env.set_mapsize(min(size * 2, self._max_map_size))
            upgrade_schema(env, dbh, self.path)  # SchemaTooNew: an older server stops here
            with env.begin(db=dbh[META_DB]) as rtxn:
                raw = rtxn.get(LAST_EVENT_KEY)
                # The audit chain continues from its newest entry, read once here.
                cur = rtxn.cursor(db=dbh[AUDIT_DB])
                audit_head = head_from_last(cur.item() if cur.last() else None)
            last = event_index(raw) if raw is not None else 0
        except ValueError as exc:
            env.close()
            raise StoreError(f"database {self.path}: bad newest audit entry: {exc}") from None
        except lmdb.Error as exc:  # a damaged page met while opening: one line, no traceback
            env.close()
            raise DataFileError(f"{self.path / DATA_FILE}: damaged: {exc}") from None
        except BaseException:
            env.close()
            raise
        return env, dbh, last, audit_head

    async def close(self) -> None:
        """Refuse new commits, commit everything queued, stop the writer, close the env.

        Every future returned by ``commit()`` before ``close()`` is resolved when this
        returns. Safe to call more than once and concurrently.
        """
        if self._close_future is not None:
            await asyncio.shield(self._close_future)
            return
        loop = asyncio.get_running_loop()
        self._close_future = loop.create_future()
        self._closing = True
        try:
            if self._writer is not None:
                self._queue.put(_STOP)
                # The writer's last resolve callback was scheduled before join() returned,
                # so it runs before this await resumes (call_soon order is FIFO).
                await loop.run_in_executor(None, self._writer.join)
            if self._env is not None:
                await loop.run_in_executor(None, self._close_env)
            self._unlock_dir()
        finally:
            self._close_future.set_result(None)

    def _close_env(self) -> None:
        with self._resize_lock:  # never under a running backup copy
            env, self._env = self._env, None
            if env is not None:
                env.close()

    # ------------------------------------------------------------------ writes

    def commit(
        self,
        ops: Sequence[Op],
        events: Sequence[bytes] = (),
        audit: Sequence[AuditRecord] = (),
    ) -> asyncio.Future[CommitResult]:
        """Queue ``ops``, ``events`` and ``audit`` records as one atomic request; loop thread.

        The audit records are appended to the hash chain in the ``audit`` database in the
        same write transaction as the ops they record: both are durable, or neither.

        The returned future resolves to the indices assigned to ``events`` once the
        transaction holding them is durable (fsynced). It fails with :class:`StoreError`
        if the transaction fails, :class:`StoreFull` when the map cannot grow further.
        Cancelling the future does not withdraw the request.

        Raises ``ValueError`` for a malformed request (it never reaches the writer, so it
        cannot fail the others), :class:`StoreBusy` when ``max_queue`` requests are
        pending, :class:`StoreClosed` once ``close()`` was called.
        """
        if self.read_only:
            raise StoreReadOnly(f"store {self.path} is open read-only")
        if self._closing or self._env is None or self._loop is None:
            raise StoreClosed("store is closed" if self._closing else "store is not open")
        if self._writer_dead:
            raise StoreError("writer thread died; see the log")
        if self._pending >= self._max_queue:
            raise StoreBusy(f"write queue full ({self._max_queue} requests pending)")
        # Snapshot the caller's sequences so what we validate is what the writer applies.
        ops_t = tuple(ops)
        events_t = tuple(events)
        audit_t = tuple(audit)
        self._validate(ops_t, events_t)
        for record in audit_t:
            if type(record) is not AuditRecord:
                raise ValueError(f"audit records must be AuditRecord, got {type(record).__name__}")
        fut: asyncio.Future[CommitResult] = self._loop.create_future()
        self._pending += 1
        n_ops = len(ops_t) + len(events_t) + len(audit_t)
        self._queue.put(_Request(ops_t, events_t, fut, n_ops, audit_t))
        return fut

    def _validate(self, ops: tuple[Op, ...], events: tuple[bytes, ...]) -> None:
        dbh = self._dbh
        max_key = self._max_key
        for op in ops:
            # type() identity, not isinstance: a subclass could carry surprises past the check.
            if type(op) is Put:
                db, key = op.db, op.key
                if not isinstance(op.value, bytes):
                    raise ValueError(f"Put value must be bytes, got {type(op.value).__name__}")
            elif type(op) is Delete:
                db, key = op.db, op.key
            elif type(op) is DeleteRange:
                db, start, end = op.db, op.start, op.end
                if db not in dbh:
                    raise ValueError(f"unknown database {db!r}")
                if db == AUDIT_DB:
                    raise ValueError("the audit log is append-only: no DeleteRange on audit")
                if not isinstance(start, bytes) or not (end is None or isinstance(end, bytes)):
                    raise ValueError("DeleteRange bounds must be bytes")
                if (
                    db == META_DB
                    and start <= LAST_EVENT_KEY
                    and (end is None or end > LAST_EVENT_KEY)
                ):
                    raise ValueError("DeleteRange would delete the event counter")
                continue
            else:
                raise ValueError(f"unknown op {op!r:.80}")
            if db not in dbh:
                raise ValueError(f"unknown database {db!r}")
            if db == EVENTS_DB:
                raise ValueError("events are written through commit(events=...)")
            if db == AUDIT_DB:
                raise ValueError("the audit log is written through commit(audit=...)")
            if not isinstance(key, bytes) or not 0 < len(key) <= max_key:
                raise ValueError(f"key must be 1..{max_key} bytes, got {key!r:.80}")
            if db == META_DB and key == LAST_EVENT_KEY:
                raise ValueError("meta key last_event_index is owned by the store")
        for body in events:
            if not isinstance(body, bytes):
                raise ValueError(f"event body must be bytes, got {type(body).__name__}")

    @property
    def last_event_index(self) -> int:
        """Newest committed event index as seen by the loop (0 when none was ever written)."""
        return self._last_event_index

    @property
    def txn_count(self) -> int:
        """Write transactions committed since open (group-commit efficiency = requests/txns)."""
        return self._txn_count

    @property
    def pending(self) -> int:
        """Requests queued or being committed."""
        return self._pending

    def _resolve(self, settled: _Settled) -> None:
        """Runs on the loop: settle every future of one batch, then run the commit hook."""
        batch, pairs, error, last = settled
        self._pending -= len(batch)
        if error is None:
            for req in batch:
                fut = req.future
                if not fut.done():  # a cancelled future is still committed; nobody listens
                    fut.set_result(req.result)
            self._last_event_index = max(self._last_event_index, last)
            if (
                self._failure is not None
                and not self._writer_dead
                and any(req.ops or req.events for req in batch)
            ):
                # A write went through: the store works again. Not for an audit record
                # alone: a full store still takes the small record of a refusal.
                self._set_failure(None)
            hook = self.on_commit
            if pairs and hook is not None:
                try:
                    hook(pairs)
                except Exception:
                    log.exception("on_commit hook failed")
        else:
            self._set_failure(str(error))
            cls = type(error)
            for req in batch:
                if not req.future.done():
                    req.future.set_exception(cls(*error.args))  # one instance per awaiter

    def _set_failure(self, reason: str | None) -> None:
        """Loop thread: record why writes fail (None: they work again) and tell the owner."""
        if reason == self._failure:
            return
        if reason is None:
            log.warning("LMDB writes work again after: %s", self._failure)
        self._failure = reason
        hook = self.on_failure
        if hook is not None:
            try:
                hook(reason)
            except Exception:
                log.exception("on_failure hook failed")

    @property
    def failure(self) -> str | None:
        """Why writes fail now (store full, a write error, the writer died), else None.

        Set by a failed commit and cleared by the next one that succeeds, so a store that
        filled up reports healthy again once space returns.
        """
        if self._writer_dead:
            return self._failure or "writer thread died"
        return self._failure

    # ------------------------------------------------------------------ reads (loop thread)

    def _handle(self, db: str) -> tuple[lmdb.Environment, lmdb._Database]:
        env = self._env
        if env is None:
            raise StoreClosed("store is not open")
        try:
            return env, self._dbh[db]
        except KeyError:
            raise ValueError(f"unknown database {db!r}") from None

    def get(self, db: str, key: bytes) -> bytes | None:
        """The value of ``key`` in ``db`` or ``None``. Loop thread only."""
        env, h = self._handle(db)
        with env.begin(db=h) as txn:
            value = txn.get(key)
        self._m_get.inc()
        return value

    def get_many(self, db: str, keys: Sequence[bytes]) -> list[bytes | None]:
        """Each key's value or ``None``, in one read txn (a txn costs more than a get)."""
        env, h = self._handle(db)
        with env.begin(db=h) as txn:
            get = txn.get
            values = [get(key) for key in keys]
        self._m_get.inc(len(keys))
        return values

    def scan(
        self,
        db: str,
        prefix: bytes = b"",
        start: bytes | None = None,
        limit: int | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """Pairs whose key starts with ``prefix`` and is ``>= start``, in key order.

        Loop thread only. It runs in one read txn without yielding, so page through large
        databases with ``limit`` and ``start`` (next start = last key + b"\\x00").
        """
        env, h = self._handle(db)
        t0 = time.perf_counter()
        out: list[tuple[bytes, bytes]] = []
        first = prefix if start is None or start < prefix else start
        if limit is None or limit > 0:
            with env.begin(db=h) as txn:
                cur = txn.cursor()
                if first:
                    found = cur.set_range(first)
                else:
                    found = cur.first()
                if found:
                    for key, value in cur:
                        if not key.startswith(prefix):
                            break
                        out.append((key, value))
                        if limit is not None and len(out) >= limit:
                            break
        self._m_scan.inc()
        self._m_scan_s.observe(time.perf_counter() - t0)
        return out

    def count(self, db: str) -> int:
        """Number of keys in ``db``. Loop thread only."""
        env, h = self._handle(db)
        with env.begin() as txn:
            return int(txn.stat(h)["entries"])

    def read_view(self, db: str, key: bytes, fn: Callable[[memoryview], T]) -> T | None:
        """Call ``fn`` with a zero-copy view of the value and return its result.

        The view points into the memory map and is valid only during ``fn``: do not keep
        it, slices of it, or ``numpy.frombuffer`` arrays over it (copy with ``bytes()``
        instead). ``fn`` must not await or call back into the store's writes. Returns
        ``None`` without calling ``fn`` when the key is absent. Loop thread only.
        """
        env, h = self._handle(db)
        with env.begin(db=h, buffers=True) as txn:
            view = txn.get(key)
            self._m_get.inc()
            if view is None:
                return None
            return fn(view)

    def events_since(self, after_index: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` committed events with index ``> after_index``, in index order."""
        env, h = self._handle(EVENTS_DB)
        out: list[tuple[int, bytes]] = []
        if limit <= 0:
            return out
        t0 = time.perf_counter()
        unpack = _INDEX.unpack
        with env.begin(db=h) as txn:
            cur = txn.cursor()
            if cur.set_range(_INDEX.pack(max(after_index + 1, 0))):
                for key, value in cur:
                    out.append((unpack(key)[0], value))
                    if len(out) >= limit:
                        break
        self._m_scan.inc()
        self._m_scan_s.observe(time.perf_counter() - t0)
        return out

    def event_batch(
        self,
        after_index: int,
        upto: int,
        max_events: int,
        max_bytes: int,
        scan_limit: int,
        topics: frozenset[str] | None,
        keys: frozenset[str] | None,
        fallback: EventFallback,
    ) -> tuple[bytes, int, int]:
        """``(batch, events in it, last index examined)`` read zero-copy (see the protocol).

        One ``buffers=True`` read txn: :func:`nexus_fast.eventlog.collect_batch` walks the
        cursor's views into the map and copies each stored body once, into the batch, built
        before the txn ends (no view outlives it). Loop thread only.
        """
        env, h = self._handle(EVENTS_DB)
        t0 = time.perf_counter()
        with env.begin(db=h, buffers=True) as txn:
            args = (max(after_index, 0), upto, max_events, max_bytes, scan_limit)
            batch = collect_batch(txn.cursor(), *args, topics, keys, fallback)
        self._m_scan.inc()
        self._m_scan_s.observe(time.perf_counter() - t0)
        return batch

    def first_event_index(self) -> int:
        """Oldest event kept; ``last_event_index + 1`` when the log is empty (all pruned)."""
        env, h = self._handle(EVENTS_DB)
        with env.begin(db=h) as txn:
            cur = txn.cursor()
            if cur.first():
                return event_index(cur.key())
        return self._last_event_index + 1

    def audit_since(
        self, after_seq: int, limit: int, max_bytes: int
    ) -> list[tuple[int, bytes, bytes]]:
        """Audit entries with seq ``> after_seq`` as ``(seq, hash, body)``, in seq order.

        At most ``limit`` entries and, past the first, at most ``max_bytes`` of bodies, so
        a page always fits a message limit however large the entries. Loop thread only.
        """
        env, h = self._handle(AUDIT_DB)
        out: list[tuple[int, bytes, bytes]] = []
        if limit <= 0:
            return out
        size = 0
        unpack = _INDEX.unpack
        with env.begin(db=h) as txn:
            cur = txn.cursor()
            if cur.set_range(audit_key(max(after_seq + 1, 0))):
                for key, value in cur:
                    size += len(value)
                    if out and size > max_bytes:
                        break
                    out.append((unpack(key)[0], value[:HASH_SIZE], value[HASH_SIZE:]))
                    if len(out) >= limit:
                        break
        self._m_scan.inc()
        return out

    @property
    def audit_head(self) -> ChainHead:
        """Newest committed audit entry (seq, hash) as seen by the writer."""
        return self._w_audit_head

    async def prune_events(self, keep_after_index: int) -> int:
        """Delete events with index ``<= keep_after_index`` through the writer.

        Deletes in chunks of at most ``max_batch_ops`` events per request so one prune
        never produces a huge transaction. Returns how many events were deleted.
        """
        bound = min(keep_after_index, self._last_event_index) + 1  # never touch the future
        deleted = 0
        first = self.first_event_index()
        while first < bound:
            end = min(bound, first + self._max_batch_ops)
            await self.commit([DeleteRange(EVENTS_DB, b"", _INDEX.pack(end))])
            deleted += end - first  # the log is contiguous from `first`
            first = end
        return deleted

    # ------------------------------------------------------------------ maintenance

    def reader_check(self) -> int:
        """Clear reader-table slots of dead processes; returns how many were cleared."""
        env = self._env
        if env is None:
            raise StoreClosed("store is not open")
        return env.reader_check()

    def size_bytes(self) -> int:
        """Bytes in use in the data file ((last_pgno + 1) * page size); updates the gauge."""
        env = self._env
        if env is None:
            raise StoreClosed("store is not open")
        size = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
        metrics.DB_SIZE_BYTES.set(size)
        return size

    @property
    def map_size(self) -> int:
        """Current map size in bytes (the most the file can grow to before the next growth)."""
        return self._map_size

    @property
    def max_map_size(self) -> int:
        """Cap on map growth in bytes."""
        return self._max_map_size

    def healthy(self) -> bool:
        """True while open, not closing, the writer alive and the last write succeeded."""
        if self.read_only:
            return self._env is not None
        writer = self._writer
        return (
            self._env is not None
            and not self._closing
            and self.failure is None
            and writer is not None
            and writer.is_alive()
        )

    def stat(self) -> dict[str, Any]:
        """Figures for ``/health/detailed`` (cheap: no scans)."""
        env = self._env
        out: dict[str, Any] = {
            "backend": "lmdb",
            "path": str(self.path),
            "open": env is not None,
            "healthy": self.healthy(),
            "failure": self.failure,
            "read_only": self.read_only,
            "map_size": self._map_size,
            "max_map_size": self._max_map_size,
            "pending_requests": self._pending,
            "max_queue": self._max_queue,
            "txn_count": self._txn_count,
            "avg_batch_requests": (
                self._batch_requests / self._txn_count if self._txn_count else 0.0
            ),
            "last_event_index": self._last_event_index,
            "audit_seq": self._w_audit_head.seq,
        }
        if env is not None:
            info = env.info()
            out["size_bytes"] = self.size_bytes()
            out["readers"] = info["num_readers"]
            out["max_readers"] = info["max_readers"]
            with env.begin() as txn:
                out["entries"] = {
                    name: int(txn.stat(h)["entries"]) for name, h in self._dbh.items()
                }
        return out

    async def backup(self, dest_dir: str | os.PathLike[str], keep: int = 3) -> Path:
        """Compacting, consistent copy into ``dest_dir/nexus-backup-<UTC time>/``.

        Runs in an executor thread (holding the resize lock, so map growth waits for it),
        then deletes all but the newest ``keep`` backups in ``dest_dir``. Returns the new
        directory, which opens as an ordinary LMDB environment (subdir=True).
        """
        if keep < 1:
            raise ValueError("keep must be >= 1")
        if self._env is None or self._closing:
            raise StoreClosed("store is not open")
        dest = Path(dest_dir)
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        target = await loop.run_in_executor(None, self._backup_blocking, dest, keep)
        self._m_backup.inc()
        self._m_backup_s.observe(time.perf_counter() - t0)
        return target

    def _backup_blocking(self, dest: Path, keep: int) -> Path:
        os.makedirs(dest, mode=datadir.DIR_MODE, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S.%fZ")
        target = dest / f"{BACKUP_PREFIX}{stamp}"
        tmp = dest / f".{BACKUP_PREFIX}{stamp}.tmp"
        tmp.mkdir(mode=datadir.DIR_MODE)
        try:
            with self._resize_lock:
                env = self._env
                if env is None:
                    raise StoreClosed("store closed during backup")
                write_copy(env, tmp / "data.mdb")  # the one copy: compacted, 0600, atomic
            # Rename last so a crash mid-copy never leaves something that looks complete.
            tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        old = sorted(p for p in dest.iterdir() if p.is_dir() and p.name.startswith(BACKUP_PREFIX))
        for stale in old[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
        return target
