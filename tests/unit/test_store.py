"""LmdbStore against a real LMDB environment, real writer thread and a real (uv)loop."""

from __future__ import annotations

import asyncio
import os
import signal
import stat
import subprocess
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import orjson
import pytest
import uvloop
from prometheus_client import REGISTRY

from nexus_fast import errors
from nexus_fast.security.auditing import AUDITED_GRPC_METHODS, AUDITED_WS_OPS, WS_PRINCIPAL_KEY
from nexus_fast.security.permissions import GRPC_METHODS
from nexus_fast.security.ws_auth import PRINCIPAL_KEY
from nexus_fast.store import (
    CommitResult,
    Delete,
    DeleteRange,
    LmdbStore,
    Put,
    StateStore,
    StoreBusy,
    StoreClosed,
    StoreError,
    StoreFull,
    StoreLocked,
    event_key,
    lmdb_store,
    writer,
)
from nexus_fast.store.audit_chain import AuditRecord, audit_seq, verify

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
MB = 1 << 20


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run one test body on uvloop, the loop production uses."""
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(coro, 60))


def with_store(tmp_path: Path, body: Callable[[LmdbStore], Awaitable[T]], **kw: Any) -> T:
    """Open a store in tmp_path, run body, always close."""

    async def main() -> T:
        store = LmdbStore(tmp_path / "db", **{"map_size": 16 * MB, **kw})
        await store.open()
        try:
            return await body(store)
        finally:
            await store.close()

    return run(main())


def metric(operation: str) -> float:
    value = REGISTRY.get_sample_value("nexus_db_operations_total", {"operation": operation})
    return value or 0.0


def child_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "NEXUS_NO_EXTENSIONS": "1"}


# ---------------------------------------------------------------------------- basics


def test_satisfies_protocol(tmp_path: Path) -> None:
    store: StateStore = LmdbStore(tmp_path / "db")  # mypy checks the structural match
    assert not store.healthy()


def test_put_get_scan_count_delete(tmp_path: Path) -> None:
    async def body(s: LmdbStore) -> None:
        assert s.healthy()
        ops = [Put("nodes", b"n/%03d" % i, b"v%d" % i) for i in range(50)]
        ops.append(Put("agents", b"n/000", b"other-db"))
        res = await s.commit(ops)
        assert res == CommitResult(0, 0)
        assert s.get("nodes", b"n/007") == b"v7"
        assert s.get("nodes", b"missing") is None
        assert s.get("agents", b"n/000") == b"other-db"
        assert s.get_many("nodes", [b"n/003", b"missing", b"n/003"]) == [b"v3", None, b"v3"]
        assert s.get_many("nodes", []) == []
        assert s.count("nodes") == 50
        assert [k for k, _ in s.scan("nodes", prefix=b"n/01")] == [
            b"n/%03d" % i for i in range(10, 20)
        ]
        page = s.scan("nodes", prefix=b"n/", start=b"n/045", limit=3)
        assert page == [(b"n/045", b"v45"), (b"n/046", b"v46"), (b"n/047", b"v47")]
        assert s.scan("nodes", prefix=b"n/", start=b"a")[0][0] == b"n/000"  # start < prefix
        assert s.scan("nodes", prefix=b"zz") == []
        assert s.scan("nodes", limit=0) == []
        await s.commit([Delete("nodes", b"n/000"), Delete("nodes", b"never-existed")])
        await s.commit([DeleteRange("nodes", b"n/010", b"n/020")])
        assert s.count("nodes") == 39
        assert s.get("nodes", b"n/015") is None and s.get("nodes", b"n/020") == b"v20"
        await s.commit([DeleteRange("nodes", b"n/040", None)])
        assert s.count("nodes") == 29
        assert s.read_view("nodes", b"n/005", lambda v: (type(v), bytes(v[:1]))) == (
            memoryview,
            b"v",
        )
        assert s.read_view("nodes", b"missing", bytes) is None
        st = s.stat()
        assert st["entries"]["nodes"] == 29 and st["healthy"] and st["size_bytes"] > 0
        assert st["txn_count"] == s.txn_count

    with_store(tmp_path, body)


def test_group_commit_batches_concurrent_requests(tmp_path: Path) -> None:
    async def body(s: LmdbStore) -> None:
        txns0, metric0 = s.txn_count, metric("commit")
        puts0 = metric("put")
        futs = [s.commit([Put("commands", b"c%05d" % i, b"x")], [b"e%d" % i]) for i in range(1000)]
        results = await asyncio.gather(*futs)
        txns = s.txn_count - txns0
        assert 1 <= txns <= 50, f"1000 concurrent requests took {txns} txns"
        assert metric("commit") - metric0 == txns  # one commit metric per txn
        assert metric("put") - puts0 == 2000  # ops + event bodies
        assert s.count("commands") == 1000
        # Requests are applied in submission order: indices follow the commit() calls.
        assert [r.first_event_index for r in results] == list(range(1, 1001))
        assert s.stat()["avg_batch_requests"] > 10

    with_store(tmp_path, body)


def test_ops_apply_in_order_within_and_across_requests(tmp_path: Path) -> None:
    """Puts to one database go to LMDB in runs; deletes and other databases cut the runs."""

    async def body(s: LmdbStore) -> None:
        first = s.commit(
            [
                Put("nodes", b"k", b"v1"),
                Put("agents", b"k", b"a1"),
                Put("nodes", b"k", b"v2"),
                Delete("nodes", b"k"),
                Put("nodes", b"j", b"j1"),
                Put("nodes", b"k", b"v3"),
            ]
        )
        # Queued together with the first, so one txn applies both, in this order.
        second = s.commit([Put("nodes", b"j", b"j2"), DeleteRange("agents", b"k", None)])
        third = s.commit([Put("agents", b"k", b"a2"), Put("nodes", b"k", b"v4")])
        await asyncio.gather(first, second, third)
        assert s.get_many("nodes", [b"k", b"j"]) == [b"v4", b"j2"]
        assert s.get("agents", b"k") == b"a2"

    with_store(tmp_path, body)


def test_sequential_awaits_each_commit_alone(tmp_path: Path) -> None:
    async def body(s: LmdbStore) -> None:
        txns0 = s.txn_count
        for i in range(20):
            await s.commit([Put("nodes", b"%d" % i, b"")])
        assert s.txn_count - txns0 == 20

    with_store(tmp_path, body)


def test_sync_window_gathers_requests_arriving_later(tmp_path: Path) -> None:
    async def body(s: LmdbStore) -> None:
        txns0 = s.txn_count
        f1 = s.commit([Put("nodes", b"a", b"1")])
        await asyncio.sleep(0.02)  # well inside the 0.5 s window
        f2 = s.commit([Put("nodes", b"b", b"2")])
        await asyncio.gather(f1, f2)
        assert s.txn_count - txns0 == 1

    with_store(tmp_path, body, sync_window=0.5)


def test_max_batch_ops_bounds_each_txn(tmp_path: Path) -> None:
    async def body(s: LmdbStore) -> None:
        txns0 = s.txn_count
        big = s.commit([Put("nodes", b"big%d" % i, b"") for i in range(25)])  # > bound: alone
        futs = [s.commit([Put("nodes", b"k%d" % i, b"")], [b"e"]) for i in range(100)]
        await asyncio.gather(big, *futs)
        # 100 requests of 2 ops with at most 10 ops per txn: >= 20 txns, plus the big one.
        assert s.txn_count - txns0 >= 21
        assert s.count("nodes") == 125

    with_store(tmp_path, body, max_batch_ops=10)


# ---------------------------------------------------------------------------- events


def test_event_indices_contiguous_and_hook_in_order(tmp_path: Path) -> None:
    seen: list[tuple[int, bytes]] = []
    hook_calls = 0

    def hook(pairs: list[tuple[int, bytes]]) -> None:
        nonlocal hook_calls
        hook_calls += 1
        seen.extend(pairs)

    async def body(s: LmdbStore) -> None:
        s.on_commit = hook
        expected: list[bytes] = []
        results: list[CommitResult] = []
        for wave in range(5):  # several batches
            futs = []
            for i in range(200):
                n = i % 4  # 0..3 events per request, some requests carry none
                bodies = [b"w%d-r%d-e%d" % (wave, i, j) for j in range(n)]
                expected.extend(bodies)
                futs.append(s.commit([Put("nodes", b"w%d-%d" % (wave, i), b"")], bodies))
            results.extend(await asyncio.gather(*futs))
        total = len(expected)
        assert s.last_event_index == total
        # Ranges of the requests tile 1..total with no gap or overlap.
        nxt = 1
        for r in results:
            if r == CommitResult(0, 0):
                continue
            assert r.first_event_index == nxt
            nxt = r.last_event_index + 1
        assert nxt == total + 1
        logged = s.events_since(0, total + 10)
        assert [i for i, _ in logged] == list(range(1, total + 1))
        assert [b for _, b in logged] == expected
        assert seen == logged  # the hook saw every event once, in index order
        assert hook_calls <= s.txn_count
        assert s.events_since(total - 3, 2) == logged[-3:-1]
        assert s.events_since(total, 10) == []

    with_store(tmp_path, body)


def test_data_and_event_index_survive_reopen(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "db"
        s = LmdbStore(path, map_size=4 * MB)
        await s.open()
        r1 = await s.commit([Put("agents", b"a1", b"running")], [b"ev1", b"ev2"])
        await s.close()
        assert r1 == CommitResult(1, 2)

        s = LmdbStore(path, map_size=4 * MB)
        await s.open()
        assert s.last_event_index == 2
        assert s.get("agents", b"a1") == b"running"
        r2 = await s.commit([Put("agents", b"a2", b"pending")], [b"ev3"])
        assert r2 == CommitResult(3, 3)
        assert s.events_since(0, 10) == [(1, b"ev1"), (2, b"ev2"), (3, b"ev3")]
        await s.close()

    run(main())


def test_request_is_atomic_and_failed_txn_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(s: LmdbStore) -> None:
        r = await s.commit(
            [Put("commands", b"c1", b"placed"), Put("nodes", b"n1", b"busy")], [b"placed c1"]
        )
        assert s.get("commands", b"c1") == b"placed" and s.get("nodes", b"n1") == b"busy"
        assert s.events_since(r.first_event_index - 1, 5) == [(1, b"placed c1")]

        # Fail the txn midway, after it already applied a Put: the abort must undo it.
        def boom(*_: Any) -> int:
            raise RuntimeError("disk on fire")

        monkeypatch.setattr(writer, "_delete_range", boom)
        fa = s.commit([Put("commands", b"c2", b"x"), DeleteRange("agents", b"", None)], [b"e"])
        fb = s.commit([Put("commands", b"c3", b"x")], [b"e"])  # same batch: fails too
        for fut in (fa, fb):
            with pytest.raises(StoreError, match="disk on fire"):
                await fut
        assert s.get("commands", b"c2") is None and s.get("commands", b"c3") is None
        assert s.last_event_index == 1 and s.events_since(1, 5) == []
        monkeypatch.undo()

        # The writer survives and numbering continues without a gap.
        r = await s.commit([Put("commands", b"c4", b"ok")], [b"after"])
        assert r == CommitResult(2, 2)
        assert s.healthy()

    with_store(tmp_path, body)


def test_bad_requests_raise_at_once_and_do_not_affect_others(tmp_path: Path) -> None:
    async def body(s: LmdbStore) -> None:
        good1 = s.commit([Put("nodes", b"ok1", b"1")], [b"e1"])
        bad: list[tuple[list[Any], list[Any]]] = [
            ([Put("no-such-db", b"k", b"v")], []),
            ([Put("nodes", b"k", "not bytes")], []),  # type: ignore[arg-type]
            ([Put("nodes", "str-key", b"v")], []),  # type: ignore[arg-type]
            ([Put("nodes", b"", b"v")], []),
            ([Put("nodes", b"k" * 512, b"v")], []),
            ([Put("events", event_key(99), b"forged")], []),
            ([Put("meta", b"last_event_index", b"\0" * 8)], []),
            ([DeleteRange("meta", b"", None)], []),
            ([("nodes", b"k", b"v")], []),  # a bare tuple is not an op
            ([Put("nodes", b"k", b"v")], ["str event"]),
        ]
        for ops, events in bad:
            with pytest.raises(ValueError):
                s.commit(ops, events)
        good2 = s.commit([Put("nodes", b"ok2", b"2")], [b"e2"])
        assert await good1 == CommitResult(1, 1)
        assert await good2 == CommitResult(2, 2)
        assert s.get("nodes", b"k") is None
        assert s.pending == 0
        with pytest.raises(ValueError):
            s.get("no-such-db", b"k")

    with_store(tmp_path, body)


def test_caller_mutating_its_list_after_commit_changes_nothing(tmp_path: Path) -> None:
    async def body(s: LmdbStore) -> None:
        ops: list[Any] = [Put("nodes", b"a", b"1")]
        fut = s.commit(ops)
        ops.append(Put("nodes", b"bad-db-would-fail", "oops"))  # type: ignore[arg-type]
        await fut
        assert s.get("nodes", b"a") == b"1" and s.count("nodes") == 1

    with_store(tmp_path, body)


def test_prune_and_events_since(tmp_path: Path) -> None:
    async def body(s: LmdbStore) -> None:
        assert s.first_event_index() == 1  # empty log: the next index
        await asyncio.gather(*(s.commit([], [b"e%d" % i]) for i in range(1, 101)))
        assert s.first_event_index() == 1 and s.last_event_index == 100
        txns0 = s.txn_count
        assert await s.prune_events(keep_after_index=60) == 60
        assert s.txn_count - txns0 >= 6  # chunked by max_batch_ops=10
        assert s.first_event_index() == 61
        assert s.events_since(0, 3) == [(61, b"e61"), (62, b"e62"), (63, b"e63")]
        assert await s.prune_events(keep_after_index=60) == 0
        assert await s.prune_events(keep_after_index=10_000) == 40  # never past the newest
        assert s.first_event_index() == 101 and s.events_since(0, 5) == []
        # Numbering continues after the log was emptied.
        assert await s.commit([], [b"next"]) == CommitResult(101, 101)
        assert s.first_event_index() == 101

    with_store(tmp_path, body, max_batch_ops=10)


# ---------------------------------------------------------------------------- map growth


def test_map_grows_from_tiny_and_reads_keep_working(tmp_path: Path) -> None:
    async def body(s: LmdbStore) -> None:
        start = s.map_size
        grows0 = metric("grow")
        stop = False

        async def reader() -> int:
            # Loop reads interleave with growth: set_mapsize must never meet an open txn.
            n = 0
            while not stop:
                s.get("nodes", b"k0000")
                s.scan("nodes", limit=5)
                n += 1
                await asyncio.sleep(0)
            return n

        rtask = asyncio.create_task(reader())
        value = os.urandom(2000)
        for chunk in range(20):  # 2000 x 2 KB = ~4 MB, in several txns
            await asyncio.gather(
                *(
                    s.commit([Put("nodes", b"k%04d" % (chunk * 100 + i), value)], [b"ev"])
                    for i in range(100)
                )
            )
        stop = True
        assert await rtask > 0
        assert s.map_size > start and s.map_size >= 4 * MB
        assert metric("grow") > grows0
        assert s.count("nodes") == 2000 and s.get("nodes", b"k1999") == value
        assert s.last_event_index == 2000
        assert s.size_bytes() > 4 * MB

    with_store(tmp_path, body, map_size=64 * 1024, max_map_size=256 * MB)


def test_map_full_at_cap_fails_batch_only(tmp_path: Path) -> None:
    async def body(s: LmdbStore) -> None:
        await s.commit([Put("nodes", b"small", b"x")], [b"e1"])
        with pytest.raises(StoreFull, match="store full"):
            await s.commit([Put("nodes", b"huge%d" % i, os.urandom(4000)) for i in range(300)])
        assert s.map_size == 512 * 1024
        # Reads keep serving; health says why writes fail until one succeeds again.
        assert s.get("nodes", b"huge0") is None and s.get("nodes", b"small") == b"x"
        assert not s.healthy() and "store full" in (s.failure or "")
        assert await s.commit([Put("nodes", b"small2", b"y")], [b"e2"]) == CommitResult(2, 2)
        assert s.healthy() and s.failure is None

    with_store(tmp_path, body, map_size=64 * 1024, max_map_size=512 * 1024)


def test_store_full_is_resource_exhausted_and_reports_changes(tmp_path: Path) -> None:
    seen: list[str | None] = []

    async def body(s: LmdbStore) -> None:
        s.on_failure = seen.append
        with pytest.raises(errors.ResourceExhausted) as info:
            await s.commit([Put("nodes", b"huge%d" % i, os.urandom(4000)) for i in range(300)])
        assert isinstance(info.value, errors.StoreFull) and isinstance(info.value, StoreError)
        assert str(info.value).startswith("store full")
        assert s.stat()["failure"] == str(info.value) and not s.stat()["healthy"]
        # The refusal's audit record fits, but says nothing about the store's health.
        await s.commit((), (), [_rec(0, "RESOURCE_EXHAUSTED")])
        assert s.count("audit") == 1 and not s.healthy()
        await s.commit([Put("nodes", b"small", b"y")])
        assert s.healthy()

    with_store(tmp_path, body, map_size=64 * 1024, max_map_size=512 * 1024)
    assert len(seen) == 2 and (seen[0] or "").startswith("store full") and seen[1] is None


# ---------------------------------------------------------------------------- data dir


READ_ONLY_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from nexus_fast.store import LmdbStore, Put, StoreReadOnly

    async def main():
        store = LmdbStore(sys.argv[1], read_only=True)
        await store.open()
        try:
            print(store.get("nodes", b"n").decode(), store.last_event_index)
            try:
                store.commit([Put("nodes", b"m", b"w")])
            except StoreReadOnly:
                print("read-only")
            await store.backup(sys.argv[2])
        finally:
            await store.close()

    asyncio.run(main())
    """
)


def test_second_open_of_a_data_dir_is_refused_naming_the_holder(tmp_path: Path) -> None:
    async def body(s: LmdbStore) -> None:
        await s.commit([Put("nodes", b"n", b"v")], [b"e"])
        other = LmdbStore(s.path, map_size=16 * MB)
        with pytest.raises(StoreLocked) as info:
            await other.open()
        assert str(s.path) in str(info.value) and f"pid {os.getpid()}" in str(info.value)
        assert (s.path / lmdb_store.LOCK_FILE).read_text().strip() == str(os.getpid())
        # Read-only tools skip the lock: another process reads and backs up the held store
        # (another process because LMDB allows one open of an environment per process).
        loop = asyncio.get_running_loop()
        out = await loop.run_in_executor(
            None,
            lambda: subprocess.run(
                [sys.executable, "-c", READ_ONLY_CHILD, str(s.path), str(tmp_path / "bk")],
                capture_output=True,
                text=True,
                env=child_env(),
                timeout=60,
            ),
        )
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["v", "1", "read-only"]
        assert len(list((tmp_path / "bk").iterdir())) == 1

    with_store(tmp_path, body)

    async def reopen() -> None:  # closing released the lock
        again = LmdbStore(tmp_path / "db", map_size=16 * MB)
        await again.open()
        assert again.get("nodes", b"n") == b"v"
        await again.close()

    run(reopen())


def test_read_only_open_of_a_missing_store_fails_cleanly(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="no database at"):
        run(LmdbStore(tmp_path / "absent", read_only=True).open())
    assert not (tmp_path / "absent").exists()


@pytest.mark.parametrize("kind", ["file", "unwritable"])
def test_unusable_db_path_is_one_store_error(tmp_path: Path, kind: str) -> None:
    if kind == "file":
        path = tmp_path / "plain"
        path.write_text("not a directory")
        pattern = "not a directory"
    else:
        path = Path("/proc/nope")
        pattern = "cannot create database directory /proc/nope"
    with pytest.raises(StoreError, match=pattern):
        run(LmdbStore(path).open())


def test_data_at_rest_is_created_private(tmp_path: Path) -> None:
    old = os.umask(0o022)  # the usual umask: it would leave 0755/0644 behind
    try:

        async def body(s: LmdbStore) -> None:
            await s.commit([Put("nodes", b"n", b"v")])
            backup = await s.backup(tmp_path / "backups")
            assert stat.S_IMODE((tmp_path / "backups").stat().st_mode) == 0o700
            assert stat.S_IMODE(backup.stat().st_mode) == 0o700
            assert stat.S_IMODE((backup / "data.mdb").stat().st_mode) == 0o600

        with_store(tmp_path, body)
    finally:
        os.umask(old)
    path = tmp_path / "db"
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    for name in ("data.mdb", "lock.mdb", lmdb_store.LOCK_FILE):
        assert stat.S_IMODE((path / name).stat().st_mode) == 0o600, name


# ---------------------------------------------------------------------------- bounds, close


def test_store_busy_when_queue_full(tmp_path: Path) -> None:
    async def body(s: LmdbStore) -> None:
        futs = [s.commit([Put("nodes", b"%d" % i, b"")]) for i in range(10)]
        with pytest.raises(StoreBusy):
            s.commit([Put("nodes", b"one-too-many", b"")])
        await asyncio.gather(*futs)
        await s.commit([Put("nodes", b"room-again", b"")])  # resolved requests free slots
        assert s.count("nodes") == 11

    with_store(tmp_path, body, max_queue=10)


def test_close_flushes_pending_and_is_idempotent(tmp_path: Path) -> None:
    async def main() -> None:
        path = tmp_path / "db"
        s = LmdbStore(path, map_size=4 * MB)
        await s.open()
        futs = [s.commit([Put("agents", b"a%04d" % i, b"v")], [b"e"]) for i in range(500)]
        await asyncio.gather(s.close(), s.close())  # concurrent closes share one shutdown
        assert all(f.done() and not f.exception() for f in futs)
        assert futs[-1].result() == CommitResult(500, 500)
        await s.close()
        assert not s.healthy()
        with pytest.raises(StoreClosed):
            s.commit([Put("agents", b"late", b"")])
        with pytest.raises(StoreClosed):
            s.get("agents", b"a0000")

        s2 = LmdbStore(path, map_size=4 * MB)
        await s2.open()
        assert s2.count("agents") == 500 and s2.last_event_index == 500
        await s2.close()

    run(main())


DURABILITY_CHILD = textwrap.dedent(
    """
    import asyncio, sys, uvloop
    from nexus_fast.store import LmdbStore, Put

    async def worker(store, w):
        i = 0
        while True:
            key = b"w%d-%d" % (w, i)
            r = await store.commit([Put("commands", key, b"v")], [key])
            print(key.decode(), r.first_event_index, flush=True)
            i += 1

    async def main():
        store = LmdbStore(sys.argv[1], map_size=1 << 22)
        await store.open()
        await asyncio.gather(*(worker(store, w) for w in range(50)))

    uvloop.run(main())
    """
)


def test_acknowledged_writes_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "db"
    child = subprocess.Popen(
        [sys.executable, "-c", DURABILITY_CHILD, str(path)],
        stdout=subprocess.PIPE,
        env=child_env(),
    )
    assert child.stdout is not None
    acked: list[tuple[bytes, int]] = []
    try:
        while len(acked) < 1500:
            line = child.stdout.readline()
            assert line, "child died before acknowledging enough writes"
            key, index = line.split()
            acked.append((key, int(index)))
    finally:
        child.send_signal(signal.SIGKILL)  # no close(), no atexit: only fsync protects us
        rest = child.stdout.read()
        child.wait()
    for line in rest.split(b"\n")[:-1]:  # the last piece may be a torn line
        key, index = line.split()
        acked.append((key, int(index)))

    async def check() -> None:
        s = LmdbStore(path, map_size=1 << 22)
        await s.open()
        try:
            for key, index in acked:
                assert s.get("commands", key) == b"v", key
                assert s.events_since(index - 1, 1) == [(index, key)]
            assert s.last_event_index >= max(i for _, i in acked)
        finally:
            await s.close()

    run(check())


# ---------------------------------------------------------------------------- maintenance

READER_CHILD = textwrap.dedent(
    """
    import sys, time, lmdb
    env = lmdb.open(sys.argv[1], max_dbs=32, max_readers=512)
    txn = env.begin()
    print("ready", flush=True)
    time.sleep(60)
    """
)


def test_reader_check_clears_slot_of_killed_process(tmp_path: Path) -> None:
    async def body(s: LmdbStore) -> None:
        await s.commit([Put("nodes", b"n", b"v")])
        child = subprocess.Popen(
            [sys.executable, "-c", READER_CHILD, str(s.path)],
            stdout=subprocess.PIPE,
            env=child_env(),
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"ready\n"
        child.kill()
        child.wait()
        assert s.reader_check() == 1
        assert s.reader_check() == 0

    with_store(tmp_path, body)


def test_backup_is_openable_and_rotated(tmp_path: Path) -> None:
    async def body(s: LmdbStore) -> None:
        await s.commit([Put("nodes", b"n%d" % i, b"v%d" % i) for i in range(100)], [b"ev"])
        dest = tmp_path / "backups"
        backups0 = metric("backup")
        made = []
        for i in range(4):
            await s.commit([Put("meta", b"generation", b"%d" % i)])
            made.append(await s.backup(dest, keep=3))
        assert metric("backup") - backups0 == 4
        kept = sorted(p.name for p in dest.iterdir())
        assert kept == sorted(p.name for p in made[1:])  # oldest rotated away
        env = lmdb.open(str(made[-1]), readonly=True, max_dbs=32, lock=False)
        try:
            with env.begin() as txn:
                nodes = env.open_db(b"nodes", txn=txn, create=False)
                meta = env.open_db(b"meta", txn=txn, create=False)
                assert txn.get(b"n42", db=nodes) == b"v42"
                assert txn.get(b"generation", db=meta) == b"3"
                assert txn.get(b"last_event_index", db=meta) == event_key(1)
        finally:
            env.close()
        # A backup opens as a store too, with its event numbering intact.
        copy = LmdbStore(made[-1], map_size=4 * MB)
        await copy.open()
        assert copy.last_event_index == 1 and copy.count("nodes") == 100
        await copy.close()

    with_store(tmp_path, body)


def test_backup_during_growth_does_not_deadlock(tmp_path: Path) -> None:
    async def body(s: LmdbStore) -> None:
        value = os.urandom(3000)
        writes = asyncio.gather(
            *(s.commit([Put("nodes", b"k%05d" % i, value)]) for i in range(1500))
        )
        backups = [await s.backup(tmp_path / "bk", keep=2) for _ in range(3)]
        await writes
        assert s.count("nodes") == 1500 and len(backups) == 3
        assert len(list((tmp_path / "bk").iterdir())) == 2

    with_store(tmp_path, body, map_size=64 * 1024, max_map_size=64 * MB)


def test_size_and_health_figures(tmp_path: Path) -> None:
    async def body(s: LmdbStore) -> None:
        before = s.size_bytes()
        await s.commit([Put("nodes", b"%d" % i, b"x" * 500) for i in range(200)])
        after = s.size_bytes()
        assert after > before
        sample = REGISTRY.get_sample_value("nexus_db_size_bytes")
        assert sample == after
        st = s.stat()
        assert st["backend"] == "lmdb" and st["pending_requests"] == 0
        assert st["readers"] >= 0 and st["map_size"] == s.map_size

    with_store(tmp_path, body)


def test_writer_thread_is_the_only_writer(tmp_path: Path) -> None:
    writer_threads: set[str] = set()
    real_apply = LmdbStore._apply

    def spy(self: LmdbStore, batch: Any, base: int) -> Any:
        writer_threads.add(threading.current_thread().name)
        return real_apply(self, batch, base)

    async def body(s: LmdbStore) -> None:
        s._apply = spy.__get__(s)  # type: ignore[method-assign]
        await asyncio.gather(*(s.commit([Put("nodes", b"%d" % i, b"")]) for i in range(50)))
        fut = s.commit([Put("nodes", b"nb", b"")])
        # commit() never blocks: it hands back a pending future; the writer thread resolves
        # it through the loop, which cannot happen before this coroutine yields.
        assert not fut.done()
        await fut

    with_store(tmp_path, body)
    assert len(writer_threads) == 1 and next(iter(writer_threads)).startswith("lmdb-writer")


# The writer re-raises what killed it (so it shows in the log): expected here.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_writer_is_reported_as_a_failure(tmp_path: Path) -> None:
    seen: list[str | None] = []

    async def body(s: LmdbStore) -> None:
        s.on_failure = seen.append

        def crash(batch: Any) -> None:
            raise SystemExit("simulated writer death")  # not an Exception: the thread ends

        s._process = crash  # type: ignore[method-assign]
        with pytest.raises(StoreError, match="writer thread died"):
            await s.commit([Put("nodes", b"n", b"v")])
        for _ in range(100):  # the failure report is scheduled on the loop after the crash
            if seen:
                break
            await asyncio.sleep(0.01)
        assert not s.healthy() and "writer thread died" in (s.failure or "")
        assert seen and "writer thread died" in (seen[0] or "")

    with_store(tmp_path, body)


# ---------------------------------------------------------------------------- audit chain


def _rec(i: int, outcome: str = "ok") -> AuditRecord:
    return AuditRecord("op", "operator", "ipv4:127.0.0.1:1", "M", f"t{i}", f"r{i}", outcome, i)


def test_audit_records_commit_with_their_change_and_chain_across_reopen(tmp_path: Path) -> None:
    async def first(s: LmdbStore) -> None:
        futs = [s.commit([Put("nodes", b"n%d" % i, b"v")], [], [_rec(i)]) for i in range(5)]
        await asyncio.gather(*futs)
        await s.commit((), (), [_rec(5), _rec(6)])  # a refusal: records alone
        assert s.audit_head.seq == 7 and s.count("audit") == 7

    async def second(s: LmdbStore) -> None:
        assert s.audit_head.seq == 7  # read back from the newest entry at open
        await s.commit([Put("nodes", b"x", b"v")], [b"e"], [_rec(7)])
        entries = s.scan("audit")
        assert verify(entries) is None  # one unbroken chain over both opens
        assert [audit_seq(k) for k, _ in entries] == list(range(1, 9))
        assert [t for _, _, body in s.audit_since(0, 100, 1 << 20)
                for t in [orjson.loads(body)["target"]]] == [f"t{i}" for i in range(8)]  # fmt: skip

    with_store(tmp_path, first)
    with_store(tmp_path, second)


def test_failed_txn_keeps_neither_change_nor_audit_and_leaves_no_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(s: LmdbStore) -> None:
        await s.commit([Put("nodes", b"a", b"v")], [], [_rec(0)])

        def boom(*_: Any) -> int:
            raise RuntimeError("disk on fire")

        monkeypatch.setattr(writer, "_delete_range", boom)
        fut = s.commit([Put("nodes", b"b", b"v"), DeleteRange("agents", b"", None)], [], [_rec(1)])
        with pytest.raises(StoreError, match="disk on fire"):
            await fut
        monkeypatch.undo()
        assert s.get("nodes", b"b") is None and s.count("audit") == 1
        await s.commit([Put("nodes", b"c", b"v")], [], [_rec(2)])
        entries = s.scan("audit")
        assert verify(entries) is None and [audit_seq(k) for k, _ in entries] == [1, 2]

    with_store(tmp_path, body)


def test_audit_table_is_append_only_through_commit(tmp_path: Path) -> None:
    async def body(s: LmdbStore) -> None:
        for bad in (
            Put("audit", b"\0" * 8, b"x"),
            Delete("audit", b"\0" * 8),
            DeleteRange("audit", b"", None),
        ):
            with pytest.raises(ValueError, match="audit"):
                s.commit([bad])
        with pytest.raises(ValueError, match="AuditRecord"):
            s.commit((), (), ["not a record"])  # type: ignore[list-item]
        assert s.count("audit") == 0 and s.healthy()

    with_store(tmp_path, body)


def test_audit_pages_are_bounded_by_count_and_bytes(tmp_path: Path) -> None:
    async def body(s: LmdbStore) -> None:
        await s.commit((), (), [_rec(i) for i in range(20)])
        assert [seq for seq, _, _ in s.audit_since(5, 3, 1 << 20)] == [6, 7, 8]
        one = len(s.audit_since(0, 1, 1 << 20)[0][2]) + 32
        assert [seq for seq, _, _ in s.audit_since(0, 100, 3 * one)] == [1, 2, 3]
        assert len(s.audit_since(0, 100, 1)) == 1  # one entry always, however small the cap
        assert s.audit_since(20, 10, 1 << 20) == []

    with_store(tmp_path, body)


def test_every_mutating_method_is_audited_by_its_permission() -> None:
    for method, permission in GRPC_METHODS.items():
        expected = not permission.endswith(".read") and permission != "public"
        # The hot node stream, and the relay that carries node streams between replicas.
        expected = expected and not method.endswith(("/Connect", "/Relay"))
        assert (method in AUDITED_GRPC_METHODS) == expected, method
    assert {"submit"} == AUDITED_WS_OPS
    assert WS_PRINCIPAL_KEY == PRINCIPAL_KEY
