"""Snapshot bootstrap: a replica the log cannot bring up to date installs another's copy.

A replica whose next log entry was compacted away (an empty data dir joining a compacted
log, or one that was down too long) is ``needs_snapshot`` in its
:class:`~nexus_fast.store.replicated.ReplicatedStore`. Then:

* **Serving side** (every replica that follows the log, the leader too):
  ``ReplicaService.FetchSnapshot`` makes ONE consistent, compacted copy of its LMDB with
  :func:`~nexus_fast.store.backup.write_copy` (one read txn, off the loop, under the store's
  resize lock as the periodic backup), reads the ``cluster_applied_seq`` that copy holds,
  and streams it in chunks with a SHA-256 of the whole. One snapshot at a time per replica
  (another caller gets RESOURCE_EXHAUSTED and asks elsewhere or later): disk and bandwidth
  are bounded, and the copy file is deleted when the stream ends, however it ends.
* **Receiving side** (:class:`SnapshotBootstrap`): picks a live replica from
  ``{prefix}/replicas/`` that applied at least the first retained entry minus one
  (followers first, so the leader is asked last), writes the stream into a private temp
  dir inside the data dir (same filesystem: the rename is atomic), checks offsets, size,
  digest and then the whole store (:func:`~nexus_fast.store.check.check_store`), closes the
  store, renames the copy over ``data.mdb`` and re-execs the process, which opens the copy
  and tails the log from the applied seq it holds. A re-exec rather than an in-process
  reopen: the EventBus and every other in-memory view were loaded from the old (empty or
  stale) store, as after a demotion.

A crash at any point leaves either the old store or the complete, checked copy in place;
a leftover temp dir is removed by the next attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import shutil
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Final

import grpc

from nexus_fast import errors
from nexus_fast.api.grpc_api import instrumented
from nexus_fast.cluster.etcd import EtcdError
from nexus_fast.cluster.forward import LeaderChannel
from nexus_fast.config import Config
from nexus_fast.logs import get_logger
from nexus_fast.pb import cluster_pb2 as cpb
from nexus_fast.pb import cluster_pb2_grpc as cpb_grpc
from nexus_fast.store import datadir
from nexus_fast.store.backup import LMDB_LOCK_FILE, write_copy
from nexus_fast.store.base import StoreClosed, StoreError
from nexus_fast.store.check import check_store
from nexus_fast.store.datafile import DATA_FILE, fsync_dir, open_db, open_read_only
from nexus_fast.store.lmdb_store import LmdbStore
from nexus_fast.store.log_entry import APPLIED_DB, APPLIED_KEY, decode_applied, log_seq
from nexus_fast.store.replicated import ReplicatedStore

__all__ = ["SnapshotBootstrap", "SnapshotError", "SnapshotServicer", "add_snapshot_service"]

log = get_logger("cluster")

_SERVICE: Final = "nexus.cluster.v1.ReplicaService"
FETCH_SNAPSHOT: Final = f"/{_SERVICE}/FetchSnapshot"
CHUNK_BYTES: Final = 1 << 20
"""Bytes per SnapshotChunk at most (less when the message size limit is smaller)."""
FETCH_TIMEOUT: Final = 600.0  # one whole transfer, at most
RETRY_MIN: Final = 0.5
RETRY_MAX: Final = 10.0
POLL_INTERVAL: Final = 0.5  # how often a replica looks whether it needs a snapshot
_SERVE_FILE: Final = ".snapshot-serve.mdb"
# Inside the data dir, not next to it: the same filesystem even when the data dir is a
# mount point (a volume), so the final rename is atomic.
_INCOMING_PREFIX: Final = ".snapshot-incoming-"
_MAX_PROBLEMS_SHOWN: Final = 3


class SnapshotError(StoreError):
    """A snapshot could not be fetched, or the copy received is not sound."""


def copy_applied_seq(path: Path) -> int:
    """The ``cluster_applied_seq`` a store copy (a data file or dir) holds; 0 when none."""
    env, _ = open_read_only(path)
    try:
        meta = open_db(env, APPLIED_DB)
        if meta is None:
            return 0
        with env.begin(db=meta) as txn:
            value = txn.get(APPLIED_KEY)
        return decode_applied(None if value is None else bytes(value))
    finally:
        env.close()


def _copy_store(local: LmdbStore, target: Path) -> tuple[int, int]:
    """Blocking: one consistent copy of ``local`` at ``target``; (size, applied seq)."""
    # The resize lock, as the periodic backup: map growth waits for the copy's read txn.
    with local._resize_lock:
        env = local._env
        if env is None:
            raise StoreClosed("store is not open")
        size = write_copy(env, target)
    return size, copy_applied_seq(target)


def _read_at(path: Path, offset: int, n: int) -> bytes:
    with path.open("rb") as f:
        f.seek(offset)
        return f.read(n)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


class SnapshotServicer(cpb_grpc.ReplicaServiceServicer):
    """``ReplicaService.FetchSnapshot``: this replica's store, one copy at a time."""

    def __init__(self, store: ReplicatedStore, data_dir: Path, max_message_bytes: int) -> None:
        self.store = store
        self.data_dir = data_dir
        # Room for the chunk's other fields and framing within the message limit.
        self.chunk_bytes = max(1024, min(CHUNK_BYTES, max_message_bytes - 1024))
        self._serving = False
        self.served = 0
        """Snapshots streamed to the end (tests, status)."""

    @instrumented("FetchSnapshot")
    async def FetchSnapshot(
        self, request: cpb.FetchSnapshotRequest, context: grpc.aio.ServicerContext
    ) -> None:
        store = self.store
        if store.state not in ("follower", "leader"):
            raise errors.FailedPrecondition(
                f"this replica cannot serve a snapshot: its store is {store.state}"
            )
        if store.applied_seq < request.min_applied_seq:
            raise errors.FailedPrecondition(
                f"this replica applied up to log entry {store.applied_seq}, "
                f"the snapshot must hold {request.min_applied_seq}"
            )
        if self._serving:
            raise errors.ResourceExhausted(
                "this replica is serving another snapshot; retry later or ask another replica",
                retry_after=5.0,
            )
        self._serving = True
        path = self.data_dir / _SERVE_FILE
        try:
            await self._serve(request, context, path)
        finally:
            self._serving = False
            with contextlib.suppress(OSError):
                await asyncio.to_thread(path.unlink, True)

    async def _serve(
        self,
        request: cpb.FetchSnapshotRequest,
        context: grpc.aio.ServicerContext,
        path: Path,
    ) -> None:
        # The copy runs to its end even when the caller goes away meanwhile: the file is
        # deleted after it, and the slot is not free while a copy still writes.
        copying = asyncio.ensure_future(asyncio.to_thread(_copy_store, self.store.local, path))
        try:
            size, applied = await asyncio.shield(copying)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await copying
            raise
        if applied < request.min_applied_seq:  # compacted meanwhile: cannot happen, cheap
            raise errors.FailedPrecondition(
                f"the copy holds entry {applied}, the snapshot must hold {request.min_applied_seq}"
            )
        log.info("serving a snapshot", extra={"bytes": size, "applied_seq": applied})
        try:
            # A reader that stalls holds the one slot and the copy's disk: not for long.
            async with asyncio.timeout(FETCH_TIMEOUT):
                await self._stream(context, path, size, applied)
        except TimeoutError:
            raise errors.Unavailable(
                f"the snapshot transfer took longer than {FETCH_TIMEOUT:.0f}s; retry"
            ) from None
        self.served += 1

    async def _stream(
        self, context: grpc.aio.ServicerContext, path: Path, size: int, applied: int
    ) -> None:
        digest = hashlib.sha256()
        offset = 0
        while True:
            data = await asyncio.to_thread(_read_at, path, offset, self.chunk_bytes)
            digest.update(data)
            last = offset + len(data) >= size or not data
            await context.write(
                cpb.SnapshotChunk(
                    applied_seq=applied,
                    size=size,
                    offset=offset,
                    data=data,
                    sha256=digest.hexdigest() if last else "",
                )
            )
            offset += len(data)
            if last:
                break


def add_snapshot_service(servicer: SnapshotServicer, server: Any) -> None:
    """Register ReplicaService.FetchSnapshot alone, with strict request decoding.

    Only this method, not the generated ``add_ReplicaServiceServicer_to_server``: Relay
    has its own servicer, registered alone the same way (cluster/relay.py).
    """
    from nexus_fast.api.grpc_handlers import register

    def add(snapshots: SnapshotServicer, target: Any) -> None:
        handlers = {
            "FetchSnapshot": grpc.unary_stream_rpc_method_handler(
                snapshots.FetchSnapshot,
                request_deserializer=cpb.FetchSnapshotRequest.FromString,
                response_serializer=cpb.SnapshotChunk.SerializeToString,
            )
        }
        target.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(_SERVICE, handlers),))
        target.add_registered_method_handlers(_SERVICE, handlers)

    register(add, servicer, server)


class SnapshotBootstrap:
    """Receiving side: waits for ``needs_snapshot``, installs a copy, restarts.

    ``restart`` closes what is left and re-execs the process (``ClusterReplica._reexec``).
    """

    def __init__(
        self,
        config: Config,
        store: ReplicatedStore,
        data_dir: Path,
        restart: Callable[[], Awaitable[None]],
    ) -> None:
        self.config = config
        self.store = store
        self.data_dir = data_dir
        self.restart = restart
        self.attempts = 0
        self.last_error = ""
        self._lock_fd: int | None = None

    async def run(self) -> None:
        """Poll for ``needs_snapshot``; bootstrap then, retrying with a backoff."""
        backoff = RETRY_MIN
        while True:
            if self.store.state != "needs_snapshot":
                await asyncio.sleep(POLL_INTERVAL)
                continue
            self.attempts += 1
            try:
                await self.bootstrap()
                return
            except (StoreError, EtcdError, grpc.RpcError, OSError, TimeoutError) as exc:
                self.last_error = _describe(exc)
                log.warning("snapshot bootstrap failed; retrying: %s", self.last_error)
            except Exception as exc:  # a bug must not end the bootstrap silently
                self.last_error = repr(exc)
                log.exception("snapshot bootstrap failed")
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, RETRY_MAX)

    async def needed_seq(self) -> int:
        """The seq a copy must hold applied: the first entry still in the log, minus one."""
        store = self.store
        start = store._log_prefix
        kvs, _ = await store.client.range(start, store._log_end, limit=1)
        if not kvs:
            return 0
        return max(0, log_seq(store.prefix, kvs[0].key) - 1)

    async def sources(self, need: int) -> list[str]:
        """gRPC addresses of live replicas able to serve a copy holding ``need``."""
        me = self.store.election.name
        found = []
        for r in await self.store.replicas():
            applied, target = r.get("applied_seq"), r.get("advertise")
            if r.get("name") == me or not isinstance(target, str) or not target:
                continue
            if r.get("state") not in ("follower", "leader") or not isinstance(applied, int):
                continue
            if applied >= need:
                found.append((r.get("role") == "leader", -applied, target))
        return [target for *_, target in sorted(found)]  # followers first, newest first

    async def bootstrap(self) -> None:
        """Fetch, check and install one copy, then restart (does not return on success)."""
        await asyncio.to_thread(self._remove_leftovers)
        need = await self.needed_seq()
        sources = await self.sources(need)
        if not sources:
            raise SnapshotError(f"no live replica has applied log entry {need} yet")
        failures = []
        for source in sources:
            tmp = self.data_dir / f"{_INCOMING_PREFIX}{os.getpid()}"
            try:
                applied = await self._fetch(source, need, tmp)
            except (StoreError, grpc.RpcError, OSError) as exc:
                failures.append(f"{source}: {_describe(exc)}")
                await asyncio.to_thread(shutil.rmtree, tmp, True)
                continue
            await self._install(tmp, source, applied)
            return
        raise SnapshotError("; ".join(failures))

    async def _fetch(self, source: str, need: int, tmp: Path) -> int:
        """Stream a copy from ``source`` into ``tmp/data.mdb`` and check it; its applied seq."""
        await asyncio.to_thread(shutil.rmtree, tmp, True)
        await asyncio.to_thread(datadir.create_private_dir, tmp)
        target = tmp / DATA_FILE
        fd = await asyncio.to_thread(datadir.create_private_file, target)
        digest = hashlib.sha256()
        offset = size = applied = 0
        sha = ""
        # One channel to this source, built as the forwarding channel is (same credentials:
        # with TLS this replica's own certificate, role ``replica``).
        channel = LeaderChannel(self.config, lambda: (source, False)).get()
        try:
            call = channel.unary_stream(
                FETCH_SNAPSHOT,
                request_serializer=cpb.FetchSnapshotRequest.SerializeToString,
                response_deserializer=cpb.SnapshotChunk.FromString,
            )
            stream = call(cpb.FetchSnapshotRequest(min_applied_seq=need), timeout=FETCH_TIMEOUT)
            async for chunk in stream:
                if chunk.offset != offset or (offset and chunk.size != size):
                    raise SnapshotError(f"chunk at {chunk.offset}, expected {offset}")
                size, applied = chunk.size, chunk.applied_seq
                if offset + len(chunk.data) > size:
                    raise SnapshotError(f"more than the announced {size} bytes")
                await asyncio.to_thread(_write_all, fd, chunk.data)
                digest.update(chunk.data)
                offset += len(chunk.data)
                if chunk.sha256:
                    sha = chunk.sha256
                    break
            await asyncio.to_thread(os.fsync, fd)
        finally:
            os.close(fd)
            with contextlib.suppress(Exception):
                await channel.close()
        if not sha or offset != size:
            raise SnapshotError(f"the stream ended after {offset} of {size} bytes")
        if sha != digest.hexdigest():
            raise SnapshotError("the copy's SHA-256 does not match")
        if applied < need:
            raise SnapshotError(f"the copy holds entry {applied}, {need} is needed")
        problems = await asyncio.to_thread(check_store, tmp)
        if problems:
            shown = "; ".join(str(p) for p in problems[:_MAX_PROBLEMS_SHOWN])
            raise SnapshotError(f"the copy fails the store check ({len(problems)}): {shown}")
        held = await asyncio.to_thread(copy_applied_seq, target)
        if held != applied:
            raise SnapshotError(f"the copy holds entry {held}, its stream said {applied}")
        log.info(
            "snapshot received and checked",
            extra={"source": source, "bytes": size, "applied_seq": applied},
        )
        return applied

    async def _install(self, tmp: Path, source: str, applied: int) -> None:
        """Close the store, rename the copy over data.mdb, restart on it."""
        await self.store.close()  # releases the data dir's lock: _swap takes it again
        try:
            await asyncio.to_thread(self._swap, tmp)
        except Exception as exc:  # the store is closed: come back on the old one and retry
            log.error("installing the snapshot failed; restarting on the old store: %r", exc)
            await self.restart()
            return
        log.info(
            "snapshot installed; restarting to follow the log from it",
            extra={"source": source, "applied_seq": applied},
        )
        await self.restart()

    def _swap(self, tmp: Path) -> None:
        # Held until the exec closes it (close-on-exec): no other process opens the data
        # dir half-way, and the restarted image takes it again.
        self._lock_fd = datadir.lock_dir(self.data_dir)
        (tmp / DATA_FILE).rename(self.data_dir / DATA_FILE)  # atomic: same filesystem
        # LMDB's reader table belongs to the old file; the next open makes a fresh one.
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / LMDB_LOCK_FILE).unlink()
        fsync_dir(self.data_dir)
        shutil.rmtree(tmp, ignore_errors=True)

    def _remove_leftovers(self) -> None:
        if not self.data_dir.is_dir():
            return
        for p in self.data_dir.iterdir():
            if p.name.startswith(_INCOMING_PREFIX) and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return f"{exc.code().name}: {exc.details()}"
    return str(exc) or repr(exc)
