"""The batch placement kernel (``PlaceRun``), run against both twins (``scoring_impl``).

A run scores the fleet once, then each pick is an argmax over cached scores and only the
reserved node is scored again. The oracle is the per-pick full scan: after every
reservation, ``pick_best`` over the whole fleet (same ``r``, same ``t_max``) must choose the
very node the run chose, and that node's score must be the best of the plain-loop model's
full rescoring at that moment (``model_scores``, tests/unit/test_scoring.py).
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus_fast import scoring
from nexus_fast._compat import NO_EXTENSIONS
from nexus_fast._scoring_py import N_ROWS, ROW_AVAIL, ROW_CAP, ROW_FREE, ROW_TASKS

from .test_scoring import model_scores

F32 = np.float32
NOW = 1000.0
TIMEOUT = 30.0
SPREAD_W = (1.0, 0.0, 0.5, 0.0, 0.1)  # the [scheduler] defaults (no spread key in a run)
BINPACK_W = (0.0, 1.0, 0.0, 0.0, 0.1)


def reserve(feat: Any, slot: int, req: tuple[float, ...], t_max: float) -> float:
    """What the scheduler's ``_reserve_slot`` does to the matrix; returns the new t_max."""
    for j in range(4):
        for row in (ROW_FREE, ROW_AVAIL):
            feat[row + j, slot] = max(feat[row + j, slot] - F32(req[j]), F32(0))
    feat[ROW_TASKS, slot] += 1
    return max(t_max, float(feat[ROW_TASKS, slot]))


def fleet(n: int, cap: float = 4.0) -> tuple[Any, Any, Any]:
    feat = np.zeros((N_ROWS, n), F32)
    feat[ROW_CAP : ROW_CAP + 4] = cap
    feat[ROW_FREE : ROW_FREE + 4] = cap
    feat[ROW_AVAIL : ROW_AVAIL + 4] = cap
    return feat, np.ones(n, np.uint8), np.full(n, NOW, np.float64)


def query(impl: ModuleType, req: Any, w: Any, t_max: float, r: int = 0) -> Any:
    return impl.Query(req, w, NOW, TIMEOUT, t_max, 0.0, r)


def run_picks(
    impl: ModuleType, feat: Any, n: int, mask: Any, hb: Any, req: Any, w: Any, draws: list[int]
) -> list[int]:
    """Place ``len(draws)`` like requests with a run, reserving as the scheduler does."""
    t_max = float(feat[ROW_TASKS, :n].max(initial=0))
    run = impl.PlaceRun(feat, n, mask, hb, query(impl, req, w, t_max))
    picks = []
    for r in draws:
        slot = run.best(r)
        picks.append(slot)
        if slot >= 0:
            t_max = reserve(feat, slot, req, t_max)
            run.rescore(slot, t_max)
    return picks


def test_validation_and_empty_fleet(scoring_impl: ModuleType) -> None:
    feat, mask, hb = fleet(4)
    q = query(scoring_impl, (0, 0, 0, 0), SPREAD_W, 0.0)
    empty = scoring_impl.PlaceRun(feat, 0, mask, hb, q)
    assert empty.best(3) == -1 and empty.score_all() == 0
    run = scoring_impl.PlaceRun(feat, 4, mask, hb, q)
    assert run.score_all() == 4
    for bad in (-1, 4):
        with pytest.raises(ValueError):
            run.rescore(bad, 0.0)
    for bad_r in (-1, 2**63):
        with pytest.raises(ValueError):
            run.best(bad_r)
    with pytest.raises(ValueError):
        scoring_impl.PlaceRun(feat, 5, mask, hb, q)
    with pytest.raises(ValueError):
        scoring_impl.PlaceRun(feat, 4, mask[:2], hb, q)


def test_spreads_then_fills_and_fails(scoring_impl: ModuleType) -> None:
    """Identical nodes: one task each before any gets a second (the tied list empties and
    is rebuilt), then -1 once nothing fits, and the run never over-commits."""
    n = 6
    feat, mask, hb = fleet(n, cap=2.0)
    mask[4] = 0
    picks = run_picks(scoring_impl, feat, n, mask, hb, (1.0, 0, 0, 0), SPREAD_W, list(range(12)))
    assert sorted(picks[:5]) == [0, 1, 2, 3, 5]
    assert sorted(picks[5:10]) == [0, 1, 2, 3, 5]
    assert picks[10:] == [-1, -1]
    assert feat[ROW_FREE, :n].min() == 0.0 and feat[ROW_TASKS, 4] == 0


def test_binpack_keeps_filling_one_node(scoring_impl: ModuleType) -> None:
    """Most-allocated: the reserved node's score RISES, so it stays the best until full."""
    n = 5
    feat, mask, hb = fleet(n, cap=3.0)
    picks = run_picks(scoring_impl, feat, n, mask, hb, (1.0, 0, 0, 0), BINPACK_W, [7] * 7)
    assert picks[:3] == [picks[0]] * 3 and picks[3:6] == [picks[3]] * 3
    assert picks[0] != picks[3]


def test_rescore_moves_nodes_in_and_out_of_the_tie(scoring_impl: ModuleType) -> None:
    """Columns changed by the caller (releases here): a node rises above the best, another
    joins it in the tie, the tie breaks in index order; t_max kept, so no full rescan."""
    n = 4
    feat, mask, hb = fleet(n)
    feat[ROW_TASKS] = 2.0
    run = scoring_impl.PlaceRun(feat, n, mask, hb, query(scoring_impl, (0, 0, 0, 0), SPREAD_W, 2))
    assert [run.best(r) for r in range(4)] == [0, 1, 2, 3]
    feat[ROW_TASKS, 2] = 1.0
    run.rescore(2, 2.0)
    assert {run.best(r) for r in range(4)} == {2}
    feat[ROW_TASKS, 0] = 1.0
    run.rescore(0, 2.0)
    assert [run.best(r) for r in range(4)] == [0, 2, 0, 2]
    feat[ROW_TASKS, 2] = 2.0
    run.rescore(2, 2.0)
    assert {run.best(r) for r in range(4)} == {0}
    feat[ROW_TASKS, 0] = 2.0
    run.rescore(0, 2.0)  # the last best node drops: the tie is rebuilt from the cache
    assert [run.best(r) for r in range(4)] == [0, 1, 2, 3]


def test_large_fleet_runs_the_block_loop_without_the_gil(scoring_impl: ModuleType) -> None:
    n = 5000  # above the compiled twin's nogil threshold, many 256-node blocks
    feat, mask, hb = fleet(n)
    feat[ROW_TASKS] = np.arange(n) % 4
    mask[::7] = 0
    hb[1000:1100] = NOW - 20.0
    draws = [3, 2**61, 0, 99, 12345]
    check = feat.copy()
    picks = run_picks(scoring_impl, feat, n, mask, hb, (0.5, 1.0, 0, 0), SPREAD_W, draws)
    t_max = 3.0
    for slot, r in zip(picks, draws):
        q = query(scoring_impl, (0.5, 1.0, 0, 0), SPREAD_W, t_max, r)
        assert scoring_impl.pick_best(check, n, mask, hb, q) == slot
        t_max = reserve(check, slot, (0.5, 1.0, 0, 0), t_max)


# ----------------------------------------------------------------------- properties

VALUES = st.sampled_from([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 0.1, 1 / 3])


@st.composite
def runs(draw: st.DrawFn) -> tuple[Any, ...]:
    """A fleet, a request, weights and the random draws of a run (few values: many ties)."""
    n = draw(st.integers(0, 20))
    feat = np.zeros((N_ROWS, n), F32)
    for j in range(4):
        for i in range(n):
            cap = draw(st.sampled_from([1.0, 2.0, 4.0, 1e-6] if j >= 2 else [1.0, 2.0, 4.0]))
            feat[ROW_CAP + j, i] = cap
            free = min(F32(cap), F32(draw(VALUES)))
            feat[ROW_FREE + j, i] = free
            feat[ROW_AVAIL + j, i] = min(free, F32(draw(VALUES))) if draw(st.booleans()) else free
    feat[ROW_TASKS] = draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    if n and draw(st.booleans()):
        feat[:] = feat[:, :1]  # identical nodes, as a fleet of one shape: ties everywhere
    mask = np.array(draw(st.lists(st.booleans(), min_size=n, max_size=n)), np.uint8)
    if draw(st.booleans()):
        mask[:] = 1
    ages = draw(st.lists(st.sampled_from([0.0, 5.0, 17.5, 29.0, 31.0]), min_size=n, max_size=n))
    hb = NOW - np.array(ages, np.float64)
    req = tuple(draw(st.sampled_from([0.0, 0.0, 0.5, 1.0, 0.1])) for _ in range(4))
    w = tuple(draw(st.sampled_from([0.0, 1.0, 0.5, 0.1, 2.0])) for _ in range(5))
    draws = draw(st.lists(st.integers(0, 2**62), min_size=1, max_size=30))
    return feat, n, mask, hb, req, w, draws


@given(runs())
def test_each_pick_is_the_full_scan_pick(scoring_impl: ModuleType, case: tuple[Any, ...]) -> None:
    """Pick by pick, the run equals the per-pick full scan (``pick_best``, same ``r``), and
    the node's score is the max of the model's full rescoring at that moment."""
    feat, n, mask, hb, req, w, draws = case
    oracle = feat.copy()
    picks = run_picks(scoring_impl, feat, n, mask, hb, req, w, draws)
    t_max = float(oracle[ROW_TASKS, :n].max(initial=0))
    for slot, r in zip(picks, draws):
        q = query(scoring_impl, req, w, t_max, r)
        assert slot == scoring_impl.pick_best(oracle, n, mask, hb, q)
        scores = model_scores(oracle, n, mask, hb, q)
        if slot < 0:
            assert not scores
            continue
        assert scores[slot] == max(scores.values())
        t_max = reserve(oracle, slot, req, t_max)
    assert np.array_equal(feat, oracle)  # same reservations: the run never over-commits


@given(runs(), st.lists(st.tuples(st.integers(0, 19), st.integers(-2, 2)), max_size=30))
def test_rescore_follows_any_column_change(
    scoring_impl: ModuleType, case: tuple[Any, ...], changes: list[tuple[int, int]]
) -> None:
    """``rescore`` of a node that was NOT picked, its score up, down or equal to the best
    (reserve or release ``k`` tasks of the request): the next pick is still the full scan's."""
    feat, n, mask, hb, req, w, draws = case
    if n == 0:
        return
    t_max = float(feat[ROW_TASKS, :n].max(initial=0))
    run = scoring_impl.PlaceRun(feat, n, mask, hb, query(scoring_impl, req, w, t_max))
    for (at, k), r in zip(changes, draws * 30):
        slot = at % n
        for row in range(4):
            cap = feat[ROW_CAP + row, slot]
            for base in (ROW_FREE, ROW_AVAIL):
                v = feat[base + row, slot] - F32(k) * F32(req[row])
                feat[base + row, slot] = min(max(v, F32(0)), cap)
        feat[ROW_TASKS, slot] = max(feat[ROW_TASKS, slot] + k, 0)
        t_max = float(feat[ROW_TASKS, :n].max())
        run.rescore(slot, t_max)
        q = query(scoring_impl, req, w, t_max, r)
        assert run.best(r) == scoring_impl.pick_best(feat, n, mask, hb, q)


def test_selector_exports_the_twin_it_selects() -> None:
    twin = importlib.import_module(f"nexus_fast._scoring_{scoring.IMPLEMENTATION}")
    assert scoring.PlaceRun is twin.PlaceRun


if not NO_EXTENSIONS:

    @given(runs())
    def test_compiled_and_numpy_runs_agree(case: tuple[Any, ...]) -> None:
        """Same inputs, same random draws: the same slots from both twins, pick by pick."""
        c = importlib.import_module("nexus_fast._scoring_c")
        py = importlib.import_module("nexus_fast._scoring_py")
        feat, n, mask, hb, req, w, draws = case
        py_feat = feat.copy()
        got = run_picks(c, feat, n, mask, hb, req, w, draws)
        assert got == run_picks(py, py_feat, n, mask, hb, req, w, draws)
        assert np.array_equal(feat, py_feat)

    @given(st.integers(0, 2**32), st.integers(1, 3000), st.integers(1, 200))
    def test_runs_agree_on_random_fleets(seed: int, n: int, count: int) -> None:
        """Continuous random values (few exact ties): the cached scores agree bit for bit."""
        c = importlib.import_module("nexus_fast._scoring_c")
        py = importlib.import_module("nexus_fast._scoring_py")
        rng = np.random.default_rng(seed)
        feat = np.zeros((N_ROWS, n), F32)
        cap = rng.choice(np.array([1, 2, 4, 8, 96], F32), size=(4, n))
        feat[ROW_CAP : ROW_CAP + 4] = cap
        feat[ROW_FREE : ROW_FREE + 4] = cap * rng.random((4, n), F32)
        feat[ROW_AVAIL : ROW_AVAIL + 4] = feat[ROW_FREE : ROW_FREE + 4] * rng.random((4, n), F32)
        feat[ROW_TASKS] = rng.integers(0, 5, n)
        mask = (rng.random(n) < 0.9).astype(np.uint8)
        hb = NOW - rng.random(n) * 40.0
        req = tuple(float(v) for v in rng.choice([0.0, 0.3, 1.0], size=4))
        w = tuple(float(v) for v in rng.choice([0.0, 0.1, 0.7, 1.0], size=5))
        draws = [int(v) for v in rng.integers(0, 2**62, count)]
        py_feat = feat.copy()
        got = run_picks(c, feat, n, mask, hb, req, w, draws)
        assert got == run_picks(py, py_feat, n, mask, hb, req, w, draws)
