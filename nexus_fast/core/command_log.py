"""The command log: command records in the store, written in group commits.

Records live in the ``commands`` database under ``c/<id>``; finished ones are indexed under
``x/<finished_ms>/<id>`` and dropped after ``final_retention``, which is also how long an
idempotency key is remembered. Every write carries the transition event (encoded by
:class:`~nexus_fast.codec.protowire.CommandEvents`) in the same txn.

Writes are staged and committed together: :meth:`CommandLog.save` commits now (and
returns the commit's future), :meth:`CommandLog.save_later` coalesces everything staged
in one loop iteration into one store request. The store's single writer applies requests
in order, so the last state written wins.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable, Sequence
from typing import Final

from nexus_fast import errors
from nexus_fast.clock import now_ms
from nexus_fast.codec.protowire import (
    COMMAND_EVENT_HEADS,
    EVENT_PAYLOAD_LIMIT,
    CommandEvents,
    actor_field,
)
from nexus_fast.commands import TransitionWriter
from nexus_fast.core import acting
from nexus_fast.core.command_states import FINAL_STATES
from nexus_fast.logs import get_logger
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store.audit_chain import AuditRecord
from nexus_fast.store.base import CommitResult, Delete, Put, StateStore

__all__ = ["COMMANDS_DB", "CommandLog"]

log = get_logger("commands")

COMMANDS_DB: Final = "commands"
_RECORD: Final = b"c/"
_EXPIRY: Final = b"x/"


class CommandLog:
    """Reads and group-committed writes of command records; on the event loop only."""

    def __init__(self, store: StateStore) -> None:
        self._store = store
        # Finished, but the write of the final state is not durable yet: reads must see this
        # record, not the older state still in the store (a wait() would miss its end).
        self.finishing: dict[str, pb.CommandRecord] = {}
        self._writes: set[asyncio.Future[CommitResult]] = set()
        # Writes staged for the next commit (see save_later).
        self._ops: list[Put | Delete] = []
        # Record key -> its put's position in _ops: a record staged again before the commit
        # (e.g. acked and succeeded in one node message) is written once, in its last state.
        # The commit is one txn either way, so what a crash can leave is unchanged; each
        # transition keeps its event.
        self._staged: dict[bytes, int] = {}
        self._events: list[bytes] = []
        self._final: list[pb.CommandRecord] = []
        self._flush_handle: asyncio.Handle | None = None
        # Set by halt() (a deposed cluster leader): writes fail quietly from then on.
        self._halted = False
        # Told of each final record once its write is durable (WaitCommands answers then).
        self.on_durable: Callable[[pb.CommandRecord], None] | None = None
        self._encoder = CommandEvents()
        self._writer = TransitionWriter(
            COMMANDS_DB,
            Put,
            COMMAND_EVENT_HEADS,
            FINAL_STATES,
            EVENT_PAYLOAD_LIMIT,
            self._encoder.encode,  # events of records with a large payload (left out)
        )

    # ------------------------------------------------------------ reads

    def load(self) -> list[pb.CommandRecord]:
        """Every stored record that is not final (start-up)."""
        records = []
        for _, value in self._store.scan(COMMANDS_DB, prefix=_RECORD):
            record = pb.CommandRecord.FromString(value)
            if record.state not in FINAL_STATES:
                records.append(record)
        return records

    def read(self, command_id: str) -> pb.CommandRecord | None:
        """The stored record (a finishing one first), or None."""
        record = self.finishing.get(command_id)
        if record is not None:
            return record
        stored = self._store.get(COMMANDS_DB, _RECORD + command_id.encode())
        return None if stored is None else pb.CommandRecord.FromString(stored)

    def read_many(self, ids: Sequence[str]) -> list[pb.CommandRecord | None]:
        """Stored records of ``ids`` in one read txn (finishing ones are not consulted)."""
        values = self._store.get_many(COMMANDS_DB, [_RECORD + i.encode() for i in ids])
        return [None if v is None else pb.CommandRecord.FromString(v) for v in values]

    def scan(self, after: str | None, limit: int) -> list[tuple[str, bytes]]:
        """Up to ``limit`` (id, stored record) pairs in id order, after id ``after``."""
        start = None if after is None else _RECORD + after.encode() + b"\x00"
        pairs = self._store.scan(COMMANDS_DB, prefix=_RECORD, start=start, limit=limit)
        return [(key[len(_RECORD) :].decode(), value) for key, value in pairs]

    # ------------------------------------------------------------ writes

    def stage(self, records: Sequence[pb.CommandRecord], actor: str = "") -> None:
        """Snapshot records (and their transition events) into the next commit.

        ``actor`` names who caused these transitions ("" = the server itself). The
        writes themselves are the compiled bookkeeping's (``nexus_fast.commands``).
        """
        self._writer.stage(
            records,
            self._ops,
            self._events,
            self._final,
            self._encoder.time_field(now_ms()),
            actor_field(actor) if actor else b"",
            self._staged,
        )

    def save(
        self, records: Sequence[pb.CommandRecord], actor: str = ""
    ) -> asyncio.Future[CommitResult]:
        """Commit records now (with everything staged before them: order is kept)."""
        self.stage(records, actor)
        return self._flush(acting.records(lambda: acting.ids_target("commands", records)))

    def save_later(self, records: Sequence[pb.CommandRecord]) -> None:
        """Commit without waiting, coalesced: one store request per loop iteration."""
        self.stage(records)
        if self._flush_handle is None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush)

    async def flush(self) -> None:
        """Commit the staged writes now and wait until every write so far is durable."""
        if self._ops or self._events:
            self._flush()
        if self._writes:
            await asyncio.gather(*self._writes, return_exceptions=True)

    async def prune_finished(self, horizon_ms: int, limit: int) -> int:
        """Drop up to ``limit`` records finished before ``horizon_ms``; returns how many."""
        expired = self._store.scan(COMMANDS_DB, prefix=_EXPIRY, start=_EXPIRY, limit=limit)
        ops: list[Put | Delete] = []
        for key, _ in expired:
            (finished,) = struct.unpack(">Q", key[2:10])
            if finished > horizon_ms:
                break
            ops.append(Delete(COMMANDS_DB, key))
            ops.append(Delete(COMMANDS_DB, _RECORD + key[11:]))
        if ops:
            await self._store.commit(ops)
        return len(ops) // 2

    def _flush(self, audit: tuple[AuditRecord, ...] = ()) -> asyncio.Future[CommitResult]:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        ops, events, final = self._ops, self._events, self._final
        self._ops, self._events, self._final = [], [], []
        self._staged = {}
        try:
            future = self._store.commit(ops, events, audit)
        except errors.Unavailable as exc:
            # A store may refuse a request synchronously (StoreBusy, StoreClosed, NotLeader
            # after a demotion): that is a failed write like any other, never a traceback
            # out of the loop callback this may run in.
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
        self._writes.add(future)
        future.add_done_callback(self._write_done)
        if final:
            future.add_done_callback(lambda done: self._durable(final, done))
        return future

    def _durable(
        self, records: Sequence[pb.CommandRecord], done: asyncio.Future[CommitResult]
    ) -> None:
        """The final state of ``records`` is in the store (or its write failed): reads go
        to the store again, and (written) ``on_durable`` hears of each."""
        finishing = self.finishing
        for record in records:
            if finishing.get(record.id) is record:
                del finishing[record.id]
        hook = self.on_durable
        if hook is not None and not done.cancelled() and done.exception() is None:
            for record in records:
                hook(record)

    def halt(self) -> None:
        """Stop writing: this process no longer owns the store (a deposed cluster leader
        about to re-exec). Staged and later writes fail without a log line each."""
        self._halted = True
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        self._ops, self._events, self._final, self._staged = [], [], [], {}

    def _write_done(self, future: asyncio.Future[CommitResult]) -> None:
        self._writes.discard(future)
        if not future.cancelled() and future.exception() is not None and not self._halted:
            log.error("command state write failed", extra={"err": str(future.exception())})


def _committed(future: asyncio.Future[CommitResult]) -> bool:
    return not future.cancelled() and future.exception() is None
