"""Who waits for which command to reach a final state (``WaitCommands``)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from nexus_fast.core.command_states import FINAL_STATES
from nexus_fast.errors import Unavailable
from nexus_fast.pb import fabric_pb2 as pb

__all__ = ["CommandWaiters"]

# What an inbox receives: a final record, or None when the server stops.
_Inbox = asyncio.Queue[pb.CommandRecord | None]


class CommandWaiters:
    """Inboxes by command id; :meth:`notify` feeds them, :meth:`stop` ends them all."""

    def __init__(self) -> None:
        self._by_id: dict[str, list[_Inbox]] = {}
        self._stopping = False

    def __len__(self) -> int:
        """How many command ids someone waits for."""
        return len(self._by_id)

    def notify(self, record: pb.CommandRecord) -> None:
        """``record`` is final and durable: hand it to everyone waiting for it."""
        for inbox in self._by_id.pop(record.id, ()):
            inbox.put_nowait(record)

    def stop(self) -> None:
        """End every wait with Unavailable, and refuse new ones.

        A WaitCommands without a timeout would otherwise hold the gRPC stop for the whole
        drain deadline: nothing it waits for finishes any more.
        """
        self._stopping = True
        ended: set[int] = set()
        for inboxes in self._by_id.values():
            for inbox in inboxes:
                if id(inbox) not in ended:
                    ended.add(id(inbox))
                    inbox.put_nowait(None)

    def check_open(self) -> None:
        """Raise Unavailable if the server is stopping."""
        if self._stopping:
            raise Unavailable("server stopping")

    async def wait(
        self,
        records: Sequence[pb.CommandRecord],
        timeout: float | None,
        not_durable: frozenset[str] = frozenset(),
    ) -> AsyncIterator[pb.CommandRecord]:
        """Yield each of ``records`` once final (final ones at once), until ``timeout``.

        ``not_durable``: ids whose final state is not on disk yet; they are waited for
        (``notify`` comes when their write is durable).
        If ``timeout`` expires first, the last record yielded is a marker: empty id,
        ``wait_timed_out_ids`` listing the ids (in request order) that were not final.
        """
        inbox: _Inbox = asyncio.Queue()
        final_now: list[pb.CommandRecord] = []
        waiting: list[pb.CommandRecord] = []
        for record in records:
            if record.state in FINAL_STATES and record.id not in not_durable:
                final_now.append(record)
            else:
                self._by_id.setdefault(record.id, []).append(inbox)
                waiting.append(record)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            # The final ones at once, whatever the timeout. Decided above, not while
            # yielding: one that finishes meanwhile comes through the inbox, once.
            for record in final_now:
                yield record
            done: set[str] = set()
            while len(done) < len(waiting):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                try:
                    finished = await asyncio.wait_for(inbox.get(), left)
                except TimeoutError:
                    break
                if finished is None:
                    raise Unavailable("server stopping")
                done.add(finished.id)
                yield finished
            if len(done) < len(waiting):
                # Not yielded yet, even if final by now: the client never saw them final.
                late = [r.id for r in waiting if r.id not in done]
                yield pb.CommandRecord(wait_timed_out_ids=late)
        finally:
            for record in records:
                queues = self._by_id.get(record.id)
                if queues and inbox in queues:
                    queues.remove(inbox)
                    if not queues:
                        del self._by_id[record.id]
