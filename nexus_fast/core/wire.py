"""Protobuf wire-format pieces, encoded by hand where a hot path cannot afford a message.

Events are built (``core/commands.py``) and re-framed (``core/events.py``) per transition
and per subscriber; building a ``pb.Event`` for that costs ~1 us more than joining bytes.
The encodings follow the protobuf wire format, and the tests compare them with protobuf's
own output.
"""

from __future__ import annotations

from typing import Final

SMALL_VARINTS: Final = [bytes((i,)) for i in range(0x80)]  # one byte: 0..127


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
