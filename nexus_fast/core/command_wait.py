"""``WaitCommands``: stream each command's record once it is final, within a timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence

from nexus_fast.core.command_states import FINAL_STATES
from nexus_fast.pb import fabric_pb2 as pb

__all__ = ["CommandWaiters"]


class CommandWaiters:
    """The waits in progress, by command id; the state machine calls :meth:`finished`."""

    __slots__ = ("_inboxes",)

    def __init__(self) -> None:
        self._inboxes: dict[str, list[asyncio.Queue[pb.CommandRecord]]] = {}

    def __len__(self) -> int:
        return len(self._inboxes)

    def finished(self, record: pb.CommandRecord) -> None:
        """``record`` reached a final state: hand it to everyone waiting for it."""
        for inbox in self._inboxes.pop(record.id, ()):
            inbox.put_nowait(record)

    async def wait(
        self, records: Sequence[pb.CommandRecord], timeout: float | None
    ) -> AsyncIterator[pb.CommandRecord]:
        """Yield each record once it is final (final ones at once).

        If ``timeout`` expires first, the last record yielded is a marker: empty id,
        ``wait_timed_out_ids`` listing the ids (in request order) that were not final.
        """
        inbox: asyncio.Queue[pb.CommandRecord] = asyncio.Queue()
        final_now: list[pb.CommandRecord] = []
        waiting: list[pb.CommandRecord] = []
        for record in records:
            if record.state in FINAL_STATES:
                final_now.append(record)
            else:
                self._inboxes.setdefault(record.id, []).append(inbox)
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
                    record = await asyncio.wait_for(inbox.get(), left)
                except TimeoutError:
                    break
                done.add(record.id)
                yield record
            if len(done) < len(waiting):
                # Not yielded yet, even if final by now: the client never saw them final.
                late = [r.id for r in waiting if r.id not in done]
                yield pb.CommandRecord(wait_timed_out_ids=late)
        finally:
            for record in waiting:
                queues = self._inboxes.get(record.id)
                if queues and inbox in queues:
                    queues.remove(inbox)
                    if not queues:
                        del self._inboxes[record.id]
