"""The replicated log and the election against a real etcd (issue 12).

Two or three replicas in this process, each a real :class:`ReplicatedStore` over its own
:class:`LmdbStore` (temp dir), its own :class:`EtcdClient` and :class:`Election`, sharing
one real etcd member started by the ``etcd1`` fixture (each test under its own prefix).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import uvloop

from nexus_fast.cluster.election import Election, NotLeader, cancel_and_wait
from nexus_fast.cluster.etcd import EtcdClient, EtcdError, prefix_end
from nexus_fast.cluster.etcd_procs import EtcdCluster
from nexus_fast.store import Delete, LmdbStore, Put
from nexus_fast.store.audit_chain import AuditRecord, verify
from nexus_fast.store.log_entry import (
    EntryTooLarge,
    decode_entry,
    encode_entry,
    encode_request,
    log_key,
    log_prefix,
)
from nexus_fast.store.replicated import ReplicatedStore
from tests.integration.etcd_fixtures import etcd1, etcd3  # noqa: F401

T = TypeVar("T")
MB = 1 << 20
TTL = 2.0
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def etcd(etcd1: EtcdCluster) -> EtcdCluster:
    """The module's one etcd member (each test works under its own key prefix)."""
    return etcd1


def run(coro: Coroutine[Any, Any, T], timeout: float = 45) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(coro, timeout))


async def until(cond: Callable[[], bool], timeout: float = 10.0, what: str = "") -> float:
    """Poll ``cond`` until true; the seconds it took. Fails the test on timeout."""
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        await asyncio.sleep(0.01)
    return time.monotonic() - t0


class Replica:
    """One replica's parts: etcd client, election, local LMDB and the replicated store."""

    def __init__(
        self, endpoints: list[str], data: Path, prefix: bytes, name: str, ttl: float = TTL
    ) -> None:
        self.endpoints, self.data, self.prefix, self.name, self.ttl = (
            endpoints,
            data,
            prefix,
            name,
            ttl,
        )
        self.client = EtcdClient(endpoints, timeout=1.0)
        self.election = Election(self.client, prefix, name, f"{name}.test:7000", ttl)
        self.local = LmdbStore(data / name, map_size=16 * MB)
        self.store = ReplicatedStore(
            self.local, self.client, self.election, prefix, max_entry_bytes=64 * 1024
        )
        self.committed: list[tuple[int, bytes]] = []
        self.store.on_commit = self.committed.extend

    async def start(self, *, campaign: bool = True) -> Replica:
        await self.client.connect()
        await self.store.open()
        if campaign:
            await self.election.start()
        return self

    async def lead(self) -> Replica:
        await until(lambda: self.election.role == "leader", 10, f"{self.name} leads")
        await self.store.become_leader()
        return self

    async def stop(self) -> None:
        try:
            await self.store.close()
        finally:
            try:
                await self.election.stop()
            finally:
                await self.client.close()


async def cluster(
    endpoints: list[str], tmp: Path, body: Callable[..., Awaitable[T]], names: str = "ab"
) -> T:
    """Start replica ``names[0]`` first (so it leads), then the others; run body; stop all."""
    prefix = b"/t%d" % next(_ids)
    reps: list[Replica] = []
    try:
        first = await Replica(endpoints, tmp, prefix, names[0]).start()
        reps.append(first)
        await first.lead()
        for n in names[1:]:
            reps.append(await Replica(endpoints, tmp, prefix, n).start())
        await until(lambda: all(r.election.role == "follower" for r in reps[1:]), what="follow")
        return await body(*reps)
    finally:
        for r in reps:
            await r.stop()


def req(i: int) -> tuple[list[Any], list[bytes], list[AuditRecord]]:
    ops: list[Any] = [Put("nodes", b"n%05d" % i, b"v%d" % i)]
    if i % 7 == 3:
        ops.append(Delete("nodes", b"n%05d" % (i - 1)))
    events = [b"ev-%d-%d" % (i, k) for k in range(i % 3)]
    audit = [AuditRecord("alice", "admin", "peer", "/m", f"n{i}", f"r{i}", "ok", 1000 + i)]
    return ops, events, audit


async def commit_many(store: ReplicatedStore, ids: range) -> list[Any]:
    return list(await asyncio.gather(*(store.commit(*req(i)) for i in ids)))


def same_state(a: Replica, b: Replica) -> None:
    assert a.store.applied_seq == b.store.applied_seq
    assert a.local.events_since(0, 100000) == b.local.events_since(0, 100000)
    assert a.local.last_event_index == b.local.last_event_index
    assert a.local.audit_since(0, 100000, 1 << 30) == b.local.audit_since(0, 100000, 1 << 30)
    assert a.local.audit_head == b.local.audit_head
    assert a.local.scan("nodes") == b.local.scan("nodes")


async def log_entries(client: EtcdClient, prefix: bytes) -> list[Any]:
    kvs, _ = await client.range(log_prefix(prefix), prefix_end(log_prefix(prefix)))
    return [decode_entry(kv.value) for kv in kvs]


# ---------------------------------------------------------------------- the log


def test_follower_mirrors_leader_events_and_audit_chain(etcd: EtcdCluster, tmp_path: Path) -> None:
    async def body(a: Replica, b: Replica) -> None:
        results = await commit_many(a.store, range(1, 121))
        await until(lambda: b.store.applied_seq == a.store.applied_seq, what="b caught up")
        same_state(a, b)
        # Each request got its own slice of the event range, and the follower has the same
        # bodies at the same indices.
        events = dict(b.local.events_since(0, 100000))
        for i, res in zip(range(1, 121), results):
            bodies = req(i)[1]
            if not bodies:
                assert tuple(res) == (0, 0)
                continue
            assert [events[k] for k in range(res[0], res[1] + 1)] == bodies
        assert b.local.last_event_index == sum(len(req(i)[1]) for i in range(1, 121))
        # The follower's event bus saw the same contiguous events as the leader's.
        assert b.committed == a.committed == sorted(events.items())
        assert b.local.get("nodes", b"n00005") == b"v5"
        assert b.local.get("nodes", b"n00002") is None  # deleted by request 3
        # The audit chain verifies on the follower and ends at the leader's head.
        assert verify(b.local.scan("audit")) is None
        assert b.local.audit_head == a.local.audit_head
        assert b.local.audit_head.seq == 120
        st = b.store.stat()
        assert st["backend"] == "replicated"
        assert st["cluster"]["role"] == "follower"
        assert st["cluster"]["leader_name"] == "a"
        assert st["cluster"]["applied_seq"] == a.store.applied_seq
        # A follower refuses writes, naming the leader.
        with pytest.raises(NotLeader, match=r"the leader is a at a\.test:7000"):
            b.store.commit([Put("nodes", b"x", b"y")])

    run(cluster(etcd.endpoints, tmp_path, body))


def test_group_commit_puts_many_commits_in_few_entries(etcd: EtcdCluster, tmp_path: Path) -> None:
    async def body(a: Replica, b: Replica) -> None:
        results = await commit_many(a.store, range(1, 401))
        assert a.store.requests_written == 400
        assert a.store.entries_written < 400 / 4, a.store.entries_written
        entries = await log_entries(a.client, a.prefix)
        assert [e.seq for e in entries] == list(range(1, len(entries) + 1))
        assert sum(len(e.requests) for e in entries) == 400
        assert {e.term for e in entries} == {a.election.term}
        # Event ranges: disjoint, increasing, contiguous over the requests that had events.
        ranges = [tuple(r) for r in results if r[0]]
        assert all(x[1] + 1 == y[0] for x, y in itertools.pairwise(ranges))
        await until(lambda: b.store.applied_seq == a.store.applied_seq, what="b caught up")
        same_state(a, b)

    run(cluster(etcd.endpoints, tmp_path, body))


def test_request_bigger_than_an_entry_fails_at_commit(etcd: EtcdCluster, tmp_path: Path) -> None:
    async def body(a: Replica, b: Replica) -> None:
        with pytest.raises(EntryTooLarge, match="max_entry_bytes"):
            a.store.commit([Put("nodes", b"big", b"x" * 70000)])
        with pytest.raises(ValueError, match="unknown database"):
            a.store.commit([Put("nope", b"k", b"v")])
        assert await log_entries(a.client, a.prefix) == []
        await a.store.commit([Put("nodes", b"ok", b"x" * 30000)])
        assert len(await log_entries(a.client, a.prefix)) == 1

    run(cluster(etcd.endpoints, tmp_path, body))


def test_deposed_leader_is_fenced(etcd: EtcdCluster, tmp_path: Path) -> None:
    async def body(a: Replica, b: Replica) -> None:
        await a.store.commit(*req(1))
        # `a` stops watching its key (as if paused), then loses it: b is elected.
        run_task = a.election._run_task
        assert run_task is not None
        run_task.cancel()
        await asyncio.gather(run_task, return_exceptions=True)
        await a.client.delete(a.election.key)
        await until(lambda: b.election.role == "leader", what="b elected")
        assert a.election.role == "leader"  # it has not noticed
        with pytest.raises(NotLeader):
            await a.store.commit([Put("nodes", b"deposed", b"1")], [b"deposed-event"])
        assert a.election.lost.is_set()
        assert a.election.role != "leader"
        with pytest.raises(NotLeader):
            a.store.commit([Put("nodes", b"deposed2", b"1")])
        # Nothing the deposed leader tried is in etcd.
        for e in await log_entries(a.client, a.prefix):
            for r in e.requests:
                assert b"deposed-event" not in r.events
        await b.store.become_leader()
        await b.store.commit([Put("nodes", b"from-b", b"1")], [b"b-event"])
        # The old leader follows again and applies b's entry, never its own attempt.
        await until(lambda: a.store.applied_seq == b.store.applied_seq, what="a follows b")
        same_state(a, b)
        assert a.local.get("nodes", b"deposed") is None
        assert a.local.get("nodes", b"from-b") == b"1"
        assert a.store.stat()["cluster"]["state"] == "follower"

    run(cluster(etcd.endpoints, tmp_path, body))


def test_a_landed_unknown_outcome_write_is_applied_not_overwritten(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    async def body(a: Replica, b: Replica) -> None:
        await a.store.commit(*req(1))
        seq = a.store.applied_seq + 1
        # What a txn of this term whose answer was lost leaves behind: an entry at the
        # next seq that the leader never applied (its callers were told it failed).
        body_ = encode_request([Put("nodes", b"ghost", b"1")], [b"ghost-event"], [])
        await a.client.put(log_key(a.prefix, seq), encode_entry(seq, a.election.term, [body_]))
        res = await a.store.commit([Put("nodes", b"after", b"1")], [b"after-event"])
        assert a.store.applied_seq == seq + 1
        assert a.local.get("nodes", b"ghost") == b"1"
        assert a.local.events_since(res[0] - 2, 10)[-2:] == [
            (res[0] - 1, b"ghost-event"),
            (res[0], b"after-event"),
        ]
        assert [e.seq for e in await log_entries(a.client, a.prefix)] == [1, seq, seq + 1]
        await until(lambda: b.store.applied_seq == a.store.applied_seq, what="b caught up")
        same_state(a, b)

    run(cluster(etcd.endpoints, tmp_path, body))


def test_follower_restarts_mid_way_without_gap_or_duplicate(
    etcd: EtcdCluster, tmp_path: Path
) -> None:
    async def body(a: Replica, b: Replica) -> None:
        stop = asyncio.Event()

        async def writer() -> int:
            i = 0
            while not stop.is_set():
                i += 1
                await a.store.commit(*req(i))
            return i

        task = asyncio.create_task(writer())
        await until(lambda: b.store.applied_seq >= 20, what="b applied 20 entries")
        await b.stop()  # mid-way: the leader keeps committing
        stopped_at = b.local.last_event_index
        await asyncio.sleep(0.3)
        b2 = Replica(a.endpoints, a.data, a.prefix, "b")
        await b2.start()
        try:
            assert b2.store.applied_seq > 0  # resumes from its cluster_applied_seq
            await asyncio.sleep(0.3)
            stop.set()
            n = await task
            await until(lambda: b2.store.applied_seq == a.store.applied_seq, what="b2 caught up")
            same_state(a, b2)
            # Indices contiguous from 1: nothing skipped, nothing applied twice.
            idx = [i for i, _ in b2.local.events_since(0, 100000)]
            assert idx == list(range(1, a.local.last_event_index + 1))
            assert b2.committed and b2.committed[0][0] == stopped_at + 1
            assert n > 20
        finally:
            await b2.stop()

    run(cluster(etcd.endpoints, tmp_path, body))


def test_become_leader_catches_up_first(etcd: EtcdCluster, tmp_path: Path) -> None:
    async def body(a: Replica, b: Replica) -> None:
        await commit_many(a.store, range(1, 31))
        await until(lambda: b.store.applied_seq == a.store.applied_seq, what="b caught up")
        await b.store._stop_tailer()  # b falls behind
        await commit_many(a.store, range(31, 61))
        behind = b.store.applied_seq
        head = a.store.applied_seq
        assert behind < head
        a_events = a.local.events_since(0, 100000)
        await a.store.close()
        await a.election.stop()  # revokes the lease: b is elected at once
        waited = await until(lambda: b.election.role == "leader", what="b elected")
        assert waited < TTL
        await b.store.become_leader()
        assert b.store.applied_seq == head  # everything a committed, before any new commit
        res = await b.store.commit([Put("nodes", b"b", b"1")], [b"first-of-b"])
        assert res[0] == a_events[-1][0] + 1
        assert b.store.applied_seq == head + 1
        assert b.local.events_since(0, 100000)[:-1] == a_events

    run(cluster(etcd.endpoints, tmp_path, body))


def test_compaction_and_a_replica_that_needs_a_snapshot(etcd: EtcdCluster, tmp_path: Path) -> None:
    async def body(a: Replica, b: Replica) -> None:
        for i in range(1, 21):
            await a.store.commit(*req(i))  # one entry each
        await until(lambda: b.store.applied_seq == a.store.applied_seq == 20, what="b caught up")
        assert await a.store.publish_status({"grpc": "a:1"})
        assert await b.store.publish_status({"grpc": "b:1"})
        reps = {r["name"]: r for r in await a.store.replicas()}
        assert reps["a"]["role"] == "leader" and reps["b"]["role"] == "follower"
        assert reps["b"]["applied_seq"] == b.store.applied_seq and reps["b"]["grpc"] == "b:1"
        keep = min(r["applied_seq"] for r in reps.values()) - 5
        deleted = await a.store.compact(keep)
        assert deleted == keep == 15
        assert await a.store.compact(1000) == 4  # the newest entry always stays
        entries = await log_entries(a.client, a.prefix)
        assert [e.seq for e in entries] == [20]
        # The follower goes on; a new empty replica cannot: an explicit state, not a gap.
        await commit_many(a.store, range(21, 25))
        await until(lambda: b.store.applied_seq == a.store.applied_seq, what="b caught up")
        c = await Replica(a.endpoints, a.data, a.prefix, "c").start(campaign=False)
        try:
            await until(lambda: c.store.state == "needs_snapshot", what="c needs a snapshot")
            st = c.store.stat()
            assert st["healthy"] is False
            assert "needs a snapshot" in st["failure"]
            assert c.local.last_event_index == 0
        finally:
            await c.stop()
        # etcd reset under a replica that applied entries: an explicit state, not a wait.
        await b.stop()
        await a.client.delete(log_prefix(a.prefix), prefix_end(log_prefix(a.prefix)))
        b2 = await Replica(a.endpoints, a.data, a.prefix, "b").start(campaign=False)
        try:
            await until(lambda: b2.store.state == "needs_snapshot", what="b2 sees the reset")
            assert "log in etcd is empty" in (b2.store.failure or "")
            # It never campaigns: a leader that leaves is replaced by nobody.
            await b2.election.start()
            await a.store.close()
            await a.election.stop()
            await asyncio.sleep(TTL / 2)
            assert b2.election.role == "candidate"
            assert b2.election.transitions == 0
            assert b2.store.get("nodes", b"n00001") == b"v1"  # reads go on
        finally:
            await b2.stop()

    run(cluster(etcd.endpoints, tmp_path, body))


def test_etcd_down_fails_commits_fast_reads_go_on(tmp_path: Path) -> None:
    with EtcdCluster(tmp_path / "etcd", 1) as etcd:

        async def body(a: Replica) -> None:
            await a.store.commit([Put("nodes", b"k", b"v")], [b"e1"])
            etcd.kill(0)
            t0 = time.monotonic()
            with pytest.raises(EtcdError, match="etcd unavailable"):
                await a.store.commit([Put("nodes", b"k2", b"v")], [b"e2"])
            assert time.monotonic() - t0 < 2 * TTL
            assert a.store.get("nodes", b"k") == b"v"
            assert a.store.events_since(0, 10) == [(1, b"e1")]
            assert a.store.get("nodes", b"k2") is None

        run(cluster(etcd.endpoints, tmp_path, body, names="a"))


def test_one_etcd_member_of_three_killed_under_load(etcd3: EtcdCluster, tmp_path: Path) -> None:
    async def body(a: Replica, b: Replica) -> None:
        stop = asyncio.Event()
        acked: list[int] = []
        failed: list[BaseException] = []

        async def writer() -> None:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    await a.store.commit(*req(i))
                    acked.append(i)
                except EtcdError as exc:  # the txn in flight on the killed member
                    failed.append(exc)
                    await asyncio.sleep(0.05)

        task = asyncio.create_task(writer())
        await until(lambda: len(acked) >= 20, what="20 commits")
        etcd3.kill(0)
        try:
            n = len(acked)
            await until(lambda: len(acked) >= n + 50, 15, "50 commits with a member down")
            assert a.election.role == "leader"
        finally:
            stop.set()
            await task
            etcd3.start_member(0)
        assert len(failed) <= 3, failed
        await until(lambda: b.store.applied_seq == a.store.applied_seq, 15, "b caught up")
        same_state(a, b)
        for i in acked:  # every acknowledged commit is on the follower
            assert b.local.get("nodes", b"n%05d" % i) is not None or i % 7 == 2

    run(cluster(etcd3.endpoints, tmp_path, body))


# ---------------------------------------------------------------------- the election


async def elect_two(endpoints: list[str], tmp: Path, ttl: float) -> tuple[Replica, Replica]:
    prefix = b"/e%d" % next(_ids)
    a = Replica(endpoints, tmp, prefix, "a", ttl)
    b = Replica(endpoints, tmp, prefix, "b", ttl)
    await asyncio.gather(a.start(), b.start())
    await until(
        lambda: {a.election.role, b.election.role} == {"leader", "follower"}, what="one leader"
    )
    return (a, b) if a.election.role == "leader" else (b, a)


def test_two_candidates_one_wins_and_revoke_hands_over(etcd: EtcdCluster, tmp_path: Path) -> None:
    async def main() -> None:
        lead, other = await elect_two(etcd.endpoints, tmp_path, TTL)
        try:
            assert other.election.leader_name == lead.name
            assert other.election.leader_term == lead.election.term > 0
            assert other.election.term == 0
            assert await other.election.wait_leader(1) == f"{lead.name}.test:7000"
            old_term = lead.election.term
            await lead.client.lease_revoke(lead.election.lease_id)
            waited = await until(lambda: other.election.role == "leader", what="takeover")
            assert waited < TTL + 0.5
            assert other.election.term > old_term
            await until(lambda: lead.election.lost.is_set(), what="old leader notices")
            await until(lambda: lead.election.leader_name == other.name, what="sees new leader")
        finally:
            await asyncio.gather(lead.stop(), other.stop())

    run(main())


def test_paused_leader_steps_down_by_its_own_clock(etcd: EtcdCluster, tmp_path: Path) -> None:
    async def main() -> None:
        lead, other = await elect_two(etcd.endpoints, tmp_path, TTL)
        try:
            task = lead.election._keepalive_task
            assert task is not None
            await cancel_and_wait(task)
            t0 = time.monotonic()
            await until(lambda: lead.election.lost.is_set(), 3 * TTL, "self-demotion")
            took = time.monotonic() - t0
            assert lead.election.role != "leader"
            assert 0.3 * TTL < took <= TTL + 0.5
            await until(lambda: other.election.role == "leader", 3 * TTL, "takeover")
        finally:
            await asyncio.gather(lead.stop(), other.stop())

    run(main())


def test_clean_stop_hands_over_at_once(etcd: EtcdCluster, tmp_path: Path) -> None:
    async def main() -> None:
        lead, other = await elect_two(etcd.endpoints, tmp_path, TTL)
        try:
            t0 = time.monotonic()
            await lead.election.stop()
            assert lead.election.lost.is_set()
            await until(lambda: other.election.role == "leader", TTL, "takeover")
            assert time.monotonic() - t0 < TTL / 2
        finally:
            await asyncio.gather(lead.stop(), other.stop())

    run(main())
