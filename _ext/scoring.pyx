# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: extra_compile_args = -ffp-contract=off
"""Node scoring, compiled twin of ``nexus_fast/_scoring_py.py`` (the typed source of truth).

Same inputs, same formulas, same float32 operations in the same order (see that module's
docstring), as a C loop over typed memoryviews: no numpy C-API, no Python objects in the
loop, the GIL released for large fleets. It wins where numpy's per-call overhead dominates
(small fleets); ``nexus_fast.scoring`` picks the faster twin by fleet size.

boundscheck/wraparound are off: every index is in ``[0, n)`` and ``n`` is checked against
every array's length up front (tests/unit/test_scoring.py covers n = 0, 1 and the bounds).
``-ffp-contract=off`` keeps the compiler from fusing multiply-adds, which would round
differently from numpy.
"""

from nexus_fast._scoring_py import (
    N_RESOURCES,
    N_ROWS,
    RESOURCE_NAMES,
    ROW_AVAIL,
    ROW_CAP,
    ROW_FREE,
    ROW_TASKS,
)

__all__ = (
    "N_RESOURCES",
    "N_ROWS",
    "RESOURCE_NAMES",
    "ROW_AVAIL",
    "ROW_CAP",
    "ROW_FREE",
    "ROW_TASKS",
    "pick_best",
)

# Below this many nodes the loop is shorter than releasing and re-taking the GIL.
cdef Py_ssize_t NOGIL_MIN_NODES = 4096

cdef float ONE = 1.0
cdef float ZERO = 0.0


cdef struct Kernel:
    const float* free[4]  # cap - reserved: scored
    const float* avail[4]  # cap - max(usage, reserved): filtered
    const float* cap[4]
    const float* tasks
    const unsigned char* mask
    const float* spread
    const double* heartbeat
    float req[4]
    bint counted[4]
    float n_terms
    float t_max
    float t_div
    float s_max
    float w_least
    float w_most
    float w_balanced
    float w_spread
    float w_fresh
    bint use_spread
    double stale
    double k


cdef inline bint _feasible(const Kernel* p, Py_ssize_t i) noexcept nogil:
    # Branch-free: `&` (not `and`) so the compiler can evaluate all four at once.
    # The filter reads avail (usage counts), the score free (reservations only).
    return (
        (p.mask[i] != 0)
        & ((p.req[0] <= ZERO) | (p.avail[0][i] >= p.req[0]))
        & ((p.req[1] <= ZERO) | (p.avail[1][i] >= p.req[1]))
        & ((p.req[2] <= ZERO) | (p.avail[2][i] >= p.req[2]))
        & ((p.req[3] <= ZERO) | (p.avail[3][i] >= p.req[3]))
    )


cdef inline float _score(const Kernel* p, Py_ssize_t i) noexcept nogil:
    cdef int j
    cdef float frac, total, hi, lo, least
    cdef float score = ZERO
    cdef double x
    frac = (p.free[0][i] - p.req[0]) / p.cap[0][i]
    total = frac
    hi = frac
    lo = frac
    for j in range(1, 4):
        if p.counted[j]:
            frac = (p.free[j][i] - p.req[j]) / p.cap[j][i]
            total = total + frac
            if frac > hi:
                hi = frac
            if frac < lo:
                lo = frac
    total = total + (p.t_max - p.tasks[i]) / p.t_div
    least = total / p.n_terms
    if p.w_least != ZERO:
        score = score + p.w_least * least
    if p.w_most != ZERO:
        score = score + p.w_most * (ONE - least)
    if p.w_balanced != ZERO:
        score = score + p.w_balanced * (ONE - (hi - lo))
    if p.use_spread:
        if p.s_max > ZERO:
            score = score + p.w_spread * ((p.s_max - p.spread[i]) / p.s_max)
        else:
            score = score + p.w_spread
    if p.w_fresh != ZERO:
        x = (p.heartbeat[i] - p.stale) * p.k
        if x > 1.0:
            x = 1.0
        elif x < 0.0:
            x = 0.0
        score = score + p.w_fresh * <float>x
    return score


cdef Py_ssize_t _pick(const Kernel* p, Py_ssize_t n, unsigned long long r) noexcept nogil:
    cdef Py_ssize_t i, n_tied = 0, skip, first = -1
    cdef float score, best = ZERO
    for i in range(n):
        if _feasible(p, i):
            score = _score(p, i)
            if n_tied == 0 or score > best:
                best = score
                n_tied = 1
                first = i
            elif score == best:
                n_tied += 1
    if n_tied <= 1:
        return first  # -1 when nothing is feasible
    skip = <Py_ssize_t>(r % <unsigned long long>n_tied)
    for i in range(first, n):
        if _feasible(p, i) and _score(p, i) == best:
            if skip == 0:
                return i
            skip -= 1
    return -1  # unreachable: the tied nodes were counted above


def pick_best(
    const float[:, ::1] feat,
    Py_ssize_t n,
    const unsigned char[::1] mask,
    const float[::1] spread,
    float s_max,
    const double[::1] heartbeat,
    double now,
    double node_timeout,
    float t_max,
    float req_cpu,
    float req_mem,
    float req_gpu,
    float req_disk,
    float w_least,
    float w_most,
    float w_balanced,
    float w_spread,
    float w_fresh,
    long long r,
):
    """Index (< n) of the best feasible node, or -1 if none is feasible (see _scoring_py)."""
    cdef Kernel p
    cdef int j
    cdef Py_ssize_t best
    if feat.shape[0] < N_ROWS:
        raise ValueError(f"feat needs {N_ROWS} rows, got {feat.shape[0]}")
    if n < 0 or n > feat.shape[1]:
        raise ValueError(f"n={n} out of range for {feat.shape[1]} columns")
    if mask.shape[0] < n or heartbeat.shape[0] < n:
        raise ValueError("mask and heartbeat must cover n nodes")
    if spread is not None and spread.shape[0] < n:
        raise ValueError("spread must cover n nodes")
    if not node_timeout > 0:
        raise ValueError("node_timeout must be > 0")
    if r < 0:
        raise ValueError("r must be >= 0")
    if n == 0:
        return -1
    for j in range(4):
        p.free[j] = &feat[ROW_FREE + j, 0]
        p.avail[j] = &feat[ROW_AVAIL + j, 0]
        p.cap[j] = &feat[ROW_CAP + j, 0]
    p.tasks = &feat[ROW_TASKS, 0]
    p.mask = &mask[0]
    p.heartbeat = &heartbeat[0]
    p.req[0] = req_cpu
    p.req[1] = req_mem
    p.req[2] = req_gpu
    p.req[3] = req_disk
    p.counted[0] = True
    p.counted[1] = True
    p.counted[2] = req_gpu > ZERO
    p.counted[3] = req_disk > ZERO
    p.n_terms = <float>(3 + p.counted[2] + p.counted[3])  # cpu, memory, tasks, gpu?, disk?
    p.t_max = t_max
    p.t_div = t_max + ONE
    p.s_max = s_max
    p.w_least = w_least
    p.w_most = w_most
    p.w_balanced = w_balanced
    p.w_spread = w_spread
    p.w_fresh = w_fresh
    p.use_spread = spread is not None and w_spread != ZERO
    p.spread = &spread[0] if p.use_spread else NULL
    p.stale = now - node_timeout
    p.k = 2.0 / node_timeout
    if n >= NOGIL_MIN_NODES:
        with nogil:
            best = _pick(&p, n, <unsigned long long>r)
    else:
        best = _pick(&p, n, <unsigned long long>r)
    return best
