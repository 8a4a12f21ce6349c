"""ReplicatedStore: the StateStore of cluster mode, etcd as the replicated durable log.

Every replica keeps its own :class:`~nexus_fast.store.lmdb_store.LmdbStore` (the materialized
state, the event log for subscribers, zero-copy reads); all reads go straight to it. Writes
go through the log ``{prefix}/log/{seq:020d}`` in etcd (``nexus_fast.store.log_entry``):

* **Leader** (after :meth:`ReplicatedStore.become_leader`): ``commit()`` validates and
  encodes the request and queues it; ONE group-commit task takes what is queued (bounded by
  ``max_entry_bytes`` and ``max_entry_ops``), writes it as entry ``seq`` in one etcd txn
  fenced on the leadership term (leader key create_revision == term AND the seq key absent),
  then applies it with ONE local commit carrying ``cluster_applied_seq`` and resolves each
  request's future with its own slice of the event range. The next entry's etcd txn may be
  in flight while the previous one applies; local applies still run strictly in seq order.
  Durable = committed in etcd. A txn refused by the fence fails everything pending with
  :class:`~nexus_fast.cluster.election.NotLeader` and resigns; etcd unreachable fails the
  batch with the ``EtcdError`` (UNAVAILABLE "etcd unavailable: ..."), reads keep working.
* **Follower**: a tailer range-reads the entries after ``applied_seq``, then watches the
  log prefix from the revision after that read, applying entries in seq order (several
  consecutive entries per local commit). A missing seq makes it re-read; a log compacted
  past this replica's position is an explicit ``needs_snapshot`` state in ``stat()``.

An entry and its applied position are one LMDB txn, so a replica that crashes re-applies
nothing twice and skips nothing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import orjson

from nexus_fast.cluster.election import Election, NotLeader, cancel_and_wait
from nexus_fast.cluster.etcd import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    KeyValue,
    cmp_version,
    op_put,
    op_range,
    prefix_end,
)
from nexus_fast.store.audit_chain import AuditRecord
from nexus_fast.store.base import (
    CommitResult,
    Op,
    StoreBusy,
    StoreClosed,
    StoreError,
)
from nexus_fast.store.local_reads import LocalReads
from nexus_fast.store.log_entry import (
    APPLIED_DB,
    APPLIED_KEY,
    ENTRY_HEADER_MAX,
    BadEntry,
    EntryTooLarge,
    applied_put,
    decode_applied,
    decode_entry,
    encode_entry,
    encode_request,
    flatten,
    framed_size,
    log_key,
    log_prefix,
    log_seq,
    split_result,
)

if TYPE_CHECKING:
    from nexus_fast.store.base import StateStore
    from nexus_fast.store.lmdb_store import LmdbStore

__all__ = ["EntryTooLarge", "LogBroken", "NotLeader", "ReplicatedStore"]

log = logging.getLogger(__name__)

T = TypeVar("T")
State = Literal["closed", "follower", "leader", "needs_snapshot", "broken"]

_BACKOFF_MIN = 0.05
_BACKOFF_MAX = 2.0
_APPLY_MAX_OPS = 10000  # follower: consecutive entries per local commit, bounded
_RANGE_BUDGET = 32 << 20  # catch-up page bytes at worst (the client takes 64 MiB)
_RANGE_MAX_PAGE = 256


class LogBroken(StoreError):
    """This replica cannot continue from the log: it was compacted past its position
    (it needs a snapshot) or holds an entry that does not decode."""


class _Fenced(Exception):
    """The fenced txn was refused: another leader's term."""


class _SeqTaken(Exception):
    """The seq already holds another entry of this term (an earlier unknown-outcome write)."""

    def __init__(self, kv: KeyValue) -> None:
        super().__init__(kv.key)
        self.kv = kv


class _Pending:
    """One queued leader commit."""

    __slots__ = ("audit", "body", "events", "future", "n_ops", "ops", "size")

    def __init__(
        self,
        ops: tuple[Op, ...],
        events: tuple[bytes, ...],
        audit: tuple[AuditRecord, ...],
        body: bytes,
        future: asyncio.Future[CommitResult],
    ) -> None:
        self.ops = ops
        self.events = events
        self.audit = audit
        self.body = body
        self.size = framed_size(body)
        self.n_ops = len(ops) + len(events) + len(audit)
        self.future = future


def _fail(batch: Sequence[_Pending], exc: BaseException) -> None:
    for p in batch:
        if not p.future.done():
            p.future.set_exception(exc)


class ReplicatedStore(LocalReads):
    """:class:`~nexus_fast.store.base.StateStore` over a local LmdbStore and the etcd log.

    ``local`` must not be opened by the caller and must not be written to except through
    this store (reads are fine). ``election`` must be started by the caller; the server
    calls :meth:`become_leader` when it wins.
    """

    def __init__(
        self,
        local: LmdbStore,
        client: EtcdClient,
        election: Election,
        prefix: bytes,
        *,
        max_entry_bytes: int = 1 << 20,
        max_entry_ops: int = 10000,
        max_queue: int = 100000,
    ) -> None:
        if max_entry_bytes < 1024 or max_entry_ops < 1 or max_queue < 1:
            raise ValueError("need max_entry_bytes >= 1024, max_entry_ops and max_queue >= 1")
        self.local = local
        self.client = client
        self.election = election
        self.prefix = prefix
        self.max_entry_bytes = max_entry_bytes
        self.max_entry_ops = max_entry_ops
        self.max_queue = max_queue
        self._log_prefix = log_prefix(prefix)
        self._log_end = prefix_end(self._log_prefix)
        self._page = max(1, min(_RANGE_MAX_PAGE, _RANGE_BUDGET // max_entry_bytes))

        self.applied_seq = 0
        """Seq of the newest entry applied to ``local`` (also in its meta db)."""
        self.applied_revision = 0
        """etcd revision of that entry (0 when not known since open)."""
        self.state: State = "closed"
        self._failure: str | None = None  # needs a snapshot / broken / apply trouble
        self._queue: collections.deque[_Pending] = collections.deque()
        self._wake = asyncio.Event()
        self._accepting = False
        self._term = 0
        self._next_seq = 1
        self._committer: asyncio.Task[None] | None = None
        self._applying: asyncio.Task[bool] | None = None
        self._lost_watch: asyncio.Task[None] | None = None
        self._tailer: asyncio.Task[None] | None = None
        self._closing = False
        election.can_lead = self._can_lead
        self.entries_written = 0
        """Log entries this replica wrote as leader (group-commit efficiency, tests)."""
        self.requests_written = 0
        self.entries_applied = 0
        """Entries applied from the log as a follower (catch-up and watch)."""

    # ------------------------------------------------------------------ health, figures

    def _can_lead(self) -> bool:
        """Only a replica that follows the log may campaign (not one needing a snapshot)."""
        return self.state in ("follower", "leader")

    def healthy(self) -> bool:
        """Local store healthy and the log followable (not needing a snapshot, not broken)."""
        return self.local.healthy() and self.state in ("follower", "leader")

    @property
    def failure(self) -> str | None:
        return self._failure or self.local.failure

    @property
    def log_head(self) -> int:
        """Newest seq this replica knows is in the log."""
        return max(self.applied_seq, self._next_seq - 1 if self._accepting else 0)

    def stat(self) -> dict[str, Any]:
        """The local store's figures plus the cluster's (role, term, positions, etcd)."""
        out = self.local.stat()
        out["backend"] = "replicated"
        out["healthy"] = self.healthy()
        out["failure"] = self.failure
        out["cluster"] = {
            **self.election.stat(),
            "state": self.state,
            "applied_seq": self.applied_seq,
            "applied_revision": self.applied_revision,
            "log_head": self.log_head,
            "pending_commits": len(self._queue),
            "entries_written": self.entries_written,
            "requests_written": self.requests_written,
            "entries_applied": self.entries_applied,
            "max_entry_bytes": self.max_entry_bytes,
            "etcd_endpoints": list(self.client.endpoints),
        }
        return out

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        """Open the local store, read ``cluster_applied_seq``, start following the log."""
        if self.state != "closed":
            return
        if self._closing:
            raise StoreClosed("store was closed; create a new ReplicatedStore")
        await self.local.open()
        self.applied_seq = decode_applied(self.local.get(APPLIED_DB, APPLIED_KEY))
        self.state = "follower"
        self._start_tailer()

    async def close(self) -> None:
        """Stop writing and following, then close the local store."""
        if self._closing:
            return
        self._closing = True
        await self._stop_leading(StoreClosed("store is closed"))
        await self._stop_tailer()
        self.state = "closed"
        await self.local.close()

    # ------------------------------------------------------------------ leader: commit

    def commit(
        self,
        ops: Sequence[Op],
        events: Sequence[bytes] = (),
        audit: Sequence[AuditRecord] = (),
    ) -> asyncio.Future[CommitResult]:
        """Queue a request for the next log entry; the future resolves once it is committed
        in etcd AND applied locally, to the indices its events got (as ``LmdbStore``).

        Raises :class:`NotLeader` unless leading, ``ValueError`` for a malformed request,
        :class:`EntryTooLarge` (an ``InvalidArgument`` and a ``ValueError``) for a request
        bigger than one entry may be, :class:`StoreBusy` when ``max_queue`` are waiting.
        """
        if self._closing or self.state == "closed":
            raise StoreClosed("store is closed" if self._closing else "store is not open")
        if not self._accepting:
            raise self.election.not_leader()
        if len(self._queue) >= self.max_queue:
            raise StoreBusy(f"write queue full ({self.max_queue} requests pending)")
        ops_t, events_t, audit_t = tuple(ops), tuple(events), tuple(audit)
        # What the leader lets into the log every replica must be able to apply.
        self.local._validate(ops_t, events_t)
        for record in audit_t:
            if type(record) is not AuditRecord:
                raise ValueError(f"audit records must be AuditRecord, got {type(record).__name__}")
        body = encode_request(ops_t, events_t, audit_t)
        fut: asyncio.Future[CommitResult] = asyncio.get_running_loop().create_future()
        pending = _Pending(ops_t, events_t, audit_t, body, fut)
        if pending.size + ENTRY_HEADER_MAX > self.max_entry_bytes:
            raise EntryTooLarge(pending.size, self.max_entry_bytes)
        self._queue.append(pending)
        self._wake.set()
        return fut

    async def become_leader(self) -> None:
        """Stop the tailer, apply every entry up to etcd's current revision, then accept
        commits. Raises :class:`NotLeader` when the election does not (still) make this
        replica leader, ``EtcdError`` / :class:`LogBroken` when the catch-up fails (the
        tailer then runs again)."""
        if self._accepting:
            return
        if self.state == "closed" or self._closing:
            raise StoreClosed("store is not open")
        if not self.election.leading():
            raise self.election.not_leader()
        await self._stop_tailer()
        try:
            await self._catch_up()
            if not self.election.leading():
                raise self.election.not_leader()
        except BaseException:
            if not self._closing and self.state == "follower":
                self._start_tailer()
            raise
        self._term = self.election.term
        self._next_seq = self.applied_seq + 1
        self._accepting = True
        self.state = "leader"
        self._committer = asyncio.create_task(self._commit_loop(), name="replog-commit")
        self._lost_watch = asyncio.create_task(self._watch_lost(), name="replog-lost")
        log.info("leading the log from seq %d (term %d)", self._next_seq, self._term)

    async def _watch_lost(self) -> None:
        await self.election.lost.wait()
        if self.state == "leader" and not self._closing:
            log.warning("leadership lost: failing pending commits, following the log again")
            self._lost_watch = None  # _stop_leading must not cancel this very task
            await self._stop_leading(self.election.not_leader())
            if not self._closing:
                self.state = "follower"
                self._start_tailer()

    async def _stop_leading(self, error: BaseException) -> None:
        """Refuse commits, end the group-commit task, fail what is queued with ``error``."""
        was = self.state == "leader"
        self._accepting = False
        tasks = [t for t in (self._committer, self._lost_watch) if t is not None]
        self._committer = self._lost_watch = None
        for task in tasks:
            await cancel_and_wait(task)
        applying, self._applying = self._applying, None
        if applying is not None:  # a local apply of a committed entry always completes
            with contextlib.suppress(Exception):
                await asyncio.shield(applying)
        queued = list(self._queue)
        self._queue.clear()
        _fail(queued, error)
        if was:
            # The applied position is what LMDB holds, whatever was cut short.
            self.applied_seq = decode_applied(self.local.get(APPLIED_DB, APPLIED_KEY))

    def _take_batch(self) -> list[_Pending]:
        q = self._queue
        batch = [q.popleft()]
        size = ENTRY_HEADER_MAX + batch[0].size
        n = batch[0].n_ops
        while q:
            nxt = q[0]
            if size + nxt.size > self.max_entry_bytes or n + nxt.n_ops > self.max_entry_ops:
                break
            batch.append(q.popleft())
            size += nxt.size
            n += nxt.n_ops
        return batch

    async def _commit_loop(self) -> None:
        batch: list[_Pending] = []
        try:
            while True:
                if not self._queue:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                batch = self._take_batch()
                try:
                    seq, rev = await self._write_batch(batch)
                except _EtcdFailed as failed:
                    _fail(batch, failed.exc)
                    batch = []
                    continue
                self.entries_written += 1
                self.requests_written += len(batch)
                # Local applies run one at a time in seq order; the next etcd txn may
                # already be in flight while this one applies.
                if not await self._wait_applying():
                    raise _Fenced()  # the previous apply failed: this replica resigned
                self._applying = asyncio.create_task(self._apply_own(seq, rev, batch))
                batch = []
        except asyncio.CancelledError:
            _fail(batch, self.election.not_leader())
            raise
        except _Fenced:
            _fail(batch, self.election.not_leader())
            self._accepting = False
            _fail(list(self._queue), self.election.not_leader())
            self._queue.clear()
            self.election.resign("a log write was refused by the fence: another leader's term")
        except Exception as exc:
            log.exception("group-commit task failed")
            _fail(batch, StoreError(f"replicated commit failed: {exc!r}"))
            self._accepting = False
            _fail(list(self._queue), self.election.not_leader())
            self._queue.clear()
            self.election.resign(f"group-commit task failed: {exc!r}")

    async def _write_batch(self, batch: list[_Pending]) -> tuple[int, int]:
        """Write ``batch`` as the next entry: ``(seq, revision)``."""
        while True:
            seq = self._next_seq
            entry = encode_entry(seq, self._term, [p.body for p in batch])
            try:
                rev = await self._write_entry(seq, entry)
            except _SeqTaken as taken:
                # An earlier write of this term whose outcome was unknown landed there: it
                # is in the log, so it is applied here too; this batch goes after it.
                if not await self._wait_applying():
                    raise _Fenced() from None
                await self._apply_log_kvs([taken.kv])
                self._next_seq = seq + 1
                continue
            self._next_seq = seq + 1
            return seq, rev

    async def _wait_applying(self) -> bool:
        """Wait for the previous entry's local apply; False when it failed."""
        applying = self._applying
        if applying is None:
            return True
        ok = await asyncio.shield(applying)
        if self._applying is applying:
            self._applying = None
        return ok

    async def _write_entry(self, seq: int, entry: bytes) -> int:
        """Put entry ``seq`` with the fenced txn; its revision. Retries an unknown outcome
        with the SAME txn (idempotent: it lands once, or finds its own bytes there)."""
        key = log_key(self.prefix, seq)
        election = self.election
        compare = [election.fence(), cmp_version(key, "==", 0)]
        give_up = time.monotonic() + election.lease_ttl
        backoff = _BACKOFF_MIN
        while True:
            if not election.leading():
                raise _Fenced()
            try:
                res = await self.client.txn(
                    compare, [op_put(key, entry)], [op_range(election.key), op_range(key)]
                )
            except EtcdError as exc:
                if getattr(exc, "maybe_committed", False) and time.monotonic() < give_up:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
                    continue
                _fail_now = list(self._queue)  # etcd is down: the queued fail fast too
                self._queue.clear()
                _fail(_fail_now, exc)
                raise _EtcdFailed(exc) from None
            if res.succeeded:
                return res.revision
            leader_kvs, log_kvs = res.ranges[0], res.ranges[1]
            if not leader_kvs or leader_kvs[0].create_revision != election.term:
                raise _Fenced()
            kv = log_kvs[0]
            if kv.value == entry:
                return kv.mod_revision  # an earlier attempt of this very txn landed
            raise _SeqTaken(kv)

    async def _apply_own(self, seq: int, rev: int, batch: list[_Pending]) -> bool:
        """Leader: apply its committed entry locally in one commit; resolve the futures."""
        ops: list[Op] = []
        events: list[bytes] = []
        audit: list[AuditRecord] = []
        for p in batch:
            ops.extend(p.ops)
            events.extend(p.events)
            audit.extend(p.audit)
        try:
            result = await self._apply_local(ops, events, audit, seq, rev)
            results = split_result(result, [len(p.events) for p in batch])
        except Exception as exc:
            # Committed (the followers apply it) but not here: this replica cannot lead on.
            err = StoreError(
                f"committed to the log as entry {seq} but not applied on the leader: {exc}"
            )
            _fail(batch, err)
            self._failure = str(err)
            self.election.resign(f"local apply of entry {seq} failed: {exc}")
            return False
        for p, r in zip(batch, results):
            if not p.future.done():
                p.future.set_result(r)
        return True

    async def _apply_local(
        self,
        ops: list[Op],
        events: list[bytes],
        audit: list[AuditRecord],
        seq: int,
        rev: int,
    ) -> CommitResult:
        """One local commit of an entry (or of consecutive entries ending at ``seq``).

        Never abandoned half-way: a cancelled caller still waits for the LMDB commit, so
        ``applied_seq`` always matches what LMDB holds.
        """
        ops.append(applied_put(seq))
        fut = self.local.commit(ops, events, audit)
        try:
            result = await asyncio.shield(fut)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await fut
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._applied(seq, rev)
            raise
        self._applied(seq, rev)
        return result

    def _applied(self, seq: int, rev: int) -> None:
        self.applied_seq = seq
        self.applied_revision = rev
        if self._failure is not None and self.state in ("follower", "leader"):
            self._failure = None

    # ------------------------------------------------------------------ follower: tailer

    def _start_tailer(self) -> None:
        if self._tailer is None or self._tailer.done():
            self._tailer = asyncio.create_task(self._tail(), name="replog-tail")

    async def _stop_tailer(self) -> None:
        task, self._tailer = self._tailer, None
        if task is not None:
            await cancel_and_wait(task)

    async def _tail(self) -> None:
        backoff = _BACKOFF_MIN
        while True:
            try:
                rev = await self._catch_up()
                await self._follow(rev)
                backoff = _BACKOFF_MIN
            except LogBroken as exc:
                self.state = "broken" if isinstance(exc.__cause__, BadEntry) else "needs_snapshot"
                self._failure = str(exc)
                log.error("%s", exc)
                return
            except EtcdCompacted:
                continue  # the watch start was compacted: re-read the log as it is now
            except EtcdError as exc:
                log.warning("following the log: %s", exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            except StoreError as exc:
                self._failure = f"cannot apply log entry {self.applied_seq + 1}: {exc}"
                log.error("%s", self._failure)
                await asyncio.sleep(_BACKOFF_MAX)
            except Exception as exc:  # a bug must not end the tailer silently
                self._failure = f"following the log failed at entry {self.applied_seq + 1}: {exc!r}"
                log.exception("following the log failed")
                await asyncio.sleep(_BACKOFF_MAX)

    async def _catch_up(self) -> int:
        """Apply every entry after ``applied_seq`` in the log now; the revision read at."""
        kvs, rev = await self.client.range(
            log_key(self.prefix, self.applied_seq + 1), self._log_end, limit=self._page
        )
        if not kvs and self.applied_seq:
            # Compaction always keeps the newest entry: an empty log after this replica
            # applied some means etcd lost or was given another cluster's data.
            anything, _ = await self.client.range(self._log_prefix, self._log_end, limit=1)
            if not anything:
                raise LogBroken(
                    f"the log in etcd is empty but this replica applied up to entry "
                    f"{self.applied_seq}: etcd was reset or the prefix is wrong; this "
                    "replica needs a snapshot (or an empty data dir) to rejoin"
                )
        while kvs:
            await self._apply_log_kvs(kvs)
            if len(kvs) < self._page:
                break
            kvs, _ = await self.client.range(
                log_key(self.prefix, self.applied_seq + 1),
                self._log_end,
                revision=rev,
                limit=self._page,
            )
        return rev

    async def _follow(self, rev: int) -> None:
        """Apply what the watch delivers from ``rev + 1``; return on a gap (to re-read)."""
        it = self.client.watch(self._log_prefix, self._log_end, start_revision=rev + 1)
        try:
            async for _, events in it:
                kvs = [ev.kv for ev in events if ev.kind == "put"]
                if not kvs:
                    continue  # progress notification, or compaction's deletes
                fresh: list[KeyValue] = []
                expected = self.applied_seq + 1
                for kv in kvs:
                    seq = self._seq_of(kv)
                    if seq < expected:
                        continue  # already applied (a catch-up read it)
                    if seq > expected:
                        log.warning("log gap: got entry %d, expected %d; re-reading", seq, expected)
                        if fresh:
                            await self._apply_log_kvs(fresh)
                        return
                    fresh.append(kv)
                    expected += 1
                if fresh:
                    await self._apply_log_kvs(fresh)
        finally:
            close = getattr(it, "aclose", None)
            if close is not None:
                with contextlib.suppress(Exception):
                    await close()

    def _seq_of(self, kv: KeyValue) -> int:
        try:
            return log_seq(self.prefix, kv.key)
        except ValueError:
            raise LogBroken(f"foreign key under the log prefix: {kv.key!r:.120}") from None

    async def _apply_log_kvs(self, kvs: Sequence[KeyValue]) -> None:
        """Apply consecutive log entries, the first being ``applied_seq + 1``, a bounded
        number of ops per local commit; :class:`LogBroken` on a missing seq."""
        ops: list[Op] = []
        events: list[bytes] = []
        audit: list[AuditRecord] = []
        expected = self.applied_seq + 1
        n = rev = 0
        for kv in kvs:
            seq = self._seq_of(kv)
            if seq != expected:
                if n:
                    await self._apply_local(ops, events, audit, expected - 1, rev)
                    self.entries_applied += n
                raise self._gap_error(seq, expected - 1)
            try:
                entry = decode_entry(kv.value)
            except BadEntry as exc:
                raise LogBroken(f"log entry {seq}: {exc}") from exc
            if entry.seq != seq:
                raise LogBroken(f"log entry under seq {seq} says seq {entry.seq}")
            o, e, a = flatten(entry.requests)
            ops.extend(o)
            events.extend(e)
            audit.extend(a)
            rev = kv.mod_revision
            n += 1
            expected += 1
            if len(ops) + len(events) + len(audit) >= _APPLY_MAX_OPS:
                await self._apply_local(ops, events, audit, seq, rev)
                self.entries_applied += n
                ops, events, audit, n = [], [], [], 0
        if n:
            await self._apply_local(ops, events, audit, expected - 1, rev)
            self.entries_applied += n

    def _gap_error(self, seq: int, after: int) -> LogBroken:
        return LogBroken(
            f"the log continues at entry {seq} but this replica applied up to {after}: "
            "entries were compacted away; this replica needs a snapshot to rejoin"
        )

    # ------------------------------------------------------------------ maintenance

    async def compact(self, keep_after_seq: int) -> int:
        """Delete log entries ``<= keep_after_seq`` and compact etcd's history up to the
        newest deleted entry's revision; returns how many entries were deleted. The caller
        passes the minimum applied seq of the live replicas (see :meth:`replicas`).

        The newest entry this replica applied always stays, so a replica far behind finds
        the first entry it needs missing (and says it needs a snapshot) instead of an empty
        log it would wait on."""
        keep = min(keep_after_seq, self.applied_seq - 1)
        if keep <= 0:
            return 0
        last = await self.client.get(log_key(self.prefix, keep))
        deleted = await self.client.delete(self._log_prefix, log_key(self.prefix, keep + 1))
        if last is not None:
            with contextlib.suppress(EtcdCompacted):
                await self.client.compact(last.mod_revision)
        return deleted

    def _replica_key(self, name: str) -> bytes:
        return b"%s/replicas/%s" % (self.prefix, name.encode())

    async def publish_status(self, info: dict[str, Any]) -> bool:
        """Put this replica's status (``info`` plus name, role, applied_seq) under
        ``{prefix}/replicas/{name}`` with the election's lease; False without a lease yet."""
        lease = self.election.lease_id
        if not lease:
            return False
        value = {
            **info,
            "name": self.election.name,
            "advertise": self.election.advertise,
            "role": self.election.role,
            "applied_seq": self.applied_seq,
            "state": self.state,
        }
        await self.client.put(
            self._replica_key(self.election.name), orjson.dumps(value), lease=lease
        )
        return True

    async def replicas(self) -> list[dict[str, Any]]:
        """The status every live replica published (see :meth:`publish_status`)."""
        start = b"%s/replicas/" % self.prefix
        kvs, _ = await self.client.range(start, prefix_end(start))
        out: list[dict[str, Any]] = []
        for kv in kvs:
            try:
                value = orjson.loads(kv.value)
            except orjson.JSONDecodeError:
                continue
            if isinstance(value, dict):
                out.append(value)
        return out


class _EtcdFailed(Exception):
    """The entry's txn failed with an EtcdError (already delivered to the queued)."""

    def __init__(self, exc: EtcdError) -> None:
        super().__init__(str(exc))
        self.exc = exc


if TYPE_CHECKING:

    def _is_a_state_store(store: ReplicatedStore) -> StateStore:
        return store  # mypy checks ReplicatedStore against the protocol here
