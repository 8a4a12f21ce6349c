"""The writer hand-off: one ``LmdbStore.commit()`` in flight vs the same synced txn bare.

Each round commits one small ``Put`` (200 B) and one event and awaits the future on a
uvloop loop; the bare side opens the same kind of LMDB environment (sync on, same
filesystem) and runs the same txn in the calling thread. ``commit - bare`` is what the
hand-off costs: the request queue, the writer thread waking, the future resolved back on
the loop. ``BUSY=1`` keeps the loop busy between commits with a Python task (a server's
gRPC and bookkeeping work holding the GIL), which is where the GIL hand-over shows.

    NEXUS_REQUIRE_EXTENSIONS=1 .venv/bin/python bench/store_handoff.py [rounds] [repeats]

Rounds alternate A/B (store, bare, store, bare, ...) so a noisy machine hits both alike.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lmdb
import uvloop

from nexus_fast.store import LmdbStore, Put

VALUE = b"v" * 200
BUSY = os.environ.get("BUSY") == "1"
SWITCH = float(os.environ.get("SWITCH", "0"))  # sys.setswitchinterval, seconds (0: default)


def _pcts(samples: list[float]) -> str:
    s = sorted(samples)
    n = len(s)

    def at(q: float) -> float:
        return s[min(n - 1, int(q * n))] * 1e6

    return f"p50 {at(0.5):7.1f} us  p90 {at(0.9):7.1f}  p99 {at(0.99):7.1f}  mean {statistics.fmean(s) * 1e6:7.1f}"


async def _busy(stop: asyncio.Event) -> None:
    # Pure Python work in slices of ~0.2 ms, as a server's request handling would be.
    while not stop.is_set():
        t = time.perf_counter() + 0.0002
        while time.perf_counter() < t:
            pass
        await asyncio.sleep(0)


async def _store_rounds(store: LmdbStore, rounds: int, base: int) -> list[float]:
    out = []
    for i in range(rounds):
        key = f"k{base + i:09d}".encode()
        t0 = time.perf_counter()
        await store.commit([Put("nodes", key, VALUE)], [b"event"])
        out.append(time.perf_counter() - t0)
        await asyncio.sleep(0)
    return out


def _bare_rounds(env: lmdb.Environment, db: lmdb._Database, rounds: int, base: int) -> list[float]:
    out = []
    for i in range(rounds):
        key = f"k{base + i:09d}".encode()
        t0 = time.perf_counter()
        with env.begin(write=True) as txn:
            txn.put(key, VALUE, db=db)
            txn.put(b"e" + key, b"event", db=db)
        out.append(time.perf_counter() - t0)
    return out


async def main(rounds: int, repeats: int) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="handoff-", dir=os.environ.get("TMPDIR")))
    store = LmdbStore(tmp / "store", map_size=1 << 26)
    await store.open()
    env = lmdb.open(str(tmp / "bare"), map_size=1 << 26, sync=True, metasync=True, max_dbs=2)
    db = env.open_db(b"kv")
    stop = asyncio.Event()
    busy = asyncio.create_task(_busy(stop)) if BUSY else None
    ours: list[float] = []
    bare: list[float] = []
    try:
        await _store_rounds(store, 50, 10**8)  # warm-up
        for r in range(repeats):
            ours += await _store_rounds(store, rounds, r * rounds)
            bare += _bare_rounds(env, db, rounds, r * rounds)
    finally:
        stop.set()
        if busy is not None:
            await busy
        await store.close()
        env.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"commit() awaited : {_pcts(ours)}")
    print(f"bare synced txn  : {_pcts(bare)}")
    d50 = statistics.median(ours) - statistics.median(bare)
    print(
        f"hand-off (p50 commit - p50 bare): {d50 * 1e6:.1f} us; busy loop: {BUSY}; "
        f"switch interval {sys.getswitchinterval() * 1e3:g} ms"
    )


if __name__ == "__main__":
    if SWITCH:
        sys.setswitchinterval(SWITCH)
    uvloop.install()
    asyncio.run(
        main(
            int(sys.argv[1]) if len(sys.argv) > 1 else 500,
            int(sys.argv[2]) if len(sys.argv) > 2 else 4,
        )
    )
