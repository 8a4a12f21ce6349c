"""Durable state: the :class:`StateStore` interface and its LMDB implementation."""

from nexus_fast.store.base import (
    CommitHook,
    CommitResult,
    Delete,
    DeleteRange,
    Op,
    Put,
    StateStore,
    StoreBusy,
    StoreClosed,
    StoreError,
    StoreFull,
    StoreLocked,
    StoreReadOnly,
)
from nexus_fast.store.lmdb_store import DATABASES, LmdbStore, event_index, event_key

__all__ = [
    "DATABASES",
    "CommitHook",
    "CommitResult",
    "Delete",
    "DeleteRange",
    "LmdbStore",
    "Op",
    "Put",
    "StateStore",
    "StoreBusy",
    "StoreClosed",
    "StoreError",
    "StoreFull",
    "StoreLocked",
    "StoreReadOnly",
    "event_index",
    "event_key",
]
