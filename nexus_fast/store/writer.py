"""The store's writer thread: group commit of queued requests into one LMDB write txn.

:class:`WriterThread` is the half of :class:`~nexus_fast.store.lmdb_store.LmdbStore` that
runs off the loop: it takes the first waiting request, drains whatever else is queued (up
to ``max_batch_ops``, optionally waiting ``sync_window`` seconds for more), applies them all
in ONE write transaction (with the audit entries that record them, chained onto the audit
head), commits (one fsync) and hands the whole batch back to the loop with ONE
``call_soon_threadsafe``. It also grows the map on ``MapFullError`` (through the loop, so no
read txn is open). Only the writer thread touches the ``_w_*`` state.
"""

from __future__ import annotations

import asyncio
import queue
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import lmdb

from nexus_fast import failpoints
from nexus_fast.logs import get_logger
from nexus_fast.store import datadir
from nexus_fast.store.audit_chain import AUDIT_DB, AuditRecord, ChainHead, chain_puts
from nexus_fast.store.base import (
    CommitResult,
    Delete,
    DeleteRange,
    Op,
    Put,
    StoreError,
    StoreFull,
)

log = get_logger("store")

EVENTS_DB = "events"
META_DB = "meta"
LAST_EVENT_KEY = b"last_event_index"
"""Key in ``meta`` holding the newest event index (8-byte big-endian)."""

_INDEX = struct.Struct(">Q")
_NO_EVENTS = CommitResult(0, 0)
_STOP = object()  # queue sentinel put by close(): everything before it is committed
_RESIZE_RETRY_S = 0.005  # a backup holds the resize lock; retry without blocking the loop


class _Request:
    """One commit() call travelling to the writer and back."""

    __slots__ = ("audit", "events", "future", "n_ops", "ops", "result")

    def __init__(
        self,
        ops: tuple[Op, ...],
        events: tuple[bytes, ...],
        future: asyncio.Future[CommitResult],
        n_ops: int,
        audit: tuple[AuditRecord, ...] = (),
    ) -> None:
        self.ops = ops
        self.events = events
        self.audit = audit
        self.future = future
        self.n_ops = n_ops
        self.result = _NO_EVENTS


class _Settled(NamedTuple):
    """How one batch ended, handed from the writer thread to the loop in one call."""

    batch: list[_Request]
    pairs: list[tuple[int, bytes]]  # (event index, event) committed, for the commit hook
    error: StoreError | None  # None: committed
    last: int  # newest event index committed


class WriterThread:
    """The writer-thread methods of ``LmdbStore`` (a mixin: the store owns the state).

    The attributes below are set by ``LmdbStore.__init__``/``open``; they are declared
    here so each half type-checks on its own.
    """

    path: Path
    _env: lmdb.Environment | None
    _dbh: dict[str, lmdb._Database]
    _loop: asyncio.AbstractEventLoop | None
    _queue: queue.SimpleQueue[Any]
    _writer_dead: bool
    _sync_window: float
    _max_batch_ops: int
    _max_map_size: int
    _map_size: int
    _resize_lock: threading.Lock
    _w_last_index: int
    _w_audit_head: ChainHead
    _txn_count: int
    _batch_requests: int
    _m_commit: Any
    _m_commit_s: Any
    _m_put: Any
    _m_delete: Any
    _m_grow: Any
    _m_grow_s: Any
    _set_failure: Callable[[str | None], None]
    _resolve: Callable[[_Settled], None]

    def _writer_main(self) -> None:
        q = self._queue
        carry: _Request | None = None
        inflight: list[_Request] = []  # the batch being committed, failed too if we crash
        stopping = False
        try:
            while not stopping:
                if failpoints.ACTIVE:
                    failpoints.hit("store.writer_stall")
                first = carry if carry is not None else q.get()
                carry = None
                if first is _STOP:
                    break
                batch: list[_Request] = [first]
                n = first.n_ops
                deadline = 0.0
                while n < self._max_batch_ops:
                    try:
                        item = q.get_nowait()
                    except queue.Empty:
                        if self._sync_window <= 0:
                            break
                        now = time.monotonic()
                        if not deadline:
                            deadline = now + self._sync_window
                        if now >= deadline:
                            break
                        try:
                            item = q.get(timeout=deadline - now)
                        except queue.Empty:
                            break
                    if item is _STOP:
                        stopping = True
                        break
                    if n + item.n_ops > self._max_batch_ops:
                        carry = item  # goes first in the next batch; requests are never split
                        break
                    batch.append(item)
                    n += item.n_ops
                inflight = batch
                self._process(batch)
                inflight = []
        except BaseException as exc:
            log.exception("LMDB writer thread crashed")
            self._writer_dead = True
            self._fail_leftovers(inflight, carry)
            loop = self._loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(self._set_failure, f"writer thread died: {exc!r}")
            raise

    def _fail_leftovers(self, inflight: list[_Request], carry: _Request | None) -> None:
        """After a writer crash, fail the batch it held and every request still queued."""
        left: list[_Request] = [*inflight, *([carry] if carry is not None else [])]
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                left.append(item)
        if left:
            self._post(_Settled(left, [], StoreError("writer thread died"), 0))

    def _process(self, batch: list[_Request]) -> None:
        t0 = time.perf_counter()
        base = self._w_last_index
        error: StoreError | None = None
        pairs: list[tuple[int, bytes]] = []
        last = base
        puts = deletes = 0
        audit_head = self._w_audit_head
        while True:
            try:
                if failpoints.ACTIVE:
                    failpoints.hit("store.before_commit")
                pairs, last, puts, deletes, audit_head = self._apply(batch, base)
                break
            except lmdb.MapFullError:
                # The txn is aborted (context manager); grow and retry the same batch.
                try:
                    if self._grow():
                        continue
                    error = StoreFull(
                        f"store full: the database reached max_map_size ({self._max_map_size} "
                        "bytes); raise database.max_map_size or free space"
                    )
                except Exception as exc:  # becomes this batch's error; the writer lives on
                    error = StoreError(f"map resize failed: {exc!r}")
                break
            except Exception as exc:  # any txn failure fails this batch only
                if datadir.is_disk_full(exc, self.path):
                    error = StoreFull(f"store full: no space left on the device ({exc})")
                else:
                    error = StoreError(f"commit failed: {exc!r}")
                break
        if error is None:
            if failpoints.ACTIVE:
                # Durable, not yet answered. An error here kills the writer, as a bug would.
                failpoints.hit("store.after_commit")
            self._w_last_index = last
            self._w_audit_head = audit_head  # only once committed: a retry reuses the seqs
            self._txn_count += 1
            self._batch_requests += len(batch)
            self._m_commit.inc()
            self._m_commit_s.observe(time.perf_counter() - t0)
            if puts:
                self._m_put.inc(puts)
            if deletes:
                self._m_delete.inc(deletes)
        else:
            log.error("LMDB commit of %d requests failed: %s", len(batch), error)
        self._post(_Settled(batch, pairs, error, last))

    def _apply(
        self, batch: list[_Request], base: int
    ) -> tuple[list[tuple[int, bytes]], int, int, int, ChainHead]:
        env = self._env
        assert env is not None
        dbh = self._dbh
        events_db = dbh[EVENTS_DB]
        pack = _INDEX.pack
        idx = base
        pairs: list[tuple[int, bytes]] = []
        puts = deletes = 0
        audit: list[AuditRecord] = []
        head = self._w_audit_head
        with env.begin(write=True) as txn:  # commits (fsync) on exit, aborts on exception
            # Consecutive puts to one database go to LMDB in one putmulti call (a C loop:
            # ~0.2 us a put instead of ~1 us through Python, all of it holding the GIL the
            # event loop needs). A delete or another database ends the run: order is kept.
            run: list[tuple[bytes, bytes]] = []
            run_db = ""
            for req in batch:
                for op in req.ops:
                    if type(op) is Put:
                        if op.db != run_db:
                            puts += _put_run(txn, dbh, run_db, run)
                            run_db = op.db
                        run.append((op.key, op.value))
                        continue
                    puts += _put_run(txn, dbh, run_db, run)
                    if type(op) is Delete:
                        txn.delete(op.key, db=dbh[op.db])
                        deletes += 1
                    elif type(op) is DeleteRange:
                        deletes += _delete_range(txn, dbh[op.db], op.start, op.end)
                if req.audit:
                    audit.extend(req.audit)
                if req.events:
                    first = idx + 1
                    for body in req.events:
                        idx += 1
                        pairs.append((idx, body))
                    req.result = CommitResult(first, idx)
                else:
                    req.result = _NO_EVENTS
            puts += _put_run(txn, dbh, run_db, run)
            if pairs:
                # append=True: indices only grow, so LMDB skips the tree search; a key not
                # above the newest stored is refused, which must never happen.
                cursor = txn.cursor(db=events_db)
                _, added = cursor.putmulti(
                    [(pack(i), body) for i, body in pairs], overwrite=False, append=True
                )
                if added != len(pairs):
                    raise StoreError(f"event indices {base + 1}..{idx} not above the newest")
                puts += added
            if idx != base:
                txn.put(LAST_EVENT_KEY, pack(idx), db=dbh[META_DB])
            if audit:
                # The records of every request in this txn: the log and the changes it
                # records commit or fail together. Seqs only grow, hence append=True.
                entries, head = chain_puts(head, audit)
                _, added = txn.cursor(db=dbh[AUDIT_DB]).putmulti(
                    entries, overwrite=False, append=True
                )
                if added != len(entries):
                    raise StoreError(
                        f"audit seqs after {self._w_audit_head.seq} not above the newest"
                    )
                puts += added
            if failpoints.ACTIVE:
                failpoints.hit("store.commit")  # delay: a slow fsync; error: the txn aborts
        return pairs, idx, puts, deletes, head

    def _post(self, settled: _Settled) -> None:
        loop = self._loop
        assert loop is not None
        try:
            # ONE wake-up of the loop per batch, however many futures it resolves.
            loop.call_soon_threadsafe(self._resolve, settled)
        except RuntimeError:
            log.warning("event loop closed; %d commit results dropped", len(settled.batch))

    def _grow(self) -> bool:
        """Writer thread, no txn open: double the map via the loop. False when at the cap."""
        current = self._map_size
        if current >= self._max_map_size:
            return False
        if failpoints.ACTIVE:
            failpoints.hit("store.map_grow")
        new = min(current * 2, self._max_map_size)
        done = threading.Event()
        box: list[BaseException | None] = []
        loop = self._loop
        assert loop is not None
        try:
            loop.call_soon_threadsafe(self._resize_on_loop, new, done, box)
        except RuntimeError:
            # Loop closed: no loop reads can run any more, so resizing here is safe.
            self._resize_on_loop(new, done, box, retry=False)
        while not done.wait(0.5):
            if loop.is_closed():
                self._resize_on_loop(new, done, box, retry=False)
        if box and box[0] is not None:
            raise box[0]
        return True

    def _resize_on_loop(
        self, new: int, done: threading.Event, box: list[BaseException | None], retry: bool = True
    ) -> None:
        if done.is_set():
            return
        if not self._resize_lock.acquire(blocking=not retry):
            # A backup copy holds a read txn; try again soon instead of blocking the loop.
            assert self._loop is not None
            self._loop.call_later(_RESIZE_RETRY_S, self._resize_on_loop, new, done, box)
            return
        t0 = time.perf_counter()
        try:
            env = self._env
            assert env is not None
            env.set_mapsize(new)
            self._map_size = env.info()["map_size"]
            box.append(None)
            log.info("LMDB map grown to %d bytes", self._map_size)
        except Exception as exc:  # handed to the writer, which fails the batch
            box.append(exc)
        finally:
            self._resize_lock.release()
            self._m_grow.inc()
            self._m_grow_s.observe(time.perf_counter() - t0)
            done.set()


def _put_run(
    txn: lmdb.Transaction, dbh: dict[str, lmdb._Database], db: str, run: list[tuple[bytes, bytes]]
) -> int:
    """Write and empty a run of puts to one database; returns how many."""
    if not run:
        return 0
    consumed, _ = txn.cursor(db=dbh[db]).putmulti(run)
    if consumed != len(run):
        raise StoreError(f"put of {len(run)} records to {db} stopped after {consumed}")
    run.clear()
    return consumed


def _delete_range(
    txn: lmdb.Transaction[bytes], h: lmdb._Database, start: bytes, end: bytes | None
) -> int:
    """Delete keys ``start <= k < end`` of ``h`` inside ``txn``; returns how many."""
    cur = txn.cursor(db=h)
    found = cur.set_range(start) if start else cur.first()
    n = 0
    if not found:
        return 0
    key = cur.key()
    while key and (end is None or key < end):  # key() is b"" once the cursor runs off the end
        cur.delete()
        n += 1
        key = cur.key()
    return n
