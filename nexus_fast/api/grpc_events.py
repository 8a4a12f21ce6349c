"""gRPC adapter for the event bus: ``ControlService.WatchEvents``.

Each response is an ``EventBatch`` of up to :data:`MAX_BATCH_EVENTS` events (batch on the
wire: per-message cost dominates in Python gRPC) built by joining the events' cached
field records, so a batch costs one ``b"".join`` and no protobuf work per subscriber. A
watcher catching up on events older than the ring gets batches read zero-copy from the
durable log (``Subscription.read_stored``): stored bodies framed as they lie in LMDB.
That needs the method registered with a serializer that passes bytes through:
:func:`add_control_service` registers ``ControlService`` exactly like the generated
``add_ControlServiceServicer_to_server`` but with such a serializer for ``WatchEvents``.

Statuses: ``INVALID_ARGUMENT`` (unknown topic, bad key, index ahead of the log),
``OUT_OF_RANGE`` when ``after_index`` is older than retention (message names the oldest
index; trailer ``nexus-oldest-index``), ``RESOURCE_EXHAUSTED`` for a slow consumer
("slow consumer; resume after index N"; trailer ``nexus-resume-after-index``),
``UNAVAILABLE`` when the server shuts down: the handler raises the core errors and
``grpc_api.instrumented`` maps them through the one table (``nexus_fast.api.status``).
"""

from __future__ import annotations

import asyncio
from typing import Any, Final

import grpc

from nexus_fast.api.grpc_handlers import register
from nexus_fast.api.grpc_stuck import watch as stuck_writes
from nexus_fast.api.status import OLDEST_INDEX_TRAILER, RESUME_AFTER_TRAILER
from nexus_fast.codec.frames import batch_bytes, bookmark_bytes
from nexus_fast.core.events import EventBus, Subscription
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc
from nexus_fast.telemetry import metrics

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_BATCH_EVENTS",
    "OLDEST_INDEX_TRAILER",
    "RESUME_AFTER_TRAILER",
    "add_control_service",
    "serialize_event_batch",
    "watch_events",
]

MAX_BATCH_EVENTS: Final = 500
"""Most events in one EventBatch message."""
MAX_BATCH_BYTES: Final = 1 << 20
"""Soft cap on one EventBatch (1 MiB, well under the default 4 MiB client limit)."""
_METHOD: Final = "WatchEvents"


def serialize_event_batch(message: bytes | pb.EventBatch) -> bytes:
    """Response serializer for WatchEvents: pre-encoded bytes pass through untouched."""
    if type(message) is bytes:
        return message
    return message.SerializeToString()  # type: ignore[union-attr]


def add_control_service(servicer: pb_grpc.ControlServiceServicer, server: Any) -> None:
    """``add_ControlServiceServicer_to_server``, with WatchEvents sending pre-encoded bytes
    and every method decoding its request strictly (see :mod:`.grpc_handlers`)."""
    register(
        pb_grpc.add_ControlServiceServicer_to_server,
        servicer,
        server,
        {_METHOD: serialize_event_batch},
    )


async def watch_events(
    bus: EventBus | None, request: pb.WatchEventsRequest, context: grpc.aio.ServicerContext
) -> None:
    """Serve one WatchEvents stream until the client leaves or the bus closes.

    Writes serialized ``EventBatch`` bytes with ``context.write``. Raises core errors
    (``InvalidArgument``, ``EventIndexTooOld``, ``SlowConsumer``, ``Unavailable``) for the
    caller's error mapping (``nexus_fast.api.status``: statuses and trailers).
    """
    if bus is None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "event bus not configured")
        return
    after = request.after_index if request.HasField("after_index") else None
    sub = bus.subscribe(request.topics, request.keys, after, transport="grpc")
    metrics.GRPC_CONNECTIONS_ACTIVE.inc()
    delivered = metrics.EVENTS_DELIVERED.labels(transport="grpc")
    peer = context.peer()  # for grpc_stuck, taken while the call is surely alive
    interval = bus.config.bookmark_interval
    try:
        while True:
            # Older than the ring: whole batches straight from the log (zero-copy reads).
            stored = sub.read_stored(MAX_BATCH_EVENTS, MAX_BATCH_BYTES)
            if stored is not None:
                data, count = stored
                if count:
                    await _write(sub, context, peer, data)
                    sub.sent_now()
                    delivered.inc(count)
                else:
                    await asyncio.sleep(0)  # nothing matched in this stretch; keep scanning
                continue
            events = await sub.next_batch(MAX_BATCH_EVENTS, interval)
            if isinstance(events, int):
                await _write(sub, context, peer, bookmark_bytes(events))
                continue
            # Split on bytes too: a batch of huge payloads stays under client limits.
            start = 0
            size = 0
            for i, event in enumerate(events):
                size += len(event.pb_field)
                if size > MAX_BATCH_BYTES and i > start:
                    await _write(sub, context, peer, batch_bytes(events[start:i]))
                    start, size = i, len(event.pb_field)
            await _write(sub, context, peer, batch_bytes(events[start:]))
            delivered.inc(len(events))
    finally:
        sub.close()
        metrics.GRPC_CONNECTIONS_ACTIVE.dec()


async def _write(
    sub: Subscription, context: grpc.aio.ServicerContext, peer: str, data: bytes
) -> None:
    # The lag bound is checked between writes, never by cancelling one: a cancelled write
    # leaves its op pending in gRPC core, and the status could then not be sent at all.
    # A write that waits on a client that stopped reading is cut off by grpc_stuck.
    sub.check_lag()
    stuck_writes.begin(sub, peer)
    try:
        await context.write(data)
    except Exception:
        if stuck_writes.end(sub):  # its connection was closed under it: the call is cancelled
            raise asyncio.CancelledError("cut off: the client stopped reading") from None
        raise
    finally:
        stuck_writes.end(sub)
