"""Command bookkeeping, pure-Python twin of ``_ext/commands.pyx`` (the typed source of truth).

The per-command work every transition repeats, as one hot path:

* the transition table (:data:`TRANSITIONS`, :func:`can_move`): which state may follow
  which (``pending -> placed -> dispatched -> acked -> final``, a retry back to pending);
* :func:`apply_acks`: a node's acks moving its ``DISPATCHED`` records to ``ACKED``;
* :class:`TransitionWriter`: a record's write for the next commit (its put under
  ``c/<id>``, the expiry index ``x/<finished_ms>/<id>`` of a final state) and its
  transition event, encoded by hand exactly as
  :meth:`nexus_fast.codec.protowire.CommandEvents.encode` (byte for byte protobuf's).

The state machine (``core/commands.py``) decides; these apply. Both twins take the same
arguments and give the same results (tests/unit/test_command_kernel.py).
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Final

from nexus_fast.pb import fabric_pb2 as pb

__all__ = ("TRANSITIONS", "TransitionWriter", "apply_acks", "can_move")

PENDING: Final = pb.COMMAND_STATE_PENDING
PLACED: Final = pb.COMMAND_STATE_PLACED
DISPATCHED: Final = pb.COMMAND_STATE_DISPATCHED
ACKED: Final = pb.COMMAND_STATE_ACKED
_FINAL: Final = (
    pb.COMMAND_STATE_SUCCEEDED,
    pb.COMMAND_STATE_FAILED,
    pb.COMMAND_STATE_TIMED_OUT,
    pb.COMMAND_STATE_CANCELLED,
)

TRANSITIONS: Final[frozenset[tuple[int, int]]] = frozenset(
    [
        (PENDING, PENDING),  # still waiting, with a new reason
        (PENDING, PLACED),
        (PLACED, PENDING),  # its node went down before dispatch
        (PLACED, DISPATCHED),
        (DISPATCHED, ACKED),
        (DISPATCHED, PENDING),  # retried after a failed attempt, a timeout or a lost node
        (ACKED, PENDING),
        *((s, f) for s in (PENDING, PLACED, DISPATCHED, ACKED) for f in _FINAL),
    ]
)
"""Every (from, to) move of a command's state; a final state is never left."""

_RECORD: Final = b"c/"
_EXPIRY: Final = b"x/"
_KEY_TAG: Final = b"\x2a"  # Event field 5 (key), length-delimited
_PAYLOAD_TAG: Final = b"\x32"  # Event field 6 (payload), length-delimited
_FINISHED = struct.Struct(">Q")


def can_move(old: int, new: int) -> bool:
    """True when a command in state ``old`` may move to ``new``."""
    return (old, new) in TRANSITIONS


def apply_acks(
    active: Mapping[str, pb.CommandRecord],
    acks: Iterable[pb.CommandAck],
    node_id: str,
    ts_ms: int,
    changed: list[pb.CommandRecord],
) -> int:
    """Move each acked record that is ``DISPATCHED`` on ``node_id`` to ``ACKED`` at ``ts_ms``,
    appending it to ``changed``; returns how many acks were stale (unknown command, another
    node's, or a state past dispatched)."""
    stale = 0
    for ack in acks:
        record = active.get(ack.command_id)
        if record is None or record.node_id != node_id or record.state != DISPATCHED:
            stale += 1
            continue
        record.state = ACKED
        record.updated_ms = ts_ms
        changed.append(record)
    return stale


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class TransitionWriter:
    """Stages command records and their transition events for the next commit.

    ``put`` builds one store op (``Put(db, key, value)``), ``heads`` maps a state to the
    topic and type fields of its event, ``slim`` encodes the event of a record whose
    payload exceeds ``payload_limit`` (the event carries the record without it).
    """

    __slots__ = ("_db", "_final", "_heads", "_limit", "_put", "_slim")

    def __init__(
        self,
        db: str,
        put: Callable[[str, bytes, bytes], Any],
        heads: Mapping[int, bytes],
        final_states: Iterable[int],
        payload_limit: int,
        slim: Callable[[pb.CommandRecord, bytes, bytes, bytes], bytes],
    ) -> None:
        self._db = db
        self._put = put
        self._heads = dict(heads)
        self._final = frozenset(final_states)
        self._limit = payload_limit
        self._slim = slim

    def stage(
        self,
        records: Sequence[pb.CommandRecord],
        ops: list[Any],
        events: list[bytes],
        final: list[pb.CommandRecord],
        time_field: bytes,
        actor: bytes,
        index: dict[bytes, int] | None = None,
    ) -> None:
        """Append each record's put(s) to ``ops``, its event to ``events`` and, when its
        state is final, the record to ``final``. ``time_field`` and ``actor`` are the
        event's encoded time and actor fields (``CommandEvents.time_field``,
        ``actor_field``).

        With ``index`` (record key -> position in ``ops``, kept by the caller for as long
        as ``ops`` is), a record already staged in ``ops`` has its put replaced in place
        instead of a second one appended: one commit writes a record once, in its last
        state (every transition's event is still appended)."""
        db, put, heads, limit = self._db, self._put, self._heads, self._limit
        for record in records:
            body = record.SerializeToString()
            rid = record.id.encode()
            key = _RECORD + rid
            at = None if index is None else index.get(key)
            if at is None:
                if index is not None:
                    index[key] = len(ops)
                ops.append(put(db, key, body))
            else:
                ops[at] = put(db, key, body)
            state = record.state
            if state in self._final:
                ops.append(put(db, _EXPIRY + _FINISHED.pack(record.finished_ms) + b"/" + rid, b""))
                final.append(record)
            if len(record.spec.payload) > limit:
                events.append(self._slim(record, body, time_field, actor))
                continue
            events.append(
                b"".join(
                    (
                        time_field,
                        heads[state],
                        _KEY_TAG,
                        _varint(len(rid)),
                        rid,
                        _PAYLOAD_TAG,
                        _varint(len(body)),
                        body,
                        actor,
                    )
                )
            )
