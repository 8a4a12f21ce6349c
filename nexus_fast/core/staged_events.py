"""Events persisted without anyone waiting: ``node.connected`` / ``node.disconnected``.

A stream opening or dropping changes nothing durable (``Node.connected`` is memory-only),
but clients want to see it in the event log. Nobody should wait on that write, and a
reconnect storm (thousands of streams in a second) must not become one store request per
node: :class:`StagedEvents` collects the events of one loop iteration and hands them to
the store as one request, which the writer's group commit then merges further.
"""

from __future__ import annotations

import asyncio

from nexus_fast.logs import get_logger
from nexus_fast.store.base import CommitResult, StateStore, StoreError

__all__ = ["StagedEvents"]

log = get_logger("nodes")


class StagedEvents:
    """Commit encoded events without waiting, coalesced: one store request per loop turn."""

    __slots__ = ("_events", "_handle", "_store")

    def __init__(self, store: StateStore) -> None:
        self._store = store
        self._events: list[bytes] = []
        self._handle: asyncio.Handle | None = None

    def add(self, body: bytes) -> None:
        """Stage one encoded event; it is committed after the current loop iteration."""
        self._events.append(body)
        if self._handle is None:
            self._handle = asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Hand the staged events to the store now (as one request)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        events, self._events = self._events, []
        if not events:
            return
        try:
            future = self._store.commit((), events)
        except (StoreError, ValueError) as exc:
            # Informational events: a full or closing store drops them, it does not fail
            # the stream that caused them.
            log.warning("connection events not saved", extra={"err": str(exc), "n": len(events)})
            return
        future.add_done_callback(_done)


def _done(future: asyncio.Future[CommitResult]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("connection events not saved", extra={"err": str(future.exception())})
