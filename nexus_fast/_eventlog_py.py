"""Stored events read from their bytes: pure-Python twin of ``_ext/eventlog.pyx``.

The typed source of truth for the compiled twin (``nexus_fast._eventlog_c``). Two jobs:

* :func:`event_head`: the fields the event bus needs of a serialized ``pb.Event`` (whether
  it carries an index, ``time_ms``, ``topic``, ``type``, ``key``), read by walking the
  protobuf wire format instead of building a message. The walk checks the whole body's
  structure (tags, field numbers, varints, lengths within the body, the wire type of
  every ``Event`` field, the ``details`` map entries) and that every string is UTF-8, as
  protobuf's parser does; anything else is a :class:`MalformedEvent` (the bus logs it and
  publishes ``system.corrupt`` instead). What it accepts, protobuf parses: a catch-up
  batch never carries an event a client could not decode.
* :func:`collect_batch`: one catch-up step of a subscriber reading the durable event log.
  It walks an LMDB cursor of ``(key, value)`` pairs (``Cursor.iternext()`` of a
  ``buffers=True`` read txn: zero-copy views into the map) and joins the matching events
  into one serialized ``EventBatch``: each stored body goes into the frame as it lies in
  the map, behind its field header and its index (the store writes bodies without one),
  with no per-event Python object of ours and no copy but the one into the frame. Bodies
  that cannot be framed that way (malformed, or carrying an index of their own) go
  through ``fallback`` (the bus's envelope of the event), so the bytes are the ones a
  subscriber reading from the ring gets.

The views are only valid inside the read txn: :func:`collect_batch` returns ``bytes`` built
before the txn ends and never keeps a view.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Protocol, TypeAlias

if TYPE_CHECKING:
    import lmdb

__all__ = ("EventCursor", "Framed", "MalformedEvent", "collect_batch", "event_head")

_INT64_SIGN = 1 << 63
_MAX_FIELD = (1 << 29) - 1  # protobuf's largest field number
_UINT64 = 1 << 64
_ASCII = frozenset(range(0x80))

# Field number -> the wire type the Event message declares for it.
_FIELD_WIRE_TYPES = {1: 0, 2: 0, 3: 2, 4: 2, 5: 2, 6: 2, 7: 2, 8: 2}


class MalformedEvent(ValueError):
    """The bytes are not a well-formed serialized ``pb.Event``."""


class Framed(Protocol):
    """What ``fallback`` returns: the bus's envelope of an event (topic, key, field bytes)."""

    @property
    def topic(self) -> str: ...

    @property
    def key(self) -> str: ...

    @property
    def pb_field(self) -> bytes: ...


# A py-lmdb cursor over the ``events`` database, in a ``buffers=True`` read txn.
EventCursor: TypeAlias = "lmdb.Cursor[memoryview]"


Head = tuple[bool, int, str, str, str]


def _varint(buf: bytes | memoryview, pos: int, end: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; at most 10 bytes, inside ``end``."""
    value = 0
    shift = 0
    while True:
        if pos >= end or shift >= 70:
            raise MalformedEvent("truncated or overlong varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & (_UINT64 - 1), pos
        shift += 7


def _text(buf: bytes | memoryview, start: int, end: int) -> str:
    try:
        return bytes(buf[start:end]).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedEvent("a string field is not UTF-8") from None


def _field(body: bytes | memoryview, pos: int, end: int) -> tuple[int, int, int]:
    """(field number, wire type, position after the tag) of the tag at ``pos``."""
    tag, pos = _varint(body, pos, end)
    field = tag >> 3
    if field == 0 or field > _MAX_FIELD:
        raise MalformedEvent(f"field number {field}")
    return field, tag & 7, pos


def _skip(body: bytes | memoryview, pos: int, end: int, wire: int) -> tuple[int, int]:
    """Past the value of wire type ``wire`` at ``pos``: (its start or varint value, next)."""
    if wire == 0:
        return _varint(body, pos, end)
    if wire == 2:
        size, pos = _varint(body, pos, end)
        if size > end - pos:
            raise MalformedEvent("length beyond the body")
        return pos, pos + size
    if wire == 1 or wire == 5:
        after = pos + (8 if wire == 1 else 4)
        if after > end:
            raise MalformedEvent("truncated fixed-width field")
        return pos, after
    raise MalformedEvent(f"wire type {wire}")


def _check_entry(body: bytes | memoryview, pos: int, end: int) -> None:
    """A ``details`` map entry: its key (1) and value (2) are UTF-8 strings."""
    while pos < end:
        field, wire, pos = _field(body, pos, end)
        if field <= 2 and wire != 2:
            raise MalformedEvent(f"details entry field {field} has wire type {wire}")
        start, pos = _skip(body, pos, end, wire)
        if field <= 2:
            _text(body, start, pos)


def event_head(body: bytes | memoryview) -> Head:
    """``(has_index, time_ms, topic, type, key)`` of a serialized ``pb.Event``.

    As protobuf reads it: a repeated field's last value wins, unknown fields are skipped,
    and every occurrence of a string field must be UTF-8 (the ``details`` entries too).
    ``has_index`` is True when field 1 is present at all. Raises :class:`MalformedEvent`.
    """
    end = len(body)
    pos = 0
    has_index = False
    time_ms = 0
    texts = ["", "", ""]  # topic, type, key
    while pos < end:
        field, wire, pos = _field(body, pos, end)
        want = _FIELD_WIRE_TYPES.get(field)
        if want is not None and wire != want:
            raise MalformedEvent(f"field {field} has wire type {wire}")
        value, pos = _skip(body, pos, end, wire)
        if field == 1:
            has_index = True
        elif field == 2:
            time_ms = value - _UINT64 if value >= _INT64_SIGN else value
        elif 3 <= field <= 5:
            texts[field - 3] = _text(body, value, pos)
        elif field == 7:
            _text(body, value, pos)
        elif field == 8:
            _check_entry(body, value, pos)
    return has_index, time_ms, texts[0], texts[1], texts[2]


def _head_field(index: int, body_len: int) -> bytes:
    """``EventBatch.events`` field header + ``Event.index`` field of a stored body."""
    index_field = b"\x08" + _encode_varint(index)
    return b"\x0a" + _encode_varint(len(index_field) + body_len) + index_field


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def collect_batch(
    cursor: EventCursor,
    after: int,
    upto: int,
    max_events: int,
    max_bytes: int,
    scan_limit: int,
    topics: frozenset[str] | None,
    keys: frozenset[str] | None,
    fallback: Callable[[int, bytes], Framed],
) -> tuple[bytes, int, int]:
    """One serialized ``EventBatch`` of the matching events after index ``after``.

    ``cursor`` walks the ``events`` database (keys: 8-byte big-endian indices), in a
    ``buffers=True`` read txn that stays open until this returns. The walk stops at the first index that does not follow the previous one (the
    first must be ``after + 1``), past ``upto``, after examining ``scan_limit`` events,
    once ``max_events`` matched, or before an event that would take the batch over
    ``max_bytes`` (the first always goes in). Returns ``(batch bytes, events in it, last
    index examined)``; the last index is ``after`` when nothing was examined. An event
    matches when ``topics`` (None: any) holds its topic and ``keys`` (None: any) its key.
    """
    if after < 0:
        raise ValueError("after must be >= 0")
    if not cursor.set_range((after + 1).to_bytes(8, "big")):
        return b"", 0, after
    return _walk(
        cursor.iternext(keys=True, values=True),
        after,
        upto,
        max_events,
        max_bytes,
        scan_limit,
        topics,
        keys,
        fallback,
    )


def _walk(
    items: Iterable[tuple[bytes | memoryview, bytes | memoryview]],
    after: int,
    upto: int,
    max_events: int,
    max_bytes: int,
    scan_limit: int,
    topics: frozenset[str] | None,
    keys: frozenset[str] | None,
    fallback: Callable[[int, bytes], Framed],
) -> tuple[bytes, int, int]:
    parts: list[bytes | memoryview] = []
    count = 0
    size = 0
    examined = after
    expected = after + 1
    for scanned, (key_bytes, value) in enumerate(items):
        index = int.from_bytes(key_bytes, "big") if len(key_bytes) == 8 else 0
        if index != expected or index > upto or scanned >= scan_limit or count >= max_events:
            break
        framed: Framed | None = None
        try:
            has_index, _, topic, _, event_key = event_head(value)
        except MalformedEvent:
            has_index = True  # framed by the fallback (as system.corrupt)
        if has_index:
            framed = fallback(index, bytes(value))
            topic, event_key = framed.topic, framed.key
        if (topics is None or topic in topics) and (keys is None or event_key in keys):
            if framed is not None:
                field = framed.pb_field
                cost = len(field)
            else:
                field = _head_field(index, len(value))
                cost = len(field) + len(value)
            if count and size + cost > max_bytes:
                break
            parts.append(field)
            if framed is None:
                parts.append(value)
            size += cost
            count += 1
        examined = index
        expected = index + 1
    return b"".join(parts), count, examined
