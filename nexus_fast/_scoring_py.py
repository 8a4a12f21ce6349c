"""Node scoring, pure twin (numpy-vectorised): the typed source of truth for ``_ext/scoring.pyx``.

``pick_best`` filters and scores every node of a feature-major matrix and returns the index
of the best feasible node, or -1. ``PlaceRun`` places a run of like requests (a batch):
it scores the fleet once, then each pick is an argmax over the cached scores and only the
node just reserved is scored again (semantics in its docstring). Both score through one
routine, ``_scores`` (the compiled twin's ``_block``). The scheduler
(``nexus_fast.core.scheduler``) keeps the matrix up to date incrementally; nothing here
allocates per node or knows node ids.

Inputs
------
``pick_best(feat, n, mask, heartbeat, query, spread=None)``: the arrays are arguments, every
scalar of the placement is in one ``Query`` (what is requested, the weights, the clock, the
fleet maxima and the tie-break). ``feat``: float32, shape ``(N_ROWS, capacity)``, C-contiguous, one row per feature, for each
resource ``j`` (0 cpu, 1 memory, 2 gpu, 3 disk):

- ``ROW_FREE + j``: unreserved capacity, ``cap - reserved`` (what the SCORE reads);
- ``ROW_AVAIL + j``: available capacity, ``cap - max(reported usage, reserved)`` (what the
  FILTER reads);
- ``ROW_CAP + j``: capacity;

and row ``ROW_TASKS`` the number of tasks placed on the node. Only the first ``n`` columns
are read. ``mask`` (uint8, 0 or 1): the node is schedulable, matches the label selector and
is not excluded. ``spread`` (float32 or None): per node, the
number of tasks with the request's spread key already on nodes that share this node's value
of that label, and ``query.s_max`` the largest such count in the fleet. ``query.t_max``: the
largest task count in the fleet. (The scheduler maintains both maxima incrementally, so the kernel needs
no extra pass for them.) ``heartbeat`` (float64): last heartbeat time, on the same clock as
``query.now``. ``query.req`` is the request ``(cpu, memory, gpu, disk)`` and ``query.weights``
the score weights ``(least, most, balanced, spread, fresh)``.
Preconditions (the scheduler guarantees them): finite values, ``0 <= avail <= free <= cap``,
``cap > 0`` for cpu and memory (absent resources are stored with a tiny positive cap),
``0 <= tasks <= t_max``, ``0 <= spread <= s_max``, ``node_timeout > 0``, ``0 <= r < 2**63``.

Score on reservations, filter on max(usage, reserved)
-----------------------------------------------------
Usage reports lag placements (heartbeats come every few seconds; a task placed a moment ago
is not in them yet). A score that read usage would rank a node by what it looked like at its
last heartbeat, so every placement until the next one would herd onto the node that looked
emptiest then (the herd effect: in an end-to-end test, 10,000 zero-request placements on 100
identical nodes landed 23..225 per node instead of ~100). The score therefore reads only the
scheduler's own bookkeeping (reservations and task counts, updated at every placement), as
Kubernetes and Nomad score on requests, not live usage. Usage still matters for feasibility:
a node whose own report shows a resource exhausted (load from outside the fabric, tasks
using more than they asked for) takes no new work that needs that resource, so the filter
reads ``avail``; the ``max`` keeps it never looser than the reservations alone, so a batch
placed between two heartbeats cannot over-commit a node.

Filter
------
``mask[i] != 0`` and ``avail_j >= req_j`` for every resource with ``req_j > 0``.

Score (each term in 0..1; ``score = sum(weight * term)``)
---------------------------------------------------------
``J`` = {cpu, memory} plus every resource the request asks for (``req_j > 0``): cpu and
memory are always scored (every node has them), gpu and disk only when requested, as in
Kubernetes' scoring of extended resources. ``frac_j = (free_j - req_j) / cap_j`` is the
fraction of resource ``j`` still unreserved after the placement (``free``, never ``avail``:
see above; a feasible node has ``free_j >= avail_j >= req_j``, so ``frac_j >= 0``). Tasks:
every placement takes one task slot; with ``T = t_max`` (the fleet's largest task count)
``tasks_term = (T - tasks) / (T + 1)`` (= ``1 - (tasks + 1) / (T + 1)``: the task slots "free
after" the placement relative to the busiest node), so placements that request nothing
still spread evenly and bin-packing still fills one node at a time.

- least_allocated ``L = (sum_{j in J} frac_j + tasks_term) / (|J| + 1)`` (spreads load)
- most_allocated ``M = 1 - L`` (bin-packing: the fullest node that still fits wins)
- balanced ``B = 1 - (max_{j in J} frac_j - min_{j in J} frac_j)``: equal used fractions
  across resources score 1 (Kubernetes' BalancedAllocation, with max-min for the spread)
- spread ``S = 1 - spread_i / s_max`` (1 when ``s_max`` is 0): anti-affinity by label
  value; only when the request has a spread key (``spread`` given)
- freshness ``F = clamp(2 * (1 - age / node_timeout), 0, 1)`` with ``age = now - heartbeat``:
  1 while the node heartbeated within half a timeout (so healthy nodes are never reordered
  by heartbeat jitter), falling linearly to 0 at the timeout.

``score = w_least*L + w_most*M + w_balanced*B + w_spread*S + w_fresh*F``, summed in that order,
terms with weight 0 left out.

Ties: every feasible node whose score equals the best exactly is tied; the caller's random
integer ``query.r`` chooses the ``(r mod n_tied)``-th of them in index order.

Arithmetic (why the twins agree bit for bit): the filter compares float32 with float32
(requests and weights are rounded to float32 first); every score term is computed in float32
with the same operations in the same order in both twins (IEEE-754 add, sub, mul, div, min,
max are correctly rounded, so the results are identical); freshness is computed in float64
and rounded to float32 once. The compiled twin is built with ``-ffp-contract=off`` so the C
compiler never fuses a multiply and an add.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import numpy as np
from numpy.typing import NDArray

__all__ = (
    "N_RESOURCES",
    "N_ROWS",
    "N_WEIGHTS",
    "RESOURCE_NAMES",
    "ROW_AVAIL",
    "ROW_CAP",
    "ROW_FREE",
    "ROW_TASKS",
    "PlaceRun",
    "Query",
    "pick_best",
)

# The matrix rows; _ext/scoring.pxd declares the same values as a C enum for the compiled
# twin (tests/unit/test_scoring.py checks that they agree).
N_RESOURCES: Final = 4
RESOURCE_NAMES: Final = ("cpu", "memory", "gpu", "disk")
ROW_FREE: Final = 0  # cap - reserved: scored
ROW_AVAIL: Final = 4  # cap - max(usage, reserved): filtered
ROW_CAP: Final = 8
ROW_TASKS: Final = 12
N_ROWS: Final = 13
N_WEIGHTS: Final = 5  # least, most, balanced, spread, fresh

_F32 = np.float32


@dataclass(frozen=True, slots=True)
class Query:
    """The scalars of one placement: what it asks for, how nodes are weighed, the clock.

    ``req``: the request ``(cpu, memory, gpu, disk)``; ``weights``: ``(least, most, balanced,
    spread, fresh)``; ``now`` and ``node_timeout``: the heartbeat clock; ``t_max`` /
    ``s_max``: the fleet's largest task count and spread count; ``r``: the tie-break
    (``0 <= r < 2**63``). Both twins export a ``Query`` with these fields, validated on
    construction; each twin's ``pick_best`` reads either.
    """

    req: tuple[float, float, float, float]
    weights: tuple[float, float, float, float, float]
    now: float
    node_timeout: float
    t_max: float
    s_max: float = 0.0
    r: int = 0

    def __post_init__(self) -> None:
        # Any sequence is accepted and kept as a tuple, as the compiled twin does.
        object.__setattr__(self, "req", tuple(self.req))
        object.__setattr__(self, "weights", tuple(self.weights))
        if len(self.req) != N_RESOURCES:
            raise ValueError(f"req needs {N_RESOURCES} values, got {len(self.req)}")
        if len(self.weights) != N_WEIGHTS:
            raise ValueError(f"weights needs {N_WEIGHTS} values, got {len(self.weights)}")
        if not self.node_timeout > 0:
            raise ValueError("node_timeout must be > 0")
        if not 0 <= self.r < 1 << 63:
            raise ValueError("r must be in [0, 2**63)")


def _check(
    feat: NDArray[np.float32],
    n: int,
    mask: NDArray[np.uint8] | NDArray[np.bool_],
    heartbeat: NDArray[np.float64],
    spread: NDArray[np.float32] | None,
) -> None:
    if feat.dtype != np.float32 or feat.ndim != 2 or not feat.flags.c_contiguous:
        raise TypeError("feat must be a C-contiguous 2-D float32 array")
    if feat.shape[0] < N_ROWS:
        raise ValueError(f"feat needs {N_ROWS} rows, got {feat.shape[0]}")
    if n < 0 or n > feat.shape[1]:
        raise ValueError(f"n={n} out of range for {feat.shape[1]} columns")
    if mask.shape[0] < n or heartbeat.shape[0] < n:
        raise ValueError("mask and heartbeat must cover n nodes")
    if spread is not None and spread.shape[0] < n:
        raise ValueError("spread must cover n nodes")
    if heartbeat.dtype != np.float64:
        raise TypeError("heartbeat must be float64")
    if spread is not None and spread.dtype != np.float32:
        raise TypeError("spread must be float32")


def pick_best(
    feat: NDArray[np.float32],
    n: int,
    mask: NDArray[np.uint8] | NDArray[np.bool_],
    heartbeat: NDArray[np.float64],
    query: Query,
    spread: NDArray[np.float32] | None = None,
) -> int:
    """Index (< n) of the best feasible node, or -1 if none is feasible (see module doc)."""
    _check(feat, n, mask, heartbeat, spread)
    score = _scores(feat, 0, n, mask, heartbeat, query, query.t_max, spread)
    if score is None:
        return -1
    tied = np.flatnonzero(score == score.max())
    return int(tied[query.r % tied.shape[0]])


class PlaceRun:
    """Places a run of like requests: one scan scores the fleet, then each pick is an argmax.

    A run is a sequence of placements of ONE request (no spread) over one candidate mask,
    each reserved before the next: ``best(r)`` chooses a node, the caller reserves it
    (its free, available and task rows change in ``feat``), then ``rescore(slot, t_max)``
    re-scores that node alone, the only column that changed. Only ``feat`` columns the
    caller passes to ``rescore`` may change during the run; the mask and heartbeats may not.

    Semantics (the same node set as sequential ``pick_best`` calls): every ``best(r)`` is a
    feasible node whose score is the best among the feasible candidates given every
    reservation made before it; ties are broken as ``pick_best`` breaks them (the
    ``(r mod n_tied)``-th tied node in index order), so with the same ``r`` it returns the
    very node ``pick_best`` would with ``query`` and the current ``t_max``; -1 when no
    candidate fits. The score of a node moves only when its own column does, except for the
    fleet's largest task count ``t_max``, which is in every node's tasks term: when
    ``rescore`` is given a new one, every node is scored again (a full scan, as a
    ``pick_best`` call is). ``query.now`` is read once: one clock for the whole run.

    Construction validates like ``pick_best`` and scores the fleet (``score_all``).
    """

    __slots__ = ("_feat", "_heartbeat", "_mask", "_n", "_query", "_score", "_t_max")

    def __init__(
        self,
        feat: NDArray[np.float32],
        n: int,
        mask: NDArray[np.uint8] | NDArray[np.bool_],
        heartbeat: NDArray[np.float64],
        query: Query,
    ) -> None:
        _check(feat, n, mask, heartbeat, None)
        self._feat = feat
        self._n = n
        self._mask = mask
        self._heartbeat = heartbeat
        self._query = query
        self._t_max = float(query.t_max)
        self._score = np.full(n, -np.inf, _F32)
        self.score_all()

    def score_all(self) -> int:
        """Score every candidate again; returns how many are feasible."""
        score = _scores(
            self._feat, 0, self._n, self._mask, self._heartbeat, self._query, self._t_max, None
        )
        if score is None:
            self._score.fill(-np.inf)
            return 0
        self._score = score
        return int(np.count_nonzero(score > -np.inf))

    def best(self, r: int) -> int:
        """The best feasible node now, ties by ``r`` (``0 <= r < 2**63``); -1 if none fits."""
        if not 0 <= r < 1 << 63:
            raise ValueError("r must be in [0, 2**63)")
        score = self._score
        if self._n == 0:
            return -1
        top = score.max()
        if top == -np.inf:
            return -1
        tied = np.flatnonzero(score == top)
        return int(tied[r % tied.shape[0]])

    def rescore(self, slot: int, t_max: float) -> None:
        """Node ``slot``'s column changed (it was reserved); ``t_max``: the fleet's now."""
        if not 0 <= slot < self._n:
            raise ValueError(f"slot {slot} out of range for {self._n} nodes")
        if t_max != self._t_max:  # every node's tasks term moved: score them all
            self._t_max = float(t_max)
            self.score_all()
            return
        score = _scores(
            self._feat, slot, slot + 1, self._mask, self._heartbeat, self._query, t_max, None
        )
        self._score[slot] = -np.inf if score is None else score[0]


def _scores(
    feat: NDArray[np.float32],
    i0: int,
    i1: int,
    mask: NDArray[np.uint8] | NDArray[np.bool_],
    heartbeat: NDArray[np.float64],
    query: Query,
    t_max: float,
    spread: NDArray[np.float32] | None,
) -> NDArray[np.float32] | None:
    """The scores of nodes ``i0 .. i1 - 1`` (-inf where infeasible), or None if none is feasible.

    The one scoring routine of this twin: ``pick_best`` runs it over the fleet,
    ``PlaceRun`` over the fleet once and then over one node at a time. ``t_max`` is passed
    apart from ``query`` because a run's changes as it reserves (its ``r`` is not read).
    """
    if i1 <= i0:
        return None
    req_cpu, req_mem, req_gpu, req_disk = query.req
    w_least, w_most, w_balanced, w_spread, w_fresh = query.weights
    now, node_timeout, s_max = query.now, query.node_timeout, query.s_max
    req = (_F32(req_cpu), _F32(req_mem), _F32(req_gpu), _F32(req_disk))
    m = mask[i0:i1]
    feas = m.copy() if m.dtype == np.bool_ else m != 0
    for j in range(N_RESOURCES):
        if req[j] > 0:
            feas &= feat[ROW_AVAIL + j, i0:i1] >= req[j]
    n_feasible = int(np.count_nonzero(feas))
    if n_feasible == 0:
        return None

    # frac_j = (free_j - req_j) / cap_j over J; least sums them, balanced takes max - min.
    want_balance = _F32(w_balanced) != 0
    total = hi = lo = _fraction(feat, i0, i1, 0, req[0])
    for j in range(1, N_RESOURCES):
        if j >= 2 and not req[j] > 0:
            continue
        frac = _fraction(feat, i0, i1, j, req[j])
        total = total + frac
        if want_balance:
            hi = np.maximum(hi, frac)
            lo = np.minimum(lo, frac)
    counted = 3 + (req[2] > 0) + (req[3] > 0)  # cpu, memory, tasks, requested gpu/disk
    tmax = _F32(t_max)
    total = total + (tmax - feat[ROW_TASKS, i0:i1]) / (tmax + _F32(1))
    least = total / _F32(counted)

    count = i1 - i0
    score: NDArray[np.float32] | None = None
    w = _F32(w_least)
    if w != 0:
        score = w * least
    w = _F32(w_most)
    if w != 0:
        score = _add(score, w * (_F32(1) - least))
    w = _F32(w_balanced)
    if w != 0:
        score = _add(score, w * (_F32(1) - (hi - lo)))
    w = _F32(w_spread)
    if w != 0 and spread is not None:
        smax = _F32(s_max)
        if smax > 0:
            score = _add(score, w * ((smax - spread[i0:i1]) / smax))
        else:
            score = _add(score, np.full(count, w, _F32))
    w = _F32(w_fresh)
    if w != 0:
        stale = now - node_timeout
        k = 2.0 / node_timeout
        hb = heartbeat[i0:i1]
        # F is monotone in the heartbeat: if the stalest node is fully fresh, all are.
        if (float(hb.min()) - stale) * k >= 1.0:
            score = _add(score, np.full(count, w, _F32))
        else:
            x = (hb - stale) * k
            np.clip(x, 0.0, 1.0, out=x)
            score = _add(score, w * x.astype(_F32))
    if score is None:
        score = np.zeros(count, _F32)
    if n_feasible < count:
        score = np.where(feas, score, _F32(-np.inf))
    return score


def _fraction(
    feat: NDArray[np.float32], i0: int, i1: int, j: int, req: np.float32
) -> NDArray[np.float32]:
    """(free_j - req_j) / cap_j: the fraction of resource j unreserved after the placement."""
    free = feat[ROW_FREE + j, i0:i1]
    return (free - req if req != 0 else free) / feat[ROW_CAP + j, i0:i1]


def _add(score: NDArray[np.float32] | None, term: NDArray[np.float32]) -> NDArray[np.float32]:
    if score is None:
        return term
    score += term
    return score
