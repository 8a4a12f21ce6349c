"""The watch of :class:`~nexus_fast.cluster.etcd.EtcdClient`: a resumable async iterator.

``watch(...)`` yields ``(header revision, events)``, events in revision order, each etcd
revision whole in one batch. An empty list is a progress notification: etcd's periodic one
(``progress_notify``, every ``--experimental-watch-progress-notify-interval``), sent only
when the watcher has seen everything up to that revision.

It survives members going away: when the stream breaks (member killed, lost its leader:
the stream carries ``hasleader``), or stays silent longer than ``probe_interval`` + the
client's timeout after a progress request, it is reopened on the next member from the
revision after the last one yielded, so nothing is skipped or repeated. etcd v3.4 answers a
progress *request* with the store's revision even when the watcher is behind, so those
answers only prove the stream alive; they are never yielded nor used as a resume point.

Raises :class:`~nexus_fast.cluster.etcd.EtcdCompacted` when the revision to resume from
has been compacted; otherwise it retries (backing off up to 1 s) until closed. Close it
(``aclose()``, or ``async with contextlib.aclosing(...)``) or cancel its task to stop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
import grpc.aio

from nexus_fast.cluster.etcd_types import (
    REQUIRE_LEADER,
    EtcdCompacted,
    WatchEvent,
    to_kv,
)
from nexus_fast.pb import etcd_rpc_pb2 as pb

if TYPE_CHECKING:
    from nexus_fast.cluster.etcd import EtcdClient

log = logging.getLogger(__name__)

_QUEUE = 4  # responses (up to 8 MiB each) read ahead of the consumer; grpc flow control after
_PROGRESS_REQUEST = pb.WatchRequest(progress_request=pb.WatchProgressRequest())
_NO_WATCH_ID = -1  # etcd's answer to a progress request belongs to no watcher


class _Reopen(Exception):
    """This stream is done; open another (on the next member)."""


async def _pump(call: Any, queue: asyncio.Queue[Any]) -> None:
    """Read the stream into ``queue``; its end (or error) goes in as an exception."""
    try:
        while True:
            resp = await call.read()
            if resp is grpc.aio.EOF:
                await queue.put(_Reopen("stream closed by etcd"))
                return
            await queue.put(resp)
    except grpc.aio.AioRpcError as exc:
        await queue.put(_Reopen(f"{exc.code().name} {exc.details()}"))


async def watch(
    client: EtcdClient,
    key: bytes,
    range_end: bytes,
    *,
    start_revision: int,
    progress_notify: bool,
    probe_interval: float,
) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
    next_revision = start_revision  # 0 until known: "from now"
    failures = 0
    while True:
        member = client._member()
        call = member.watch.Watch(metadata=REQUIRE_LEADER)
        queue: asyncio.Queue[Any] = asyncio.Queue(_QUEUE)
        pump = asyncio.create_task(_pump(call, queue))
        create = pb.WatchCreateRequest(
            key=key,
            range_end=range_end,
            start_revision=next_revision,
            progress_notify=progress_notify,
            fragment=True,  # responses over etcd's max request size come in pieces
        )
        pending: list[WatchEvent] = []  # a revision that may go on in the next fragment
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancel()
            async with asyncio.timeout(client.timeout):
                await call.write(pb.WatchRequest(create_request=create))
            created = probing = False
            while True:
                wait = probe_interval if created and not probing else client.timeout
                try:
                    async with asyncio.timeout(wait):
                        item = await queue.get()
                except TimeoutError:
                    if probing or not created:
                        raise _Reopen(f"silent for {wait:g}s") from None
                    async with asyncio.timeout(client.timeout):
                        await call.write(_PROGRESS_REQUEST)
                    probing = True
                    continue
                probing = False
                if isinstance(item, _Reopen):
                    raise item
                resp: pb.WatchResponse = item
                if resp.compact_revision:
                    raise EtcdCompacted(int(resp.compact_revision), client.endpoints)
                if resp.canceled:
                    raise _Reopen(f"canceled by etcd: {resp.cancel_reason or 'no reason'}")
                if resp.created:
                    created, failures = True, 0
                    if next_revision == 0:  # "now" = after the revision it was created at
                        next_revision = int(resp.header.revision) + 1
                    continue
                if resp.watch_id == _NO_WATCH_ID:
                    continue  # the answer to our probe: the stream is alive
                if resp.events:
                    events = pending + [
                        WatchEvent("delete" if e.type == pb.Event.DELETE else "put", to_kv(e.kv))
                        for e in resp.events
                    ]
                    pending = []
                    if resp.fragment:  # hold back the last revision: it may not be whole
                        cut = len(events)
                        while cut and events[cut - 1].kv.mod_revision == events[-1].kv.mod_revision:
                            cut -= 1
                        events, pending = events[:cut], events[cut:]
                        if not events:
                            continue
                    next_revision = events[-1].kv.mod_revision + 1
                    yield int(resp.header.revision), events
                elif progress_notify and not pending:
                    revision = int(resp.header.revision)
                    next_revision = max(next_revision, revision + 1)
                    yield revision, []
        except (_Reopen, grpc.aio.AioRpcError, TimeoutError, asyncio.InvalidStateError) as exc:
            failures += 1
            why = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
            (log.warning if failures == 1 else log.debug)(
                "etcd watch on %s broke (%s); reopening from revision %d on the next member",
                member.target,
                why or type(exc).__name__,
                next_revision,
            )
            client._next(member)
        finally:
            pump.cancel()
            call.cancel()
        await asyncio.sleep(min(1.0, 0.05 * (2 ** min(failures, 5))))
