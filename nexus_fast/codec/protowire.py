"""Protobuf wire format, encoded by hand where a hot path cannot afford a message.

Command transitions are four events per command, and event frames are re-built per
subscriber batch; building a ``pb.Event`` for each costs ~1 us more than joining bytes.
The encodings follow the protobuf wire format (fields in number order, as protobuf
writes them) and the unit tests compare them with protobuf's own output.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from nexus_fast.pb import fabric_pb2 as pb

SMALL_VARINTS: Final = [bytes((i,)) for i in range(0x80)]  # one byte: 0..127

EVENT_PAYLOAD_LIMIT: Final = 1024
"""Command payloads above this size are left out of the record copy an event carries."""


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a base-128 varint."""
    if value < 0x80:
        return SMALL_VARINTS[value]
    if value < 0x4000:
        return bytes(((value & 0x7F) | 0x80, value >> 7))
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def length_delimited(field: int, data: bytes) -> bytes:
    """Field number ``field`` (wire type 2) holding ``data``."""
    return bytes(((field << 3) | 2,)) + varint(len(data)) + data


def event(
    topic: str,
    event_type: str,
    key: str,
    payload: bytes,
    time_ms: int,
    actor: str = "",
    details: Mapping[str, str] | None = None,
) -> bytes:
    """A serialized ``pb.Event`` without ``index`` (the store assigns it on commit).

    ``actor`` names the principal that caused the change ("" = the server itself);
    ``details`` are the extra facts some event types carry (docs/events.md).
    """
    return pb.Event(
        time_ms=time_ms,
        topic=topic,
        type=event_type,
        key=key,
        payload=payload,
        actor=actor,
        details=details,
    ).SerializeToString(deterministic=True)


def actor_field(actor: str) -> bytes:
    """Field 7 (actor) of an event, to append to :meth:`CommandEvents.encode`'s output.

    Empty for the server's own changes (proto3 leaves an empty string out).
    """
    return length_delimited(7, actor.encode()) if actor else b""


# Fields 3 (topic) and 4 (type) of a command event, per state ("command.timed_out", ...).
_COMMAND_HEADS: Final[dict[int, bytes]] = {
    v.number: length_delimited(3, b"command")
    + length_delimited(4, f"command.{v.name.removeprefix('COMMAND_STATE_').lower()}".encode())
    for v in pb.CommandState.DESCRIPTOR.values
    if v.number
}


COMMAND_EVENT_HEADS: Final = _COMMAND_HEADS
"""The topic and type fields of a command event, by state (for ``nexus_fast.commands``)."""


class CommandEvents:
    """Encodes command transition events; keeps the time field of the last millisecond.

    One per command log: a batch of transitions in the same millisecond shares one
    encoding of ``time_ms``.
    """

    __slots__ = ("_last_ms", "_time_field")

    def __init__(self) -> None:
        self._last_ms = 0
        self._time_field = b""  # time_ms 0 is left out, as protobuf does

    def time_field(self, ts_ms: int) -> bytes:
        """Field 2 (time_ms) of an event at ``ts_ms``."""
        if ts_ms != self._last_ms:
            self._time_field = b"\x10" + varint(ts_ms)
            self._last_ms = ts_ms
        return self._time_field

    def encode(
        self, record: pb.CommandRecord, body: bytes, time_field: bytes, actor: bytes = b""
    ) -> bytes:
        """``event("command", "command.<state>", record.id, body, ts, actor)`` byte for byte.

        ``body`` is ``record.SerializeToString()`` (the caller stores it too); a payload
        above :data:`EVENT_PAYLOAD_LIMIT` is left out of the event's copy.
        ``time_field`` is :meth:`time_field` of the event time, and ``actor`` is
        :func:`actor_field` of the acting principal: both encoded once per batch.
        """
        if len(record.spec.payload) > EVENT_PAYLOAD_LIMIT:
            slim = pb.CommandRecord()
            slim.CopyFrom(record)
            slim.spec.payload = b""
            body = slim.SerializeToString()
        key = record.id.encode()
        n_key, n_body = len(key), len(body)
        return b"".join(
            (
                time_field,  # 2: time_ms
                _COMMAND_HEADS[record.state],  # 3: topic, 4: type
                b"\x2a",  # 5: key
                SMALL_VARINTS[n_key] if n_key < 0x80 else varint(n_key),
                key,
                b"\x32",  # 6: payload
                SMALL_VARINTS[n_body] if n_body < 0x80 else varint(n_body),
                body,
                actor,  # 7: actor (b"" for the server's own changes)
            )
        )


def add_node_command(
    message: pb.ControlMessage, record: pb.CommandRecord, payload: bytes | None = None
) -> None:
    """Append the node's view of ``record`` to ``message`` (built in place: no copy).

    ``payload`` replaces the stored one (a payload built at dispatch).
    """
    spec = record.spec
    command = message.commands.add(
        id=record.id,
        kind=spec.kind,
        payload=spec.payload if payload is None else payload,
        attempt=record.attempt,
        deadline_ms=record.dispatched_ms + spec.timeout_ms,
    )
    if record.traceparent:  # the node continues the submission's trace
        command.traceparent = record.traceparent
        command.tracestate = record.tracestate
