"""An asyncio etcd v3 client on grpc.aio, speaking etcd's own protocol (etcd_rpc.proto).

What cluster mode needs and nothing more: KV (range, put, delete, txn, compact), watch,
leases, status. Every call runs on the event loop (no thread, nothing blocks).

Failover: one channel per endpoint; calls stick to the current endpoint and move to the
next one when it cannot be reached, has no raft leader, or times out. Calls carry etcd's
``hasleader`` metadata, so a member cut off from its quorum refuses at once ("etcdserver:
no leader") instead of letting the call wait for its deadline. Each call has one budget
(``timeout``) over all its attempts; running out of it raises :class:`EtcdError`, so losing
quorum makes mutations fail within ``timeout``, never hang.

Outcome of a failed mutation: a request that never reached a member (connection refused,
no leader) is sent again elsewhere. One that may have reached it (deadline, connection
lost, "request timed out") is sent again for put and delete, whose repeat does the same
thing, and lease grant (a lost grant's lease just expires); a txn is never sent twice: :class:`EtcdError` with
``maybe_committed = True`` tells the caller to read the key to learn the outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from nexus_fast.cluster.etcd_types import (
    REQUIRE_LEADER,
    Compare,
    CompareOp,
    EndpointStatus,
    EtcdCompacted,
    EtcdError,
    KeyValue,
    RequestOp,
    TxnResult,
    WatchEvent,
    cmp_create_revision,
    cmp_mod_revision,
    cmp_value,
    cmp_version,
    op_delete,
    op_put,
    op_range,
    prefix_end,
    to_kv,
)
from nexus_fast.cluster.etcd_watch import watch as _watch
from nexus_fast.logs import get_logger
from nexus_fast.pb import etcd_rpc_pb2 as pb
from nexus_fast.pb import etcd_rpc_pb2_grpc as pb_grpc

log = get_logger("cluster.etcd")
__all__ = [
    "REQUIRE_LEADER",
    "Compare",
    "CompareOp",
    "EndpointStatus",
    "EtcdClient",
    "EtcdCompacted",
    "EtcdError",
    "KeyValue",
    "RequestOp",
    "TxnResult",
    "WatchEvent",
    "cmp_create_revision",
    "cmp_mod_revision",
    "cmp_value",
    "cmp_version",
    "op_delete",
    "op_put",
    "op_range",
    "prefix_end",
    "to_kv",
]

CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 << 20),  # callers bound ranges with `limit`
    ("grpc.max_send_message_length", 16 << 20),  # etcd_procs: --max-request-bytes 8 MiB
    # A restarted member is used again within a second, not after grpc's 120 s backoff.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
)
# UNAVAILABLE details proving the request never reached etcd's raft log: safe to resend.
_NOT_SENT = (
    "failed to connect",
    "connection refused",
    "connections to all backends failing",
    "dns resolution failed",
    "name resolution",
    "etcdserver: no leader",
    "etcdserver: not capable",
    "etcdserver: too many requests",
)
_COMPACTED = "required revision has been compacted"


def _target(endpoint: str) -> tuple[str, bool]:
    """``host:port`` and whether the endpoint named https."""
    for scheme in ("http://", "https://"):
        if endpoint.startswith(scheme):
            return endpoint[len(scheme) :].rstrip("/"), scheme == "https://"
    return endpoint, False


class _Member:
    """One endpoint: its channel and etcd's service stubs on it."""

    __slots__ = ("channel", "kv", "lease", "maintenance", "target", "watch")

    def __init__(self, target: str, credentials: Any) -> None:
        self.target = target
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self.channel = grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self.kv = pb_grpc.KVStub(self.channel)
        self.lease = pb_grpc.LeaseStub(self.channel)
        self.maintenance = pb_grpc.MaintenanceStub(self.channel)
        self.watch = pb_grpc.WatchStub(self.channel)


def _read_pem(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None  # a few KiB, read once at startup


def _not_sent(exc: grpc.aio.AioRpcError) -> bool:
    details = (exc.details() or "").lower()
    return exc.code() == grpc.StatusCode.UNAVAILABLE and any(s in details for s in _NOT_SENT)


def _describe(target: str, exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        return f"{target}: {exc.code().name} {exc.details()}"
    return f"{target}: {type(exc).__name__} {exc}".rstrip()


class EtcdClient:
    """The asyncio etcd v3 client; see the module docstring."""

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 2.0,
        ca_file: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
    ) -> None:
        if not endpoints:
            raise ValueError("etcd: at least one endpoint is needed")
        if timeout <= 0:
            raise ValueError("etcd: timeout must be > 0")
        targets = [_target(e) for e in endpoints]
        self.endpoints: list[str] = [t for t, _ in targets]
        self.timeout = timeout
        self._credentials: Any = None
        if ca_file or cert_file or key_file or any(tls for _, tls in targets):
            self._credentials = grpc.ssl_channel_credentials(
                root_certificates=_read_pem(ca_file),
                private_key=_read_pem(key_file),
                certificate_chain=_read_pem(cert_file),
            )
        self._members: list[_Member] = []
        self._current = 0
        self._keepalive: tuple[_Member, Any] | None = None  # (member, LeaseKeepAlive call)
        self._keepalive_lock: asyncio.Lock | None = None
        self._closed = False

    # -- connection -------------------------------------------------------------------
    def _ready(self) -> list[_Member]:
        if self._closed:
            raise self.error("the client is closed")
        if not self._members:
            self._members = [_Member(t, self._credentials) for t in self.endpoints]
            self._keepalive_lock = asyncio.Lock()
        return self._members

    def _member(self) -> _Member:
        members = self._ready()
        return members[self._current % len(members)]

    def _next(self, failed: _Member) -> None:
        """Move on from ``failed`` (unless another call already did)."""
        members = self._ready()
        if members[self._current % len(members)] is failed:
            self._current = (self._current + 1) % len(members)

    def error(self, message: str, **kwargs: Any) -> EtcdError:
        return EtcdError(message, self.endpoints, **kwargs)

    async def connect(self) -> None:
        """Open the channels and wait until a member answers (preferring one that knows a
        leader); :class:`EtcdError` after ``timeout`` when none does."""
        members = self._ready()
        statuses = await self.status()
        answered = [i for i, s in enumerate(statuses) if s.ok] or [
            i for i, s in enumerate(statuses) if s.revision > 0
        ]
        if not answered:
            raise self.error("no member answered: " + "; ".join(s.error for s in statuses))
        self._current = answered[0] % len(members)

    async def close(self) -> None:
        """Close the keepalive stream and every channel; the client cannot be reused."""
        self._drop_keepalive()
        self._closed = True
        members, self._members = self._members, []
        for member in members:
            await member.channel.close()

    # -- unary calls ------------------------------------------------------------------
    async def _call(
        self,
        method: Callable[[_Member], Any],
        request: Any,
        what: str,
        *,
        resend: bool = True,
        split: bool = True,
    ) -> Any:
        """``method(member)(request)`` on the current member, failing over within one
        ``timeout`` budget. ``resend``: the request may be sent again after an ambiguous
        failure. ``split``: give one attempt at most half the budget when other members are
        left (a hung member does not eat all of it)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        members = self._ready()
        seen: list[str] = []
        code = ""
        tried = 0
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            member = self._member()
            budget = (
                remaining / 2 if split and tried % len(members) < len(members) - 1 else remaining
            )
            tried += 1
            try:
                return await method(member)(request, timeout=budget, metadata=REQUIRE_LEADER)
            except grpc.aio.UsageError as exc:  # the channel was closed under the call
                raise self.error(f"{what}: {exc}") from exc
            except grpc.aio.AioRpcError as exc:
                seen.append(_describe(member.target, exc))
                code = exc.code().name
                if _COMPACTED in (exc.details() or ""):
                    raise EtcdCompacted(0, self.endpoints) from exc
                deadline_hit = exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                if not (
                    _not_sent(exc) or deadline_hit or exc.code() == grpc.StatusCode.UNAVAILABLE
                ):
                    raise self.error(f"{what}: {seen[-1]}", code=code) from exc
                self._next(member)
                if not resend and not _not_sent(exc):
                    raise self.error(
                        f"{what} outcome unknown: {seen[-1]}", code=code, maybe_committed=True
                    ) from exc
                if tried % len(members) == 0 and not deadline_hit:
                    # Every member refused at once (e.g. an election): wait a little.
                    await asyncio.sleep(min(0.1, max(0.0, deadline - loop.time())))
        raise self.error(
            f"{what}: no answer within {self.timeout:g}s: " + "; ".join(seen[-len(members) :]),
            code=code or "DEADLINE_EXCEEDED",
        )  # a txn's ambiguous failure raised above: what is left was never applied

    async def get(self, key: bytes) -> KeyValue | None:
        """``key``'s current value, or None."""
        kvs, _ = await self.range(key)
        return kvs[0] if kvs else None

    async def range(
        self, key: bytes, range_end: bytes | None = None, *, revision: int = 0, limit: int = 0
    ) -> tuple[list[KeyValue], int]:
        """Keys in ``[key, range_end)`` (just ``key`` without range_end) sorted by key, at
        ``revision`` (0 = now), at most ``limit`` (0 = all); and the header revision."""
        request = pb.RangeRequest(
            key=key, range_end=range_end or b"", revision=revision, limit=limit
        )
        resp = await self._call(lambda m: m.kv.Range, request, "range")
        return [to_kv(kv) for kv in resp.kvs], int(resp.header.revision)

    async def put(self, key: bytes, value: bytes, *, lease: int = 0) -> int:
        """Write ``key``; returns the revision of the write."""
        request = pb.PutRequest(key=key, value=value, lease=lease)
        resp = await self._call(lambda m: m.kv.Put, request, "put")
        return int(resp.header.revision)

    async def delete(self, key: bytes, range_end: bytes | None = None) -> int:
        """Delete ``key`` (or ``[key, range_end)``); returns how many keys went (a resend
        after an ambiguous failure may report 0 for keys the first attempt deleted)."""
        request = pb.DeleteRangeRequest(key=key, range_end=range_end or b"")
        resp = await self._call(lambda m: m.kv.DeleteRange, request, "delete")
        return int(resp.deleted)

    async def txn(
        self,
        compare: Sequence[pb.Compare],
        success: Sequence[pb.RequestOp],
        failure: Sequence[pb.RequestOp] = (),
    ) -> TxnResult:
        """If every ``compare`` holds run ``success`` else ``failure``, atomically. Never
        sent twice: an unknown outcome raises EtcdError with ``maybe_committed``."""
        request = pb.TxnRequest(compare=compare, success=success, failure=failure)
        resp = await self._call(lambda m: m.kv.Txn, request, "txn", resend=False, split=False)
        ranges = [
            [to_kv(kv) for kv in r.response_range.kvs]
            for r in resp.responses
            if r.WhichOneof("response") == "response_range"
        ]
        return TxnResult(bool(resp.succeeded), int(resp.header.revision), ranges)

    async def compact(self, revision: int) -> None:
        """Drop the history before ``revision`` (already compacted past it: nothing to do)."""
        request = pb.CompactionRequest(revision=revision)
        with contextlib.suppress(EtcdCompacted):
            await self._call(lambda m: m.kv.Compact, request, "compact", split=False)

    # -- leases -----------------------------------------------------------------------
    async def lease_grant(self, ttl: float) -> int:
        """A new lease of ``ttl`` seconds (rounded up to whole seconds, as etcd counts);
        returns its id. Keys put with it go when it expires or is revoked."""
        request = pb.LeaseGrantRequest(TTL=max(1, math.ceil(ttl)))
        resp = await self._call(lambda m: m.lease.LeaseGrant, request, "lease grant")
        if resp.error:
            raise self.error(f"lease grant: {resp.error}")
        return int(resp.ID)

    async def lease_revoke(self, lease_id: int) -> None:
        """End the lease now, deleting its keys (an unknown lease is already gone)."""
        request = pb.LeaseRevokeRequest(ID=lease_id)
        try:
            await self._call(lambda m: m.lease.LeaseRevoke, request, "lease revoke")
        except EtcdError as exc:
            if exc.code != "NOT_FOUND":
                raise

    async def lease_time_to_live(self, lease_id: int) -> float:
        """Seconds the lease has left (0 = expired or unknown), without renewing it."""
        request = pb.LeaseTimeToLiveRequest(ID=lease_id)
        resp = await self._call(lambda m: m.lease.LeaseTimeToLive, request, "lease ttl")
        return max(0.0, float(resp.TTL))

    def _drop_keepalive(self) -> None:
        if self._keepalive is not None:
            self._keepalive[1].cancel()
            self._keepalive = None

    async def _keepalive_once(self, lease_id: int) -> float:
        if self._keepalive is None:
            member = self._member()
            self._keepalive = (member, member.lease.LeaseKeepAlive(metadata=REQUIRE_LEADER))
        call = self._keepalive[1]
        await call.write(pb.LeaseKeepAliveRequest(ID=lease_id))
        while True:
            resp = await call.read()
            if resp is grpc.aio.EOF:
                raise ConnectionError("keepalive stream closed by etcd")
            if lease_id == resp.ID:
                return max(0.0, float(resp.TTL))

    async def lease_keepalive(self, lease_id: int) -> float:
        """Renew the lease over the one LeaseKeepAlive stream this client keeps open;
        returns the TTL it now has (0 = it had expired: its keys are gone). One ``timeout``
        budget; an attempt gets half of what is left while other members remain, so a hung
        member does not eat a whole lease TTL."""
        members = self._ready()
        assert self._keepalive_lock is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        seen: list[str] = []
        try:
            async with asyncio.timeout(self.timeout), self._keepalive_lock:
                for attempt in itertools.count():
                    member = self._keepalive[0] if self._keepalive else self._member()
                    left = deadline - loop.time()
                    last = attempt % len(members) == len(members) - 1
                    try:
                        async with asyncio.timeout(left if last else left / 2):
                            return await self._keepalive_once(lease_id)
                    except (
                        grpc.aio.AioRpcError,
                        ConnectionError,
                        asyncio.InvalidStateError,
                        TimeoutError,
                    ) as exc:
                        seen.append(_describe(member.target, exc))
                        self._drop_keepalive()  # a late answer must not be read as the next's
                        self._next(member)
                        if not isinstance(exc, TimeoutError):
                            await asyncio.sleep(min(0.05, max(0.0, deadline - loop.time())))
        except TimeoutError:
            self._drop_keepalive()
        raise self.error(
            f"lease keepalive: no answer within {self.timeout:g}s: " + "; ".join(seen[-3:]),
            code="DEADLINE_EXCEEDED",
        )

    # -- watch and status -------------------------------------------------------------
    def watch(
        self,
        key: bytes,
        range_end: bytes | None = None,
        *,
        start_revision: int = 0,
        progress_notify: bool = True,
        probe_interval: float = 2.0,
    ) -> AsyncIterator[tuple[int, list[WatchEvent]]]:
        """Changes of ``[key, range_end)`` from ``start_revision`` (0 = from now), in revision
        order, as ``(header revision, events)``; see :mod:`nexus_fast.cluster.etcd_watch`."""
        return _watch(
            self,
            key,
            range_end or b"",
            start_revision=start_revision,
            progress_notify=progress_notify,
            probe_interval=probe_interval,
        )

    async def status(self) -> list[EndpointStatus]:
        """Every member's Maintenance.Status, asked at once (no ``hasleader``: a member
        without a leader still says so)."""

        async def one(member: _Member) -> EndpointStatus:
            try:
                r = await member.maintenance.Status(pb.StatusRequest(), timeout=self.timeout)
            except grpc.aio.AioRpcError as exc:
                return EndpointStatus(member.target, False, error=_describe(member.target, exc))
            problems = "; ".join(r.errors)
            return EndpointStatus(
                member.target,
                bool(r.leader) and not problems,
                int(r.leader),
                int(r.raftTerm),
                int(r.header.revision),
                problems if problems else ("" if r.leader else "no leader"),
            )

        return list(await asyncio.gather(*(one(m) for m in self._ready())))
