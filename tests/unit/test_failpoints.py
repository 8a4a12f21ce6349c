"""Failpoints: the spec grammar, the triggers, each action, and the store's sites.

The store tests run a real LmdbStore (real writer thread, real LMDB) with a failpoint set.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import lmdb
import pytest
import uvloop

from nexus_fast import failpoints
from nexus_fast.store import LmdbStore, Put, StoreError, StoreFull
from nexus_fast.store.datadir import is_disk_full

T = TypeVar("T")
MB = 1 << 20


@pytest.fixture(autouse=True)
def cleared() -> Iterator[None]:
    failpoints.configure("")
    yield
    failpoints.configure("")


def run(coro: Coroutine[Any, Any, T]) -> T:
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(asyncio.wait_for(coro, 30))


# ---------------------------------------------------------------------------- grammar


def test_parse_round_trips_every_form() -> None:
    spec = (
        "store.after_commit=crash@5%;stream.send=delay(50ms);store.commit=error*3;"
        "store.before_commit=error(enospc)@2;store.writer_stall=pause"
    )
    points = failpoints.configure(spec)
    assert [p.name for p in points] == [
        "store.after_commit",
        "stream.send",
        "store.commit",
        "store.before_commit",
        "store.writer_stall",
    ]
    assert failpoints.ACTIVE
    assert failpoints.describe() == (
        "store.after_commit=crash@5%;stream.send=delay(50ms);store.commit=error*3;"
        "store.before_commit=error(enospc)@2;store.writer_stall=pause"
    )
    assert points[1].delay_s == pytest.approx(0.05)
    assert points[0].probability == pytest.approx(0.05)
    failpoints.configure("")
    assert not failpoints.ACTIVE and failpoints.snapshot() == []


@pytest.mark.parametrize(
    ("spec", "words"),
    [
        ("nope=crash", "unknown name 'nope'"),
        ("store.commit=explode", "unknown action 'explode'"),
        ("store.commit", "expected name=action"),
        ("store.commit=delay", "needs a duration"),
        ("store.commit=delay(soon)", "malformed duration"),
        ("store.commit=crash@0%", "probability"),
        ("store.commit=crash@0", "counts hits from 1"),
        ("store.commit=crash*0", "N >= 1"),
        ("store.commit=crash(x)", "takes no argument"),
        ("store.commit=error(eperm)", "error takes no argument or (enospc)"),
        ("commands.before_reply=error", "has no error to raise"),
        ("store.commit=crash;store.commit=pause", "set twice"),
    ],
)
def test_bad_specs_are_refused_and_change_nothing(spec: str, words: str) -> None:
    failpoints.configure("stream.send=delay(1ms)")
    with pytest.raises(ValueError) as info:
        failpoints.configure(spec)
    assert words in str(info.value), info.value
    assert failpoints.describe() == "stream.send=delay(1ms)"


def test_triggers_nth_times_and_probability() -> None:
    failpoints.configure(
        "store.commit=error@3;store.before_commit=error*2;store.map_grow=error@50%"
    )
    fired = []
    for i in range(1, 6):
        try:
            failpoints.hit("store.commit")
        except lmdb.Error:
            fired.append(i)
    assert fired == [3]
    fired = []
    for i in range(1, 6):
        try:
            failpoints.hit("store.before_commit")
        except lmdb.Error:
            fired.append(i)
    assert fired == [1, 2]
    count = 0
    for _ in range(2000):
        try:
            failpoints.hit("store.map_grow")
        except lmdb.Error:
            count += 1
    assert 700 < count < 1300  # ~1000; outside this once in ~10^40 runs
    by_name = {p["name"]: p for p in failpoints.snapshot()}
    assert by_name["store.commit"]["hits"] == 5 and by_name["store.commit"]["fired"] == 1
    assert by_name["store.map_grow"]["fired"] == count


def test_errors_are_what_the_site_sees() -> None:
    failpoints.configure("store.commit=error(enospc);store.backup=error;stream.send=error")
    with pytest.raises(lmdb.Error) as info:
        failpoints.hit("store.commit")
    assert is_disk_full(info.value)
    with pytest.raises(OSError):
        failpoints.hit("store.backup")
    from nexus_fast.errors import Unavailable

    with pytest.raises(Unavailable):
        run(failpoints.hit_async("stream.send"))


def test_pause_blocks_a_thread_until_cleared() -> None:
    failpoints.configure("store.writer_stall=pause")
    passed = threading.Event()

    def site() -> None:
        failpoints.hit("store.writer_stall")
        passed.set()

    thread = threading.Thread(target=site, daemon=True)
    thread.start()
    assert not passed.wait(0.2)  # held
    failpoints.configure("")
    assert passed.wait(10)
    thread.join(10)


def test_pause_on_the_loop_suspends_only_its_task() -> None:
    async def main() -> list[str]:
        failpoints.configure("stream.send=pause")
        order: list[str] = []

        async def site() -> None:
            await failpoints.hit_async("stream.send")
            order.append("site")

        task = asyncio.create_task(site())
        for _ in range(5):
            await asyncio.sleep(0.01)
            order.append("loop")  # the loop keeps running while the site is paused
        failpoints.configure("")
        await asyncio.wait_for(task, 5)
        return order

    order = run(main())
    assert order[:5] == ["loop"] * 5 and order[-1] == "site"


def test_delay_on_the_loop_awaits() -> None:
    async def main() -> bool:
        failpoints.configure("stream.send=delay(100ms)")
        task = asyncio.create_task(failpoints.hit_async("stream.send"))
        await asyncio.sleep(0)
        running = not task.done()  # it is sleeping, and we run meanwhile
        await asyncio.wait_for(task, 5)
        return running

    assert run(main())


def test_crash_exits_at_once_with_one_line() -> None:
    code = (
        "from nexus_fast import failpoints\n"
        "failpoints.configure('store.after_commit=crash@2')\n"
        "failpoints.hit('store.after_commit')\n"
        "print('first hit passed', flush=True)\n"
        "failpoints.hit('store.after_commit')\n"
        "print('never printed')\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == failpoints.CRASH_EXIT_CODE, proc.stderr
    assert proc.stdout == "first hit passed\n"
    assert "failpoint store.after_commit: crash" in proc.stderr


# ---------------------------------------------------------------------------- store sites


def test_store_commit_error_fails_one_batch_and_the_store_recovers(tmp_path: Path) -> None:
    async def main() -> None:
        store = LmdbStore(tmp_path / "db", map_size=4 * MB)
        await store.open()
        try:
            await store.commit([Put("nodes", b"a", b"1")])
            failpoints.configure("store.commit=error*1")
            with pytest.raises(StoreError, match=r"failpoint store\.commit"):
                await store.commit([Put("nodes", b"b", b"2")])
            assert not store.healthy()
            await store.commit([Put("nodes", b"c", b"3")])  # *1: the next one passes
            assert store.healthy()
            assert store.get("nodes", b"b") is None  # the failed txn was aborted
            assert store.get("nodes", b"c") == b"3"

            failpoints.configure("store.before_commit=error(enospc)*1")
            with pytest.raises(StoreFull, match="no space left"):
                await store.commit([Put("nodes", b"d", b"4")])
            assert store.failure is not None and store.failure.startswith("store full")
            assert store.get("nodes", b"a") == b"1"  # reads keep serving
            await store.commit([Put("nodes", b"d", b"4")])
            assert store.healthy()
        finally:
            await store.close()

    run(main())


def test_map_grow_error_fails_the_batch_and_a_later_growth_succeeds(tmp_path: Path) -> None:
    async def main() -> None:
        store = LmdbStore(tmp_path / "db", map_size=1 * MB, max_map_size=64 * MB)
        await store.open()
        try:
            failpoints.configure("store.map_grow=error*1")
            big = [Put("nodes", b"k%04d" % i, bytes(4096)) for i in range(400)]  # ~2 MB
            with pytest.raises(StoreError, match="map resize failed"):
                await store.commit(big)
            await store.commit(big)
            assert store.map_size > 1 * MB and store.healthy()
        finally:
            await store.close()

    run(main())


def test_paused_writer_blocks_the_writer_not_the_loop(tmp_path: Path) -> None:
    async def main() -> None:
        store = LmdbStore(tmp_path / "db", map_size=4 * MB)
        await store.open()
        try:
            await store.commit([Put("nodes", b"a", b"1")])
            failpoints.configure("store.before_commit=pause")
            pending = store.commit([Put("nodes", b"b", b"2")])
            ticks = 0
            for _ in range(10):
                await asyncio.sleep(0.01)
                ticks += 1
                assert store.get("nodes", b"a") == b"1"  # reads serve while writes wait
            assert not pending.done() and ticks == 10
            failpoints.configure("")
            await asyncio.wait_for(pending, 10)
            assert store.get("nodes", b"b") == b"2"
        finally:
            await store.close()

    run(main())


def test_backup_error_fails_that_backup_only(tmp_path: Path) -> None:
    async def main() -> None:
        store = LmdbStore(tmp_path / "db", map_size=4 * MB)
        await store.open()
        try:
            await store.commit([Put("nodes", b"a", b"1")])
            failpoints.configure("store.backup=error@1")
            with pytest.raises(OSError, match=r"failpoint store\.backup"):
                await store.backup(tmp_path / "backups")
            assert not list((tmp_path / "backups").iterdir())  # no half-written copy left
            copy = await store.backup(tmp_path / "backups")  # @1: the next one works
            assert (copy / "data.mdb").stat().st_size > 0
            await store.commit([Put("nodes", b"b", b"2")])  # writes never noticed
            assert store.healthy()
        finally:
            await store.close()

    run(main())
