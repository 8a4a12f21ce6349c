"""Committed events and the frames they travel in (gRPC ``EventBatch``, WebSocket JSON).

The bus turns each committed body into an :class:`EventEnvelope` once (:func:`decode_event`)
and shares it with every subscriber. Each wire encoding is made lazily, once per event:
:attr:`EventEnvelope.json` (orjson, for WebSocket) and :attr:`EventEnvelope.pb_field`
(the ``EventBatch.events`` field record, so a gRPC batch is a ``b"".join``).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import orjson
from google.protobuf.message import DecodeError

from nexus_fast.codec.json import payload_json
from nexus_fast.codec.protowire import varint
from nexus_fast.eventlog import MalformedEvent, event_head
from nexus_fast.logs import get_logger
from nexus_fast.pb import fabric_pb2 as pb

__all__ = [
    "SYSTEM_ACTOR",
    "EventEnvelope",
    "batch_bytes",
    "bookmark_bytes",
    "decode_event",
    "json_frames",
]

log = get_logger("events")

SYSTEM_ACTOR = "system"
"""The JSON view's ``actor`` of events the server caused itself (empty in protobuf)."""

_CORRUPT = pb.Event(topic="system", type="system.corrupt").SerializeToString()


class EventEnvelope:
    """One committed event, decoded once; immutable, shared by every subscriber.

    ``body`` is the serialized ``pb.Event`` WITH ``index`` set. ``json`` and ``pb_field``
    are encoded on first use and cached, so each wire format costs one encode per event.
    Raises ``DecodeError`` for a body that is not an event (see :func:`decode_event`).
    """

    __slots__ = (
        "_has_index",
        "_json",
        "_pb_field",
        "_stored",
        "index",
        "key",
        "time_ms",
        "topic",
        "type",
    )

    def __init__(self, index: int, stored_body: bytes) -> None:
        # The few fields the bus needs, read from the wire bytes (nexus_fast.eventlog,
        # compiled): ~10 times cheaper than building a pb.Event, once per published event.
        try:
            has_index, self.time_ms, self.topic, self.type, self.key = event_head(stored_body)
        except MalformedEvent as exc:
            raise DecodeError(str(exc)) from None
        self.index = index
        self._has_index = has_index
        if has_index:  # not how the store writes them, but be exact anyway
            event = pb.Event.FromString(stored_body)
            event.index = index
            stored_body = event.SerializeToString()
        self._stored = stored_body
        self._json: bytes | None = None
        self._pb_field: bytes | None = None

    @property
    def body(self) -> bytes:
        """The serialized ``pb.Event`` with ``index`` set."""
        if self._has_index:
            return self._stored
        # The stored body leaves index unset; a leading field 1 sets it without re-encoding.
        return b"\x08" + varint(self.index) + self._stored

    @property
    def json(self) -> bytes:
        """``{"index","time_ms","topic","type","key","actor","payload"}`` as orjson bytes
        (cached), plus ``"details"`` when the event has any.

        ``actor`` is ``"system"`` for the server's own changes (empty in protobuf).
        """
        data = self._json
        if data is None:
            # Decoded again here rather than kept: the ring holds one copy of each payload.
            try:
                event = pb.Event.FromString(self._stored)
            except DecodeError:  # the head was readable, a later field is not
                log.error("undecodable event body in the log", extra={"index": self.index})
                event = pb.Event()
            view: dict[str, object] = {
                "index": self.index,
                "time_ms": self.time_ms,
                "topic": self.topic,
                "type": self.type,
                "key": self.key,
                "actor": event.actor or SYSTEM_ACTOR,
                "payload": payload_json(self.topic, event.payload),
            }
            if event.details:
                view["details"] = dict(event.details)
            data = self._json = orjson.dumps(view)
        return data

    @property
    def pb_field(self) -> bytes:
        """This event as one ``EventBatch.events`` field record (tag, length, body)."""
        data = self._pb_field
        if data is None:
            body = self.body
            data = self._pb_field = b"\x0a" + varint(len(body)) + body
        return data

    def event(self) -> pb.Event:
        """A fresh ``pb.Event`` (tests, tools; not used on the fan-out path)."""
        return pb.Event.FromString(self.body)

    def __repr__(self) -> str:
        return f"<EventEnvelope {self.index} {self.type} {self.key!r}>"


def decode_event(index: int, stored_body: bytes) -> EventEnvelope:
    """The envelope of a committed event; a corrupt body becomes ``system.corrupt``.

    A corrupt body is logged, not raised: the index stays taken and the stream gap-free.
    """
    try:
        return EventEnvelope(index, stored_body)
    except DecodeError:
        log.error("undecodable event body in the log", extra={"index": index})
        return EventEnvelope(index, _CORRUPT)


def bookmark_bytes(index: int) -> bytes:
    """A serialized ``EventBatch`` with no events and ``bookmark_index = index``."""
    return b"\x10" + varint(index) if index else b""


def batch_bytes(events: Iterable[EventEnvelope]) -> bytes:
    """A serialized ``EventBatch`` holding ``events``: their cached field records joined."""
    return b"".join([e.pb_field for e in events])


def json_frames(events: Sequence[EventEnvelope], max_bytes: int) -> list[tuple[int, int, bytes]]:
    """``events`` split into WebSocket frame bodies: ``(start, end, body)`` per frame.

    ``body`` is the cached JSON of ``events[start:end]`` joined with commas; a frame holds
    at most ``max_bytes`` of it (one event more than that goes alone). Uncached: see
    ``Subscription.json_frames`` for the version shared between subscriptions.
    """
    frames: list[tuple[int, int, bytes]] = []
    start = 0
    size = 0
    for i, event in enumerate(events):
        n = len(event.json) + 1
        if size + n > max_bytes and i > start:
            frames.append((start, i, b",".join([e.json for e in events[start:i]])))
            start, size = i, 0
        size += n
    if events:
        frames.append((start, len(events), b",".join([e.json for e in events[start:]])))
    return frames
