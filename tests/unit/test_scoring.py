"""Node scoring, run against both twins (``scoring_impl``) and a plain-loop model.

The model recomputes every score with Python loops over the same float32 values (numpy
float32 scalars, the same operations in the same order as documented in
``nexus_fast/_scoring_py.py``), so twins and model must agree on the index exactly,
ties included.
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
from nexus_fast._scoring_py import N_ROWS, ROW_AVAIL, ROW_CAP, ROW_FREE, ROW_TASKS, Query

F32 = np.float32
NOW = 1000.0
TIMEOUT = 30.0


def model_pick(feat: Any, n: int, mask: Any, hb: Any, query: Any, spread: Any = None) -> int:
    """Trivially correct reference: one node at a time, float32 scalars throughout.

    ``query`` is either twin's ``Query`` (only its fields are read).
    """
    scores = model_scores(feat, n, mask, hb, query, spread)
    if not scores:
        return -1
    best = max(scores.values())
    tied = [i for i, s in scores.items() if s == best]
    return tied[query.r % len(tied)]


def model_scores(
    feat: Any, n: int, mask: Any, hb: Any, query: Any, spread: Any = None
) -> dict[int, Any]:
    """Every feasible node's score (float32), computed one node at a time."""
    req = [F32(v) for v in query.req]
    w = [F32(v) for v in query.weights]
    now, timeout, t_max, s_max = query.now, query.node_timeout, query.t_max, query.s_max
    counted = [0, 1] + [j for j in (2, 3) if req[j] > 0]
    scores: dict[int, Any] = {}
    for i in range(n):
        # the filter reads availability (usage counts), the score free (reservations only)
        avail = [feat[ROW_AVAIL + j, i] for j in range(4)]
        if not mask[i] or any(req[j] > 0 and not avail[j] >= req[j] for j in range(4)):
            continue
        fracs = [(feat[ROW_FREE + j, i] - req[j]) / feat[ROW_CAP + j, i] for j in counted]
        total = fracs[0]
        for f in fracs[1:]:
            total = total + f
        tm = F32(t_max)
        total = total + (tm - feat[ROW_TASKS, i]) / (tm + F32(1))
        least = total / F32(len(counted) + 1)
        score = F32(0)
        if w[0] != 0:
            score = score + w[0] * least
        if w[1] != 0:
            score = score + w[1] * (F32(1) - least)
        if w[2] != 0:
            score = score + w[2] * (F32(1) - (max(fracs) - min(fracs)))
        if w[3] != 0 and spread is not None:
            sm = F32(s_max)
            score = score + (w[3] * ((sm - spread[i]) / sm) if sm > 0 else w[3])
        if w[4] != 0:
            x = min(1.0, max(0.0, (float(hb[i]) - (now - timeout)) * (2.0 / timeout)))
            score = score + w[4] * F32(x)
        scores[i] = score
    return scores


def fleet(
    n: int,
    *,
    cap: float = 4.0,
    free: float | None = None,
    tasks: float = 0.0,
    size: int | None = None,
) -> tuple[Any, Any, Any]:
    size = n if size is None else size
    feat = np.zeros((N_ROWS, size), F32)
    feat[ROW_CAP : ROW_CAP + 4] = cap
    feat[ROW_FREE : ROW_FREE + 4] = cap if free is None else free
    feat[ROW_AVAIL : ROW_AVAIL + 4] = feat[ROW_FREE : ROW_FREE + 4]
    feat[ROW_TASKS] = tasks
    return feat, np.ones(size, np.uint8), np.full(size, NOW, np.float64)


def call(impl: ModuleType, feat: Any, n: int, mask: Any, hb: Any, **kw: Any) -> int:
    query = impl.Query(
        kw.get("req", (0.0, 0.0, 0.0, 0.0)),
        kw.get("w", (1.0, 0.0, 0.5, 1.0, 0.1)),
        kw.get("now", NOW),
        TIMEOUT,
        kw.get("t_max", float(feat[ROW_TASKS, :n].max(initial=0))),
        kw.get("s_max", 0.0),
        kw.get("r", 0),
    )
    return int(impl.pick_best(feat, n, mask, hb, query, kw.get("spread")))


def test_empty_and_infeasible(scoring_impl: ModuleType) -> None:
    feat, mask, hb = fleet(4)
    assert call(scoring_impl, feat, 0, mask, hb) == -1
    assert call(scoring_impl, feat, 4, np.zeros(4, np.uint8), hb) == -1
    assert call(scoring_impl, feat, 4, mask, hb, req=(5.0, 0, 0, 0)) == -1
    assert call(scoring_impl, feat, 4, mask, hb, req=(0, 0, 1.0, 0)) in range(4)


def test_single_node_and_bounds(scoring_impl: ModuleType) -> None:
    feat, mask, hb = fleet(1)
    assert call(scoring_impl, feat, 1, mask, hb, r=12345) == 0
    with pytest.raises(ValueError):
        call(scoring_impl, feat, 2, mask, hb)
    with pytest.raises(ValueError):
        call(scoring_impl, feat, -1, mask, hb)
    with pytest.raises(ValueError):
        call(scoring_impl, feat, 1, mask, hb, r=-1)
    big, bmask, bhb = fleet(8)
    with pytest.raises(ValueError):
        call(scoring_impl, big, 8, bmask[:4], bhb)
    with pytest.raises(ValueError):
        call(scoring_impl, big, 8, bmask, bhb[:4])
    with pytest.raises(ValueError):
        call(scoring_impl, big, 8, bmask, bhb, spread=np.zeros(4, F32), s_max=1.0)


def test_query_fields_validation_and_immutability(scoring_impl: ModuleType) -> None:
    query = scoring_impl.Query([1.0, 2, 0, 0], [1, 0, 0.5, 1, 0.1], NOW, TIMEOUT, 3, 1.5, 2**63 - 1)
    assert query.req == (1.0, 2, 0, 0) and query.weights == (1, 0, 0.5, 1, 0.1)
    assert (query.now, query.node_timeout, query.t_max, query.s_max) == (NOW, TIMEOUT, 3, 1.5)
    assert query.r == 2**63 - 1
    assert repr(query) == repr(Query(*[getattr(query, f) for f in Query.__dataclass_fields__]))
    with pytest.raises(AttributeError):
        query.r = 1
    good = ((0, 0, 0, 0), (1, 0, 0, 0, 0), NOW, TIMEOUT, 0.0)
    assert scoring_impl.Query(*good).s_max == 0.0 and scoring_impl.Query(*good).r == 0
    for bad in (
        {"req": (0, 0, 0)},
        {"weights": (1, 0, 0, 0, 0, 0)},
        {"node_timeout": 0.0},
        {"node_timeout": float("nan")},
        {"r": -1},
        {"r": 2**63},
    ):
        fields = dict(zip(("req", "weights", "now", "node_timeout", "t_max"), good), **bad)
        with pytest.raises(ValueError):
            scoring_impl.Query(**fields)


def test_only_first_n_columns_are_read(scoring_impl: ModuleType) -> None:
    feat, mask, hb = fleet(3, size=16)
    feat[ROW_FREE, 3:] = 100.0  # would win, but is beyond n
    feat[ROW_AVAIL, 3:] = 100.0
    feat[ROW_CAP, 3:] = 100.0
    assert call(scoring_impl, feat, 3, mask, hb, req=(1.0, 0, 0, 0)) in range(3)


def test_least_allocated_prefers_free_node(scoring_impl: ModuleType) -> None:
    feat, mask, hb = fleet(3)
    feat[ROW_FREE] = feat[ROW_AVAIL] = [1.0, 3.0, 2.0]
    assert call(scoring_impl, feat, 3, mask, hb, req=(1.0, 0, 0, 0), w=(1, 0, 0, 0, 0)) == 1
    assert call(scoring_impl, feat, 3, mask, hb, req=(1.0, 0, 0, 0), w=(0, 1, 0, 0, 0)) == 0


def test_filter_reads_avail_and_score_reads_free(scoring_impl: ModuleType) -> None:
    feat, mask, hb = fleet(3)
    feat[ROW_FREE] = [4.0, 4.0, 2.0]  # unreserved
    feat[ROW_AVAIL] = [0.5, 4.0, 2.0]  # node 0's usage report shows it nearly full
    w = (1, 0, 0, 0, 0)
    # filter: node 0 cannot take 1 cpu, whatever its score
    got = {call(scoring_impl, feat, 3, mask, hb, req=(1.0, 0, 0, 0), w=w, r=r) for r in range(6)}
    assert got == {1}
    # score: usage does not rank nodes, nodes 0 and 1 tie on their reservations
    got = {call(scoring_impl, feat, 3, mask, hb, req=(0.5, 0, 0, 0), w=w, r=r) for r in range(6)}
    assert got == {0, 1}
    feat[ROW_AVAIL, 1] = 0.0  # full by usage on cpu: still fits a request without cpu
    assert call(scoring_impl, feat, 3, mask, hb, req=(0.5, 0, 0, 0), w=w) == 0
    assert call(scoring_impl, feat, 3, mask, hb, req=(0, 1.0, 0, 0), w=w, r=1) == 1
    assert call(scoring_impl, feat, 3, mask, hb, req=(0.6, 0, 0, 0), w=w) == 2


def test_tasks_term_spreads_zero_requests(scoring_impl: ModuleType) -> None:
    feat, mask, hb = fleet(4)
    feat[ROW_TASKS] = [3, 2, 5, 3]
    assert call(scoring_impl, feat, 4, mask, hb, w=(1, 0, 0, 0, 0)) == 1
    assert call(scoring_impl, feat, 4, mask, hb, w=(0, 1, 0, 0, 0)) == 2


def test_balanced_prefers_even_use(scoring_impl: ModuleType) -> None:
    feat, mask, hb = fleet(2)
    feat[ROW_FREE] = feat[ROW_AVAIL] = [1.0, 2.0]  # node 1: cpu and memory half used after
    feat[ROW_FREE + 1] = feat[ROW_AVAIL + 1] = [4.0, 4.0]
    got = call(scoring_impl, feat, 2, mask, hb, req=(0, 2.0, 0, 0), w=(0, 0, 1, 0, 0))
    assert got == 1


def test_spread_prefers_low_count(scoring_impl: ModuleType) -> None:
    feat, mask, hb = fleet(3)
    spread = np.array([2, 0, 1], F32)
    assert call(scoring_impl, feat, 3, mask, hb, spread=spread, s_max=2.0, w=(0, 0, 0, 1, 0)) == 1


def test_freshness_penalises_only_missed_heartbeats(scoring_impl: ModuleType) -> None:
    feat, mask, hb = fleet(3)
    hb[:] = [NOW - 14.0, NOW - 29.0, NOW - 20.0]  # within half a timeout: fully fresh
    assert call(scoring_impl, feat, 3, mask, hb, w=(0, 0, 0, 0, 1)) == 0
    # 1 s and 14 s old are both within half a timeout: they tie, jitter does not reorder
    hb[:] = [NOW - 1.0, NOW - 14.0, NOW - 29.0]
    assert {call(scoring_impl, feat, 3, mask, hb, w=(0, 0, 0, 0, 1), r=r) for r in range(4)} == {
        0,
        1,
    }


def test_tie_break_is_r_mod_ties_in_index_order(scoring_impl: ModuleType) -> None:
    feat, mask, hb = fleet(6)
    mask[1] = 0
    mask[4] = 0
    tied = [0, 2, 3, 5]
    for r in range(12):
        assert call(scoring_impl, feat, 6, mask, hb, r=r) == tied[r % 4]
    assert call(scoring_impl, feat, 6, mask, hb, r=2**62 + 1) == tied[(2**62 + 1) % 4]


@pytest.mark.parametrize("n", [255, 256, 257, 513, 1000])
def test_ties_and_best_across_blocks(scoring_impl: ModuleType, n: int) -> None:
    """Fleets longer than the compiled twin's 256-node blocks: ties spanning blocks, a
    best node in the last block, infeasible nodes at the block edges."""
    feat, mask, hb = fleet(n, tasks=1.0)
    mask[[0, 255 % n, n - 1]] = 0
    for r in (0, 1, 254, 255, 256, n - 4, 2**62 + 7):
        query = Query((0, 0, 0, 0), (1, 0, 0.5, 1, 0.1), NOW, TIMEOUT, 1.0, 0.0, r)
        assert call(scoring_impl, feat, n, mask, hb, r=r) == model_pick(feat, n, mask, hb, query)
    feat[ROW_TASKS, n - 3] = 0.0  # one node with a free task slot: the only best
    assert call(scoring_impl, feat, n, mask, hb, t_max=1.0, r=3) == n - 3


def test_freshness_per_block(scoring_impl: ModuleType) -> None:
    """Fully fresh blocks next to blocks with stale nodes score like the model."""
    n = 700
    feat, mask, hb = fleet(n)
    feat[ROW_TASKS] = np.arange(n) % 3
    hb[300:310] = NOW - 20.0  # stale-ish nodes in the second block only
    hb[650] = NOW - 29.0
    for w in ((0, 0, 0, 0, 1), (1, 0, 0.5, 0, 0.1), (0, 1, 0, 0, 2)):
        for r in (0, 5, 2**40):
            query = scoring_impl.Query((0, 0, 0, 0), w, NOW, TIMEOUT, 2.0, 0.0, r)
            assert scoring_impl.pick_best(feat, n, mask, hb, query) == model_pick(
                feat, n, mask, hb, query
            )


def test_bool_mask_accepted_by_selector() -> None:
    feat, mask, hb = fleet(3)
    query = scoring.Query((0, 0, 0, 0), (1, 0, 0, 0, 0), NOW, TIMEOUT, 0.0, 0.0, 4)
    assert scoring.pick_best(feat, 3, mask.astype(bool), hb, query) == 1


def test_selector_uses_the_compiled_twin_at_every_size(monkeypatch: pytest.MonkeyPatch) -> None:
    assert scoring.IMPLEMENTATION in ({"py"} if NO_EXTENSIONS else {"c"})
    seen: list[str] = []
    py = importlib.import_module("nexus_fast._scoring_py")

    def numpy_pick(*args: Any) -> int:
        seen.append("py")
        return int(py.pick_best(*args))

    monkeypatch.setattr(scoring, "_numpy_pick", numpy_pick)
    for n in (10, 1 << 20):
        feat, mask, hb = fleet(n)
        call(scoring, feat, n, mask, hb)
    assert seen == (["py", "py"] if NO_EXTENSIONS else [])


# ----------------------------------------------------------------------- properties

VALUES = st.sampled_from([0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 0.1, 1 / 3])


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Any, ...]:
    n = draw(st.integers(0, 24))
    size = n + draw(st.integers(0, 3))
    feat = np.zeros((N_ROWS, size), F32)
    for j in range(4):
        for i in range(size):
            # few distinct values, so exact ties are common
            cap = draw(st.sampled_from([1.0, 2.0, 4.0, 1e-6] if j >= 2 else [1.0, 2.0, 4.0, 3.0]))
            feat[ROW_CAP + j, i] = cap
            free = min(F32(cap), F32(draw(VALUES)))
            feat[ROW_FREE + j, i] = free
            # avail <= free: usage above the reservations half of the time
            feat[ROW_AVAIL + j, i] = min(free, F32(draw(VALUES))) if draw(st.booleans()) else free
    tasks = draw(st.lists(st.integers(0, 5), min_size=size, max_size=size))
    feat[ROW_TASKS] = tasks
    t_max = float(max(tasks, default=0)) + draw(st.sampled_from([0, 0, 2]))
    mask = np.array(draw(st.lists(st.booleans(), min_size=size, max_size=size)), np.uint8)
    if draw(st.booleans()):
        mask[:] = 1
    spread = None
    s_max = 0.0
    if draw(st.booleans()):
        spread = np.array(draw(st.lists(st.integers(0, 3), min_size=size, max_size=size)), F32)
        s_max = float(spread.max(initial=0)) + draw(st.sampled_from([0, 1]))
    ages = draw(
        st.lists(st.sampled_from([0.0, 5.0, 15.0, 17.5, 29.0, 31.0]), min_size=size, max_size=size)
    )
    hb = NOW - np.array(ages, np.float64)
    req = tuple(draw(st.sampled_from([0.0, 0.0, 0.5, 1.0, 0.1, 3.0])) for _ in range(4))
    w = tuple(draw(st.sampled_from([0.0, 1.0, 0.5, 0.1, 2.0])) for _ in range(5))
    r = draw(st.integers(0, 2**62))
    fields = {
        "req": req,
        "weights": w,
        "now": NOW,
        "node_timeout": TIMEOUT,
        "t_max": t_max,
        "s_max": s_max,
        "r": r,
    }
    return feat, n, mask, hb, spread, fields


@given(scenarios())
def test_twin_matches_model(scoring_impl: ModuleType, case: tuple[Any, ...]) -> None:
    feat, n, mask, hb, spread, fields = case
    query = scoring_impl.Query(**fields)
    assert scoring_impl.pick_best(feat, n, mask, hb, query, spread) == model_pick(
        feat, n, mask, hb, query, spread
    )


# Compiled-vs-numpy comparisons exist only where the compiled twin may be used: the
# compiled CI pass runs them, the pure pass (NEXUS_NO_EXTENSIONS=1) does not collect them.
if not NO_EXTENSIONS:

    @given(scenarios())
    def test_compiled_and_numpy_twins_agree(case: tuple[Any, ...]) -> None:
        c = importlib.import_module("nexus_fast._scoring_c")
        py = importlib.import_module("nexus_fast._scoring_py")
        feat, n, mask, hb, spread, fields = case
        c_query = c.Query(**fields)
        got = c.pick_best(feat, n, mask, hb, c_query, spread)
        assert got == py.pick_best(feat, n, mask, hb, py.Query(**fields), spread)
        # The numpy twin also reads the compiled Query (the selector exports that one).
        assert got == py.pick_best(feat, n, mask, hb, c_query, spread)

    @given(st.integers(0, 2**32), st.integers(1, 3000))
    def test_twins_agree_on_random_fleets(seed: int, n: int) -> None:
        """Continuous random values (few exact ties): the rounding must agree bit for bit."""
        c = importlib.import_module("nexus_fast._scoring_c")
        py = importlib.import_module("nexus_fast._scoring_py")
        rng = np.random.default_rng(seed)
        feat = np.zeros((N_ROWS, n), F32)
        cap = rng.choice(np.array([1, 2, 4, 8, 96, 1024], F32), size=(4, n))
        feat[ROW_CAP : ROW_CAP + 4] = cap
        feat[ROW_FREE : ROW_FREE + 4] = cap * rng.random((4, n), F32)
        feat[ROW_AVAIL : ROW_AVAIL + 4] = feat[ROW_FREE : ROW_FREE + 4] * rng.random((4, n), F32)
        feat[ROW_TASKS] = rng.integers(0, 50, n)
        mask = (rng.random(n) < 0.9).astype(np.uint8)
        spread = rng.integers(0, 7, n).astype(F32)
        hb = NOW - rng.random(n) * 40.0
        req = tuple(float(v) for v in rng.choice([0.0, 0.3, 1.0, 2.5], size=4))
        w = tuple(float(v) for v in rng.choice([0.0, 0.1, 0.7, 1.0], size=5))
        fields = (req, w, NOW, TIMEOUT, 49.0, 6.0, seed)
        got = c.pick_best(feat, n, mask, hb, c.Query(*fields), spread)
        assert got == py.pick_best(feat, n, mask, hb, py.Query(*fields), spread)

    def test_compiled_layout_is_the_pure_twins() -> None:
        """The C enum of _ext/_scoring.pxd, as exported, equals the pure twin's constants."""
        c = importlib.import_module("nexus_fast._scoring_c")
        py = importlib.import_module("nexus_fast._scoring_py")
        for name in py.__all__:
            if name.isupper():
                assert getattr(c, name) == getattr(py, name), name
        assert sorted(c.__all__) == sorted(py.__all__)
