"""Reads of a store that keeps its state in a local :class:`LmdbStore`, delegated to it.

:class:`~nexus_fast.store.replicated.ReplicatedStore` (cluster mode) writes through the
etcd log but reads, hooks and local maintenance (event retention, backups) are exactly the
local store's: this mixin forwards them so the replicated store satisfies
:class:`~nexus_fast.store.base.StateStore` without restating each one there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from nexus_fast.store.audit_chain import ChainHead
from nexus_fast.store.base import CommitHook, EventFallback

if TYPE_CHECKING:
    from nexus_fast.store.lmdb_store import LmdbStore

T = TypeVar("T")


class LocalReads:
    """The read half of the StateStore protocol, answered by ``self.local``."""

    local: LmdbStore

    @property
    def on_commit(self) -> CommitHook | None:
        """The local store's commit hook (event bus): fires for every applied entry."""
        return self.local.on_commit

    @on_commit.setter
    def on_commit(self, hook: CommitHook | None) -> None:
        self.local.on_commit = hook

    @property
    def on_failure(self) -> Callable[[str | None], None] | None:
        """The local store's failure hook."""
        return self.local.on_failure

    @on_failure.setter
    def on_failure(self, hook: Callable[[str | None], None] | None) -> None:
        self.local.on_failure = hook

    @property
    def last_event_index(self) -> int:
        return self.local.last_event_index

    def get(self, db: str, key: bytes) -> bytes | None:
        return self.local.get(db, key)

    def get_many(self, db: str, keys: Sequence[bytes]) -> list[bytes | None]:
        return self.local.get_many(db, keys)

    def scan(
        self, db: str, prefix: bytes = b"", start: bytes | None = None, limit: int | None = None
    ) -> list[tuple[bytes, bytes]]:
        return self.local.scan(db, prefix, start, limit)

    def count(self, db: str) -> int:
        return self.local.count(db)

    def read_view(self, db: str, key: bytes, fn: Callable[[memoryview], T]) -> T | None:
        return self.local.read_view(db, key, fn)

    def events_since(self, after_index: int, limit: int) -> list[tuple[int, bytes]]:
        return self.local.events_since(after_index, limit)

    def audit_since(
        self, after_seq: int, limit: int, max_bytes: int
    ) -> list[tuple[int, bytes, bytes]]:
        return self.local.audit_since(after_seq, limit, max_bytes)

    @property
    def audit_head(self) -> ChainHead:
        return self.local.audit_head

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
        return self.local.event_batch(
            after_index, upto, max_events, max_bytes, scan_limit, topics, keys, fallback
        )

    def first_event_index(self) -> int:
        return self.local.first_event_index()

    async def prune_events(self, keep_after_index: int) -> int:
        """Local retention: events are pruned on each replica by its own server."""
        return await self.local.prune_events(keep_after_index)

    def reader_check(self) -> int:
        return self.local.reader_check()

    def size_bytes(self) -> int:
        return self.local.size_bytes()

    async def backup(self, dest_dir: str | Path, keep: int = 3) -> Path:
        return await self.local.backup(dest_dir, keep)
