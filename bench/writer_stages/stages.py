"""Where one store commit's time goes inside a running server: the writer hand-off traced.

``trace.patch`` (next to this file) adds time stamps to the store: ``commit()`` enqueues,
the writer thread wakes with the first request of a batch, the txn body is built, the txn
committed (fsync), the loop runs ``_resolve``. With ``NEXUS_HANDOFF_TRACE=/tmp/hot`` set,
each process writes them to ``/tmp/hot.<pid>`` at exit; this script prints the stages:

    git apply bench/writer_stages/trace.patch
    NEXUS_HANDOFF_TRACE=/tmp/hot .venv/bin/nexus-bench roundtrip --spawn --count 1000
    .venv/bin/python bench/writer_stages/stages.py /tmp/hot
    git apply -R bench/writer_stages/trace.patch

Measurement only: the patch is never committed to the store itself.
"""

from __future__ import annotations

import bisect
import glob
import json
import statistics
import sys


def _pcts(samples: list[float]) -> str:
    s = sorted(samples)
    n = len(s)
    return (
        f"p50 {s[n // 2] * 1e6:7.1f}  p90 {s[int(n * 0.9)] * 1e6:7.1f}  "
        f"p99 {s[int(n * 0.99)] * 1e6:7.1f}  mean {statistics.fmean(s) * 1e6:7.1f} us (n={n})"
    )


def main(prefix: str) -> None:
    for name in sorted(glob.glob(prefix + ".*")):
        with open(name) as f:
            d = json.load(f)
        enq, wake, done, resolved, body = d["e"], d["w"], d["c"], d["r"], d.get("x", [])
        if not wake:
            continue  # a process without a store (nexus-node, the bench client)
        print(f"{name}: {len(enq)} commits in {len(wake)} txns")
        waits: list[float] = []
        n = min(len(wake), len(done), len(resolved), len(body))
        for k in range(n):
            # The request that woke the writer: the newest enqueued before it woke, if it
            # came after the previous txn (else it waited behind that txn's fsync).
            i = bisect.bisect_right(enq, wake[k]) - 1
            if i >= 0 and (k == 0 or enq[i] > done[k - 1]):
                waits.append(wake[k] - enq[i])
        print("  enqueue -> writer awake   ", _pcts(waits))
        print("  txn body (Python, GIL)    ", _pcts([body[k] - wake[k] for k in range(n)]))
        print("  txn commit (fsync x2)     ", _pcts([done[k] - body[k] for k in range(n)]))
        print("  committed -> loop resolves", _pcts([resolved[k] - done[k] for k in range(n)]))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/tmp/hot")
