"""Scoring one placement over 100 .. 100k nodes: compiled vs numpy twin vs a Python loop.

Baselines measured in the same run: a plain Python loop over the same feature-major data
(what the scheduler would be without numpy or Cython), and "bare numpy": the same score
terms written directly over the same arrays with no tie-break, no weight skipping and no
input checks (the floor a vectorised scorer of this layout can reach; the target is
the selector within 1.5x of it at 10k). ``selector`` is ``nexus_fast.scoring.pick_best``,
what the scheduler calls: the compiled twin whenever it is built.

The fleet: four node shapes, random reservations (free rows, scored) and usage above them
(available rows, filtered), 0..20 tasks per node, 2% not schedulable, all heartbeats fresh;
the request asks for 1 cpu and 2 GiB; default [scheduler] weights. Both baselines filter on
the available rows and score on the free rows, as the kernel does.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from numpy.typing import NDArray

from nexus_fast import scoring
from nexus_fast._compat import NO_EXTENSIONS
from nexus_fast.benchmark.scenarios import micro
from nexus_fast.scoring import ROW_AVAIL, ROW_CAP, ROW_FREE, ROW_TASKS

SIZES = [100, 1_000, 10_000, 100_000]
IMPLS = ["numpy", "selector", "python-loop", "bare-numpy"] + ([] if NO_EXTENSIONS else ["c"])
NOW = 1_000_000.0
TIMEOUT = 30.0
REQ = (1.0, 2.0, 0.0, 0.0)
W = (1.0, 0.0, 0.5, 1.0, 0.1)  # least, most, balanced, spread, fresh (the config defaults)


def fleet(n: int) -> tuple[NDArray[np.float32], NDArray[np.uint8], NDArray[np.float64], float]:
    """The fleet ``nexus-bench micro`` scores too (one definition), and its t_max."""
    feat, mask, heartbeat, now = micro.fleet(n)
    assert now == NOW
    return feat, mask, heartbeat, 20.0


def python_loop(feat: Any, n: int, mask: Any, hb: Any, t_max: float) -> int:
    """The same scoring as plain Python over the same arrays (as lists): no ties handled."""
    free = [feat[ROW_FREE + j, :n].tolist() for j in range(2)]
    avail = [feat[ROW_AVAIL + j, :n].tolist() for j in range(2)]
    cap = [feat[ROW_CAP + j, :n].tolist() for j in range(2)]
    tasks, ok, beats = feat[ROW_TASKS, :n].tolist(), mask[:n].tolist(), hb[:n].tolist()
    best, best_i = -1.0, -1
    for i in range(n):
        if not ok[i] or avail[0][i] < REQ[0] or avail[1][i] < REQ[1]:
            continue
        a = (free[0][i] - REQ[0]) / cap[0][i]
        b = (free[1][i] - REQ[1]) / cap[1][i]
        least = (a + b + (t_max - tasks[i]) / (t_max + 1)) / 3
        fresh = min(1.0, max(0.0, 2 * (1 - (NOW - beats[i]) / TIMEOUT)))
        score = W[0] * least + W[2] * (1 - abs(a - b)) + W[4] * fresh
        if score > best:
            best, best_i = score, i
    return best_i


def bare_numpy(feat: Any, n: int, mask: Any, hb: Any, t_max: float) -> int:
    f = feat[:, :n]
    ok = (mask[:n] != 0) & (f[ROW_AVAIL] >= REQ[0]) & (f[ROW_AVAIL + 1] >= REQ[1])
    a = (f[ROW_FREE] - REQ[0]) / f[ROW_CAP]
    b = (f[ROW_FREE + 1] - REQ[1]) / f[ROW_CAP + 1]
    least = (a + b + (t_max - f[ROW_TASKS]) / (t_max + 1)) / 3
    fresh = np.clip(2 * (1 - (NOW - hb[:n]) / TIMEOUT), 0, 1)
    score = W[0] * least + W[2] * (1 - np.abs(a - b)) + W[4] * fresh
    score[~ok] = -np.inf
    return int(np.argmax(score))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("impl", IMPLS)
def test_score_one_placement(benchmark: Any, load_twin: Any, impl: str, n: int) -> None:
    feat, mask, hb, t_max = fleet(n)
    benchmark.group = f"score {n} nodes"
    if impl == "python-loop":
        if n > 10_000:
            benchmark.pedantic(python_loop, (feat, n, mask, hb, t_max), rounds=3)
        else:
            benchmark(python_loop, feat, n, mask, hb, t_max)
        return
    if impl == "bare-numpy":
        assert bare_numpy(feat, n, mask, hb, t_max) >= 0
        benchmark(bare_numpy, feat, n, mask, hb, t_max)
        return
    twin = scoring if impl == "selector" else load_twin("scoring", "c" if impl == "c" else "py")
    pick, query = twin.pick_best, twin.Query
    rand = random.Random(1)

    def run() -> int:
        # One Query per placement, as the scheduler builds it.
        return int(
            pick(feat, n, mask, hb, query(REQ, W, NOW, TIMEOUT, t_max, 0.0, rand.getrandbits(62)))
        )

    assert run() >= 0
    benchmark(run)
