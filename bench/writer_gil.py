"""How often a writer thread gets the GIL while the loop thread runs Python without pause.

A thread commits one-put synced LMDB txns back to back for one second while the main thread
spins in Python (a busy event loop). py-lmdb releases the GIL for the commit, but the
writer needs it back after every fsync: with CPython's switch interval (5 ms by default)
each time can cost up to one interval. Prints commits/s for each interval given.

    .venv/bin/python bench/writer_gil.py 0.005 0.001 0.0005
"""

from __future__ import annotations

import sys
import tempfile
import threading
import time

import lmdb


def run(interval: float) -> tuple[int, float]:
    """Commits in one second of spinning, and the spinner's rate vs spinning alone."""
    sys.setswitchinterval(interval)
    tmp = tempfile.TemporaryDirectory(prefix="writer-gil-")
    env = lmdb.open(tmp.name, map_size=1 << 26, sync=True)
    stop = threading.Event()
    commits = [0]

    def writer() -> None:
        i = 0
        while not stop.is_set():
            with env.begin(write=True) as txn:
                txn.put(b"k%d" % i, b"v" * 200)
            i += 1
        commits[0] = i

    def spin(seconds: float) -> int:
        n, end = 0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            n += 1
        return n

    alone = spin(1.0)
    thread = threading.Thread(target=writer)
    thread.start()
    shared = spin(1.0)
    stop.set()
    thread.join()
    env.close()
    tmp.cleanup()
    return commits[0], shared / alone


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["0.005", "0.0005"]:
        n, share = run(float(arg))
        print(f"switch interval {float(arg) * 1e3:g} ms: {n} commits/s, spinner at {share:.2f}")
