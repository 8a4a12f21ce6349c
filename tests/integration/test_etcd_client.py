"""EtcdClient against real etcd members (Debian etcd-server) on loopback.

KV, txn compares, leases that expire, watches that resume after their member is killed,
compaction, and quorum loss: with two of three members dead a mutation fails fast with
UNAVAILABLE-class EtcdError, and everything works again once they return.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nexus_fast import errors
from nexus_fast.benchmark.procs import free_ports
from nexus_fast.cluster import etcd_procs
from nexus_fast.cluster.etcd import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    WatchEvent,
    cmp_create_revision,
    cmp_mod_revision,
    cmp_value,
    cmp_version,
    op_delete,
    op_put,
    op_range,
    prefix_end,
)
from nexus_fast.cluster.etcd_procs import EtcdCluster, EtcdTls
from tests.integration.etcd_fixtures import etcd1, etcd3  # noqa: F401
from tests.pki import write_pki

pytestmark = pytest.mark.integration
T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def _client(cluster: EtcdCluster, order: list[int] | None = None, **kw: Any) -> EtcdClient:
    endpoints = [cluster.endpoints[i] for i in (order or range(len(cluster.endpoints)))]
    client = EtcdClient(endpoints, **kw)
    await client.connect()
    return client


async def _collect(
    watch: AsyncIterator[tuple[int, list[WatchEvent]]], count: int
) -> list[WatchEvent]:
    seen: list[WatchEvent] = []
    async for _, events in watch:
        seen.extend(events)
        if len(seen) >= count:
            break
    return seen


def test_put_get_range_delete(etcd1: EtcdCluster) -> None:
    async def body() -> None:
        client = await _client(etcd1)
        try:
            rev1 = await client.put(b"/kv/a", b"1")
            rev2 = await client.put(b"/kv/b", b"2")
            await client.put(b"/kw", b"outside the prefix")
            assert rev2 == rev1 + 1
            a = await client.get(b"/kv/a")
            assert a is not None and a.value == b"1" and a.version == 1
            assert a.create_revision == a.mod_revision == rev1
            assert await client.get(b"/kv/missing") is None
            kvs, header = await client.range(b"/kv/", prefix_end(b"/kv/"))
            assert [kv.key for kv in kvs] == [b"/kv/a", b"/kv/b"] and header >= rev2
            first, _ = await client.range(b"/kv/", prefix_end(b"/kv/"), limit=1)
            assert [kv.key for kv in first] == [b"/kv/a"]
            await client.put(b"/kv/a", b"1b")
            old, _ = await client.range(b"/kv/a", revision=rev1)
            assert old[0].value == b"1"  # history until compaction
            assert await client.delete(b"/kv/", prefix_end(b"/kv/")) == 2
            assert await client.get(b"/kv/a") is None
            assert await client.get(b"/kw") is not None
            assert await client.delete(b"/kv/a") == 0
        finally:
            await client.close()

    run(body())


def test_txn_compare_success_and_failure(etcd1: EtcdCluster) -> None:
    async def body() -> None:
        client = await _client(etcd1)
        try:
            leader = b"/txn/leader"
            # Put-if-absent: succeeds once, then the failure branch reads the winner.
            won = await client.txn([cmp_create_revision(leader, "==", 0)], [op_put(leader, b"me")])
            assert won.succeeded and won.ranges == []
            lost = await client.txn(
                [cmp_create_revision(leader, "==", 0)],
                [op_put(leader, b"other")],
                [op_range(leader)],
            )
            assert not lost.succeeded and lost.revision == won.revision
            assert [kv.value for kv in lost.ranges[0]] == [b"me"]
            term = lost.ranges[0][0].create_revision
            # The fence: writes compare the leader key's create revision and the slot's version.
            fence = cmp_create_revision(leader, "==", term)
            slot = b"/txn/log/00000000000000000001"
            ok = await client.txn([fence, cmp_version(slot, "==", 0)], [op_put(slot, b"e1")])
            assert ok.succeeded and (await client.get(slot)) is not None
            again = await client.txn([fence, cmp_version(slot, "==", 0)], [op_put(slot, b"e1'")])
            assert not again.succeeded
            kv = await client.get(slot)
            assert kv is not None and kv.value == b"e1"
            stale = cmp_create_revision(leader, "==", term + 1)
            assert not (await client.txn([stale], [op_put(b"/txn/x", b"x")])).succeeded
            assert await client.get(b"/txn/x") is None
            assert (await client.txn([cmp_value(slot, "==", b"e1")], [op_delete(slot)])).succeeded
            assert await client.get(slot) is None
            assert (await client.txn([cmp_mod_revision(leader, "<", 10**9)], [])).succeeded
            assert not (await client.txn([cmp_value(leader, "!=", b"me")], [])).succeeded
        finally:
            await client.close()

    run(body())


def test_lease_keepalive_then_expiry_removes_the_key(etcd1: EtcdCluster) -> None:
    async def body() -> None:
        client = await _client(etcd1)
        try:
            lease = await client.lease_grant(1)
            await client.put(b"/lease/k", b"v", lease=lease)
            kv = await client.get(b"/lease/k")
            assert kv is not None and kv.lease == lease
            # Kept alive over 2.5 s (> its TTL): still there.
            for _ in range(5):
                assert await client.lease_keepalive(lease) > 0
                await asyncio.sleep(0.5)
            assert await client.get(b"/lease/k") is not None
            # Left alone: etcd expires it and deletes its key.
            end = time.monotonic() + 6.0
            while await client.get(b"/lease/k") is not None:
                assert time.monotonic() < end, "the lease's key outlived it"
                await asyncio.sleep(0.2)
            assert await client.lease_keepalive(lease) == 0.0
            assert await client.lease_time_to_live(lease) == 0.0
            # Revoke deletes at once; revoking an unknown lease is not an error.
            other = await client.lease_grant(30)
            assert await client.lease_time_to_live(other) > 20
            await client.put(b"/lease/k2", b"v", lease=other)
            await client.lease_revoke(other)
            assert await client.get(b"/lease/k2") is None
            await client.lease_revoke(other)
        finally:
            await client.close()

    run(body())


def test_watch_from_revision_sees_puts_in_order(etcd1: EtcdCluster) -> None:
    async def body() -> None:
        client = await _client(etcd1)
        try:
            prefix = b"/watch/"
            first = await client.put(prefix + b"0", b"0")
            for i in range(1, 5):
                await client.put(prefix + str(i).encode(), str(i).encode())
            await client.delete(prefix + b"0")
            watch = client.watch(prefix, prefix_end(prefix), start_revision=first)
            async with contextlib.aclosing(watch):
                seen = await _collect(watch, 6)
                assert [(e.kind, e.kv.key) for e in seen] == [
                    ("put", prefix + b"0"),
                    *(("put", prefix + str(i).encode()) for i in range(1, 5)),
                    ("delete", prefix + b"0"),
                ]
                revisions = [e.kv.mod_revision for e in seen]
                assert revisions == list(range(first, first + 6))
                # Then live puts, and (etcd_procs sets a 1 s interval) progress notifications.
                await client.put(prefix + b"live", b"x")
                live = await _collect(watch, 1)
                assert live[0].kv.key == prefix + b"live"
                async for rev, events in watch:
                    if not events:
                        assert rev >= live[0].kv.mod_revision
                        break
            # From now (start_revision 0): only what comes after.
            now = client.watch(prefix, prefix_end(prefix))
            async with contextlib.aclosing(now):
                task = asyncio.ensure_future(_collect(now, 1))
                await asyncio.sleep(0.3)
                await client.put(prefix + b"later", b"y")
                assert [e.kv.key for e in await task] == [prefix + b"later"]
        finally:
            await client.close()

    run(body())


def test_watch_joins_fragments_without_splitting_a_revision(etcd1: EtcdCluster) -> None:
    """Two txns of 2 x 3 MiB: read back as one batch they exceed etcd's 8 MiB max request
    size, so etcd fragments the response, possibly inside a revision."""

    async def body() -> None:
        client = await _client(etcd1, timeout=10.0)
        prefix = b"/fragments/"
        try:
            big = [bytes([i]) * (3 << 20) for i in range(4)]
            first = await client.put(prefix + b"start", b"")
            for t in range(2):
                ops = [op_put(prefix + b"%d" % (2 * t + j), big[2 * t + j]) for j in range(2)]
                assert (await client.txn([], ops)).succeeded
            watch = client.watch(prefix, prefix_end(prefix), start_revision=first + 1)
            batches: list[list[WatchEvent]] = []
            async with contextlib.aclosing(watch):
                async for _, events in watch:
                    batches.append(events)
                    if sum(len(b) for b in batches) >= 4:
                        break
            seen = [e for b in batches for e in b]
            assert [e.kv.value for e in seen] == big
            assert [e.kv.mod_revision for e in seen] == [first + 1] * 2 + [first + 2] * 2
            for batch in batches[:-1]:  # a revision never straddles two batches
                assert batch[-1].kv.mod_revision < seen[seen.index(batch[-1]) + 1].kv.mod_revision
        finally:
            await client.delete(prefix, prefix_end(prefix))
            await client.close()

    run(body())


def test_compacted_revisions_raise_etcd_compacted(etcd1: EtcdCluster) -> None:
    async def body() -> None:
        client = await _client(etcd1)
        try:
            old = await client.put(b"/compact/k", b"1")
            head = await client.put(b"/compact/k", b"2")
            await client.compact(head)
            await client.compact(old)  # already past it: nothing to do
            with pytest.raises(EtcdCompacted) as info:
                await client.range(b"/compact/k", revision=old)
            assert isinstance(info.value, errors.Unavailable)
            watch = client.watch(b"/compact/", prefix_end(b"/compact/"), start_revision=old)
            with pytest.raises(EtcdCompacted) as winfo:
                async with contextlib.aclosing(watch):
                    await _collect(watch, 1)
            assert winfo.value.compact_revision == head
            assert str(winfo.value).startswith("etcd unavailable: ")
            # From the compaction point on, history is there.
            w2 = client.watch(b"/compact/", prefix_end(b"/compact/"), start_revision=head)
            async with contextlib.aclosing(w2):
                assert (await _collect(w2, 1))[0].kv.value == b"2"
        finally:
            await client.close()

    run(body())


def test_tls_with_client_certificates(tmp_path: Path) -> None:
    pki = write_pki(tmp_path / "pki")
    tls = EtcdTls(pki.ca, pki.server_cert, pki.server_key, pki.client_cert, pki.client_key)
    with EtcdCluster(tmp_path / "etcd", 1, tls=tls) as cluster:

        async def body() -> None:
            client = EtcdClient(
                cluster.endpoints,
                timeout=2.0,
                ca_file=str(pki.ca),
                cert_file=str(pki.client_cert),
                key_file=str(pki.client_key),
            )
            try:
                await client.connect()
                await client.put(b"/tls", b"ok")
                kv = await client.get(b"/tls")
                assert kv is not None and kv.value == b"ok"
            finally:
                await client.close()
            # Without a client certificate etcd refuses the handshake: a typed error.
            anonymous = EtcdClient(cluster.endpoints, timeout=1.0, ca_file=str(pki.ca))
            try:
                with pytest.raises(EtcdError):
                    await anonymous.connect()
            finally:
                await anonymous.close()

        run(body())


def test_harness_stops_by_pid_and_names_the_missing_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cluster = EtcdCluster(tmp_path / "etcd", 1)
    try:
        cluster.start()
        pid = cluster.pid(0)
        assert pid is not None and cluster.member_status(0) is not None
        assert cluster.log_path(0).stat().st_size > 0
    finally:
        cluster.stop()
    assert cluster.pid(0) is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    cluster.stop()  # idempotent
    monkeypatch.setattr(etcd_procs, "ETCD_PATHS", ("/nonexistent/etcd",))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(etcd_procs.EtcdProcessError, match="apt-get install etcd-server"):
        EtcdCluster(tmp_path / "none", 1).start()


def test_no_etcd_fails_fast_with_a_typed_error() -> None:
    (port,) = free_ports(1)

    async def body() -> None:
        client = EtcdClient([f"127.0.0.1:{port}"], timeout=1.0)
        try:
            start = time.monotonic()
            with pytest.raises(EtcdError) as info:
                await client.connect()
            assert time.monotonic() - start < 3.0
            message = str(info.value)
            assert message.startswith("etcd unavailable: ") and f"127.0.0.1:{port}" in message
            with pytest.raises(EtcdError) as put_info:
                await client.put(b"/x", b"y")
            assert not put_info.value.maybe_committed  # never reached a member
            with pytest.raises(EtcdError):
                await client.lease_keepalive(1)
        finally:
            await client.close()

    run(body())


def test_watch_and_calls_survive_their_member_being_killed(etcd3: EtcdCluster) -> None:
    async def body() -> None:
        # `watcher` talks to member 0 first; `writer` to member 1.
        watcher = await _client(etcd3, [0, 1, 2], timeout=2.0)
        writer = await _client(etcd3, [1, 2, 0], timeout=2.0)
        prefix = b"/resume/"
        try:
            lease = await watcher.lease_grant(5)
            assert await watcher.lease_keepalive(lease) > 0
            start = await writer.put(prefix + b"000", b"0")
            watch = watcher.watch(prefix, prefix_end(prefix), start_revision=start)
            async with contextlib.aclosing(watch):
                seen = await _collect(watch, 1)
                assert watcher.endpoints[watcher._current] == etcd3.endpoints[0]
                await asyncio.to_thread(etcd3.kill, 0)
                for i in range(1, 20):
                    await writer.put(prefix + b"%03d" % i, b"x")
                seen += await _collect(watch, 19)
                keys = [e.kv.key for e in seen]
                assert keys == [prefix + b"%03d" % i for i in range(20)]  # no gap, no repeat
                revisions = [e.kv.mod_revision for e in seen]
                assert revisions == sorted(set(revisions))
            # Unary calls and the keepalive stream moved on too.
            assert await watcher.put(prefix + b"after", b"y") > 0
            assert await watcher.lease_keepalive(lease) > 0
            assert (await watcher.get(prefix + b"after")) is not None
        finally:
            await watcher.close()
            await writer.close()
            await asyncio.to_thread(etcd3.start_member, 0)

    run(body(), timeout=60.0)


def test_a_hung_member_is_left_behind(etcd3: EtcdCluster) -> None:
    """SIGSTOP: the member keeps its TCP connections but answers nothing."""

    async def body() -> None:
        client = await _client(etcd3, [0, 1, 2], timeout=1.5)
        writer = await _client(etcd3, [1, 2, 0], timeout=3.0)
        prefix = b"/hung/"
        try:
            lease = await client.lease_grant(5)
            start = await writer.put(prefix + b"0", b"0")
            watch = client.watch(
                prefix, prefix_end(prefix), start_revision=start, probe_interval=0.5
            )
            async with contextlib.aclosing(watch):
                seen = await _collect(watch, 1)
                assert client.endpoints[client._current] == etcd3.endpoints[0]
                etcd3.pause(0)
                t0 = time.monotonic()
                with pytest.raises(EtcdError) as info:
                    await client.txn([], [op_put(b"/hung-txn", b"?")])
                assert info.value.maybe_committed  # sent, no answer: the caller must look
                assert time.monotonic() - t0 < 1.5 + 1.0
                assert (await client.txn([], [op_put(b"/hung-txn", b"!")])).succeeded
                assert await client.lease_keepalive(lease) > 0
                for i in range(1, 6):
                    await writer.put(prefix + b"%d" % i, b"x")
                seen += await _collect(watch, 5)  # the probe finds the stream dead
                assert [e.kv.key for e in seen] == [prefix + b"%d" % i for i in range(6)]
        finally:
            etcd3.resume(0)
            await client.close()
            await writer.close()

    run(body(), timeout=60.0)


def test_quorum_loss_fails_fast_then_recovers(etcd3: EtcdCluster) -> None:
    async def body() -> None:
        client = await _client(etcd3, timeout=1.5)
        try:
            before = await client.put(b"/quorum/k", b"before")
            seen: list[WatchEvent] = []
            watch = client.watch(b"/quorum/", prefix_end(b"/quorum/"), start_revision=before + 1)

            async def follow() -> None:
                async for _, events in watch:
                    seen.extend(events)

            follower = asyncio.create_task(follow())
            await asyncio.to_thread(etcd3.kill, 1)
            await asyncio.to_thread(etcd3.kill, 2)
            for attempt in ("put", "txn"):
                start = time.monotonic()
                with pytest.raises(EtcdError) as info:
                    if attempt == "put":
                        await client.put(b"/quorum/k", b"during")
                    else:
                        await client.txn([], [op_put(b"/quorum/k", b"during")])
                elapsed = time.monotonic() - start
                assert elapsed < 1.5 + 1.0, f"{attempt} took {elapsed:.1f}s"
                assert str(info.value).startswith("etcd unavailable: ")
                assert etcd3.endpoints[0] in str(info.value)
                assert isinstance(info.value, errors.Unavailable)
            statuses = await client.status()
            assert [s.ok for s in statuses] == [False, False, False]
            await asyncio.to_thread(etcd3.start_member, 1)
            await asyncio.to_thread(etcd3.start_member, 2)
            end = time.monotonic() + 15.0
            while True:
                try:
                    await client.put(b"/quorum/k", b"after")
                    break
                except EtcdError:
                    assert time.monotonic() < end, "no recovery after the members returned"
            kv = await client.get(b"/quorum/k")
            assert kv is not None and kv.value == b"after"
            # The watch went on through the outage: it sees the write made after it.
            while not seen or seen[-1].kv.value != b"after":
                assert time.monotonic() < end, f"the watch saw {seen}"
                await asyncio.sleep(0.1)
            revisions = [e.kv.mod_revision for e in seen]
            assert revisions == sorted(set(revisions)) and revisions[-1] == kv.mod_revision
            follower.cancel()
            # The channels of the returned members leave their reconnect backoff (<= 1 s).
            while not all(s.ok for s in await client.status()):
                assert time.monotonic() < end, await client.status()
                await asyncio.sleep(0.2)
        finally:
            await client.close()
            for i in (1, 2):
                await asyncio.to_thread(etcd3.start_member, i)

    run(body(), timeout=60.0)
