"""The state-store interface the services program against.

The services (nodes, commands, agents, events) only see :class:`StateStore`, the op types
and the errors defined here, so a second backend (etcd) can replace LMDB without touching
them. Keys and values are opaque bytes; each record lives in a named database (a keyspace).

Writes are requests of ops plus event bodies applied atomically: the store assigns each
event a strictly increasing index in the same transaction as the ops, so an event exists
if and only if the state change it describes was committed. Audit records (who made the
change) travel the same way: appended to the audit hash chain in the same transaction.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeAlias, TypeVar

from nexus_fast import errors

if TYPE_CHECKING:
    from nexus_fast.store.audit_chain import AuditRecord, ChainHead

T = TypeVar("T")


class Put(NamedTuple):
    """Set ``key`` to ``value`` in database ``db``."""

    db: str
    key: bytes
    value: bytes


class Delete(NamedTuple):
    """Remove ``key`` from database ``db`` (no error when it is absent)."""

    db: str
    key: bytes


class DeleteRange(NamedTuple):
    """Remove every key ``k`` of ``db`` with ``start <= k < end`` (``end=None``: to the end)."""

    db: str
    start: bytes
    end: bytes | None


# A union rather than a base class: NamedTuples cannot share one, and `type(op) is Put`
# dispatch in the writer is the cheapest test there is.
Op: TypeAlias = Put | Delete | DeleteRange


class CommitResult(NamedTuple):
    """Indices assigned to one request's events; ``(0, 0)`` when it carried none."""

    first_event_index: int
    last_event_index: int


class StoreError(errors.Unavailable):
    """A state-store operation failed; the request was not committed.

    An :class:`~nexus_fast.errors.Unavailable`: a write that fails (an I/O error, the
    writer gone) answers ``UNAVAILABLE`` with the reason, not INTERNAL.
    """


class StoreClosed(StoreError):
    """The store is closed or closing and accepts no new work."""


class StoreBusy(StoreError, errors.ResourceExhausted):
    """The write queue is full; retry later (maps to RESOURCE_EXHAUSTED)."""


class StoreFull(StoreError, errors.StoreFull):
    """The database reached its maximum size; the batch was not committed.

    Also a :class:`nexus_fast.errors.StoreFull` (a ``ResourceExhausted``), so the API edge
    answers ``RESOURCE_EXHAUSTED "store full"`` instead of INTERNAL.
    """


class StoreLocked(StoreError):
    """Another process holds the data directory's lock (one server per data dir)."""


class StoreReadOnly(StoreError):
    """The store was opened read-only (backup and check tools); it takes no writes."""


CommitHook: TypeAlias = Callable[[list[tuple[int, bytes]]], None]


class FramedEvent(Protocol):
    """An event as the bus frames it (its envelope): what a catch-up batch needs of it."""

    @property
    def topic(self) -> str: ...

    @property
    def key(self) -> str: ...

    @property
    def pb_field(self) -> bytes: ...


EventFallback: TypeAlias = Callable[[int, bytes], FramedEvent]
"""Frames an event the zero-copy walk cannot (malformed, or carrying its own index)."""


class StateStore(Protocol):
    """What the services need from durable state, whatever the backend."""

    on_commit: CommitHook | None

    async def open(self) -> None:
        """Open (creating if needed) the store and start accepting work."""

    async def close(self) -> None:
        """Stop accepting work, commit everything already queued, release resources."""

    def commit(
        self,
        ops: Sequence[Op],
        events: Sequence[bytes] = (),
        audit: Sequence[AuditRecord] = (),
    ) -> asyncio.Future[CommitResult]:
        """Queue ops, event bodies and the audit records of the change as one atomic
        request; the future resolves once durable.

        Raises ``ValueError`` at once for a malformed request, :class:`StoreBusy` when the
        queue is full and :class:`StoreClosed` after ``close()``.
        """
        ...

    @property
    def last_event_index(self) -> int:
        """Index of the newest committed event (0 when none was ever written)."""
        ...

    def get(self, db: str, key: bytes) -> bytes | None:
        """The value of ``key`` in ``db``, or ``None``."""
        ...

    def get_many(self, db: str, keys: Sequence[bytes]) -> list[bytes | None]:
        """The value of each key (``None`` where absent), read in one snapshot."""
        ...

    def scan(
        self,
        db: str,
        prefix: bytes = b"",
        start: bytes | None = None,
        limit: int | None = None,
    ) -> list[tuple[bytes, bytes]]:
        """Pairs of ``db`` whose key starts with ``prefix`` and is ``>= start``, in key order."""
        ...

    def count(self, db: str) -> int:
        """Number of keys in ``db``."""
        ...

    def read_view(self, db: str, key: bytes, fn: Callable[[memoryview], T]) -> T | None:
        """``fn(view of the value)``, or ``None`` when absent; the view must not escape ``fn``."""
        ...

    def events_since(self, after_index: int, limit: int) -> list[tuple[int, bytes]]:
        """Up to ``limit`` committed events with index ``> after_index``, in index order."""
        ...

    def audit_since(
        self, after_seq: int, limit: int, max_bytes: int
    ) -> list[tuple[int, bytes, bytes]]:
        """Audit entries after ``after_seq`` as ``(seq, hash, body)``, bounded by count and bytes."""
        ...

    @property
    def audit_head(self) -> ChainHead:
        """The newest committed audit entry's (seq, hash)."""
        ...

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
        """A serialized ``EventBatch`` of the events after ``after_index`` (up to ``upto``)
        that match ``topics`` and ``keys`` (None: any), read without a copy per event:
        ``(batch, events in it, last index examined)``; see ``nexus_fast.eventlog``."""
        ...

    def first_event_index(self) -> int:
        """Index of the oldest event kept (``last_event_index + 1`` when the log is empty)."""
        ...

    async def prune_events(self, keep_after_index: int) -> int:
        """Delete events with index ``<= keep_after_index``; returns how many were deleted."""
        ...

    def reader_check(self) -> int:
        """Clear reader slots left by dead processes; returns how many (0 if not applicable)."""
        ...

    def size_bytes(self) -> int:
        """Bytes the stored data occupies."""
        ...

    async def backup(self, dest_dir: str | Path, keep: int = 3) -> Path:
        """Write a consistent snapshot under ``dest_dir``; keep the newest ``keep`` of them."""
        ...

    def healthy(self) -> bool:
        """True while the store is open and able to commit."""
        ...

    @property
    def failure(self) -> str | None:
        """Why the last write failed (full, write error, writer dead); None once one succeeds."""
        ...

    def stat(self) -> dict[str, Any]:
        """Figures for ``/health/detailed``."""
        ...
