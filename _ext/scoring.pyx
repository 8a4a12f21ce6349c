# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
# distutils: extra_compile_args = -ffp-contract=off -ftree-vectorize -fvect-cost-model=dynamic
"""Node scoring, compiled twin of ``nexus_fast/_scoring_py.py`` (the typed source of truth).

Same inputs, same formulas, same float32 operations in the same order (see that module's
docstring), as C loops over typed memoryviews: no numpy C-API, no Python objects in the
loops, the GIL released for large fleets. The fleet is processed in blocks of ``BLOCK``
nodes: each block is filtered and scored by one short branch-free loop per operation (every
weight and request test hoisted out of them, terms with weight 0 skipped), which the C
compiler vectorises, then scanned once for the best score. It has almost no per-call cost
and, unlike numpy, makes one pass over the data with no temporaries, so it is the faster
twin at every fleet size measured; ``nexus_fast.scoring`` picks the twin by fleet size.

The scalars of a placement come in one ``Query`` (a cdef class: the request and weights are
converted to C floats once, on construction); the matrix layout is the C enum of
``_ext/_scoring.pxd``, exported here as the same ints as the pure twin's constants.

boundscheck/wraparound are off: every index is in ``[0, n)`` and ``n`` is checked against
every array's length up front (tests/unit/test_scoring.py covers n = 0, 1 and the bounds).
``-ffp-contract=off`` keeps the compiler from fusing multiply-adds, which would round
differently from numpy. ``-ftree-vectorize -fvect-cost-model=dynamic`` let GCC vectorise the
block loops at the build's ``-O2`` (explicit ``-f`` flags win over the ``-O`` level whatever
their order): SIMD add, sub, mul, div, min and max round exactly like their scalar forms,
and nothing is reassociated, so the choices are unchanged.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.math cimport INFINITY

cimport _scoring

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

# The matrix layout of _scoring.pxd, for Python (the same values as _scoring_py's).
N_RESOURCES = _scoring.N_RESOURCES
N_ROWS = _scoring.N_ROWS
N_WEIGHTS = _scoring.N_WEIGHTS
ROW_FREE = _scoring.ROW_FREE
ROW_AVAIL = _scoring.ROW_AVAIL
ROW_CAP = _scoring.ROW_CAP
ROW_TASKS = _scoring.ROW_TASKS
RESOURCE_NAMES = ("cpu", "memory", "gpu", "disk")
_R_LIMIT = 2**63  # a Python int: r must fit the kernel's unsigned tie-break arithmetic

# Below this many nodes the loop is shorter than releasing and re-taking the GIL.
cdef Py_ssize_t NOGIL_MIN_NODES = 4096

cdef float ONE = 1.0
cdef float ZERO = 0.0
cdef float NEG_INF = -INFINITY

# Nodes filtered and scored per inner pass: its buffers (5 x 1 KiB) stay in L1.
cdef enum:
    BLOCK = 256


cdef struct Kernel:
    const float* free[_scoring.N_RESOURCES]  # cap - reserved: scored
    const float* avail[_scoring.N_RESOURCES]  # cap - max(usage, reserved): filtered
    const float* cap[_scoring.N_RESOURCES]
    const float* tasks
    const unsigned char* mask
    const float* spread
    const double* heartbeat
    float req[_scoring.N_RESOURCES]
    bint counted[_scoring.N_RESOURCES]
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


cdef inline void _block(
    const Kernel* p, Py_ssize_t i0, Py_ssize_t m, float* score, int* feas
) noexcept nogil:
    """Filter and score nodes ``i0 .. i0 + m - 1`` (``m <= BLOCK``) into ``feas`` and ``score``.

    One short loop per operation, every weight and request test hoisted out of the loops:
    each loop is branch-free over contiguous float32 rows, so the C compiler vectorises it
    (SSE: 4 nodes per instruction) without changing a single rounding. Every value is
    computed with the same operations in the same order as ``_scoring_py.pick_best``.
    """
    cdef float tot[BLOCK]
    cdef float hi[BLOCK]
    cdef float lo[BLOCK]
    cdef Py_ssize_t k
    cdef int j
    cdef float fr, rq, w, smax
    cdef double x, stale = p.stale, kk = p.k
    cdef const float* fp
    cdef const float* cp
    cdef const float* ap
    cdef const float* sp
    cdef const double* hb = p.heartbeat + i0
    cdef const unsigned char* mk = p.mask + i0
    cdef bint balance = p.w_balanced != ZERO

    # filter: schedulable, and avail_j >= req_j for every requested resource
    for k in range(m):
        feas[k] = mk[k] != 0
    for j in range(_scoring.N_RESOURCES):
        rq = p.req[j]
        if rq > ZERO:
            ap = p.avail[j] + i0
            for k in range(m):
                feas[k] = feas[k] & (ap[k] >= rq)

    # frac_j = (free_j - req_j) / cap_j; total, hi, lo over J
    rq = p.req[0]
    fp = p.free[0] + i0
    cp = p.cap[0] + i0
    for k in range(m):
        tot[k] = (fp[k] - rq) / cp[k]
    if balance:
        for k in range(m):
            hi[k] = tot[k]
            lo[k] = tot[k]
    for j in range(1, _scoring.N_RESOURCES):
        if not p.counted[j]:
            continue
        rq = p.req[j]
        fp = p.free[j] + i0
        cp = p.cap[j] + i0
        if balance:
            for k in range(m):
                fr = (fp[k] - rq) / cp[k]
                tot[k] = tot[k] + fr
                hi[k] = fr if fr > hi[k] else hi[k]
                lo[k] = fr if fr < lo[k] else lo[k]
        else:
            for k in range(m):
                tot[k] = tot[k] + (fp[k] - rq) / cp[k]
    # least = (total + tasks_term) / |J| + 1, kept in tot
    fp = p.tasks + i0
    for k in range(m):
        tot[k] = (tot[k] + (p.t_max - fp[k]) / p.t_div) / p.n_terms

    for k in range(m):
        score[k] = ZERO
    w = p.w_least
    if w != ZERO:
        for k in range(m):
            score[k] = score[k] + w * tot[k]
    w = p.w_most
    if w != ZERO:
        for k in range(m):
            score[k] = score[k] + w * (ONE - tot[k])
    w = p.w_balanced
    if w != ZERO:
        for k in range(m):
            score[k] = score[k] + w * (ONE - (hi[k] - lo[k]))
    if p.use_spread:
        w = p.w_spread
        smax = p.s_max
        if smax > ZERO:
            sp = p.spread + i0
            for k in range(m):
                score[k] = score[k] + w * ((smax - sp[k]) / smax)
        else:
            for k in range(m):
                score[k] = score[k] + w
    w = p.w_fresh
    if w != ZERO:
        # F is monotone in the heartbeat: if the block's stalest node is fully fresh (the
        # common case), every node's F is exactly 1 and its term exactly w (as in numpy).
        x = hb[0]
        for k in range(1, m):
            x = hb[k] if hb[k] < x else x
        if (x - stale) * kk >= 1.0:
            for k in range(m):
                score[k] = score[k] + w
        else:
            for k in range(m):
                x = (hb[k] - stale) * kk
                x = 1.0 if x > 1.0 else x
                x = 0.0 if x < 0.0 else x
                score[k] = score[k] + w * <float>x


cdef Py_ssize_t _pick(const Kernel* p, Py_ssize_t n, unsigned long long r) noexcept nogil:
    cdef float score[BLOCK]
    cdef int feas[BLOCK]
    cdef Py_ssize_t i0, k, m, n_tied = 0, skip, first = -1
    cdef float s, best = NEG_INF
    i0 = 0
    while i0 < n:
        m = n - i0 if n - i0 < BLOCK else BLOCK
        _block(p, i0, m, score, feas)
        for k in range(m):
            s = score[k]
            # one well-predicted branch per node: only a feasible node at or above the best
            # so far (best starts at -inf) can change the choice
            if (feas[k] != 0) & (s >= best):
                if n_tied == 0 or s > best:
                    best = s
                    n_tied = 1
                    first = i0 + k
                elif s == best:
                    n_tied += 1
        i0 += m
    if n_tied <= 1:
        return first  # -1 when nothing is feasible
    skip = <Py_ssize_t>(r % <unsigned long long>n_tied)
    i0 = first
    while i0 < n:
        m = n - i0 if n - i0 < BLOCK else BLOCK
        _block(p, i0, m, score, feas)
        for k in range(m):
            if feas[k] and score[k] == best:
                if skip == 0:
                    return i0 + k
                skip -= 1
        i0 += m
    return -1  # unreachable: the tied nodes were counted above


cdef class Query:
    """The scalars of one placement: what it asks for, how nodes are weighed, the clock.

    The compiled twin of ``nexus_fast._scoring_py.Query``: same fields (read-only), same
    validation; the request and weights are also kept as C floats for the kernel.
    """

    # What Python sees: the same fields as the pure twin's dataclass, read-only.
    cdef readonly tuple req
    cdef readonly tuple weights
    cdef readonly double now
    cdef readonly double node_timeout
    cdef readonly double t_max
    cdef readonly double s_max
    cdef readonly long long r
    # What the kernel reads: the request and weights as C floats, converted once.
    cdef float c_req[_scoring.N_RESOURCES]
    cdef float c_weights[_scoring.N_WEIGHTS]

    def __init__(
        self,
        req,
        weights,
        double now,
        double node_timeout,
        double t_max,
        double s_max=0.0,
        r=0,
    ):
        cdef int j
        # Any sequence is accepted and kept as a tuple, as the pure twin does.
        self.req = req if type(req) is tuple else tuple(req)
        self.weights = weights if type(weights) is tuple else tuple(weights)
        if len(self.req) != _scoring.N_RESOURCES:
            raise ValueError(f"req needs {N_RESOURCES} values, got {len(self.req)}")
        if len(self.weights) != _scoring.N_WEIGHTS:
            raise ValueError(f"weights needs {N_WEIGHTS} values, got {len(self.weights)}")
        if not node_timeout > 0:
            raise ValueError("node_timeout must be > 0")
        if not 0 <= r < _R_LIMIT:
            raise ValueError("r must be in [0, 2**63)")
        for j in range(_scoring.N_RESOURCES):
            self.c_req[j] = self.req[j]
        for j in range(_scoring.N_WEIGHTS):
            self.c_weights[j] = self.weights[j]
        self.now = now
        self.node_timeout = node_timeout
        self.t_max = t_max
        self.s_max = s_max
        self.r = r

    def __repr__(self):
        return (
            f"Query(req={self.req!r}, weights={self.weights!r}, now={self.now!r}, "
            f"node_timeout={self.node_timeout!r}, t_max={self.t_max!r}, "
            f"s_max={self.s_max!r}, r={self.r!r})"
        )


cdef inline void _set_t_max(Kernel* p, double t_max) noexcept nogil:
    p.t_max = <float>t_max
    p.t_div = p.t_max + ONE


cdef int _kernel_init(
    Kernel* p,
    const float[:, ::1] feat,
    Py_ssize_t n,
    const unsigned char[::1] mask,
    const double[::1] heartbeat,
    Query query,
    const float[::1] spread,
) except -1:
    """Check the inputs as the pure twin's ``_check`` does and fill ``p`` (not when n = 0)."""
    cdef int j
    if feat.shape[0] < _scoring.N_ROWS:
        raise ValueError(f"feat needs {N_ROWS} rows, got {feat.shape[0]}")
    if n < 0 or n > feat.shape[1]:
        raise ValueError(f"n={n} out of range for {feat.shape[1]} columns")
    if mask.shape[0] < n or heartbeat.shape[0] < n:
        raise ValueError("mask and heartbeat must cover n nodes")
    if spread is not None and spread.shape[0] < n:
        raise ValueError("spread must cover n nodes")
    if n == 0:
        return 0  # nothing to point at: the callers return before reading p
    for j in range(_scoring.N_RESOURCES):
        p.free[j] = &feat[_scoring.ROW_FREE + j, 0]
        p.avail[j] = &feat[_scoring.ROW_AVAIL + j, 0]
        p.cap[j] = &feat[_scoring.ROW_CAP + j, 0]
        p.req[j] = query.c_req[j]
    p.tasks = &feat[_scoring.ROW_TASKS, 0]
    p.mask = &mask[0]
    p.heartbeat = &heartbeat[0]
    p.counted[0] = True
    p.counted[1] = True
    p.counted[2] = p.req[2] > ZERO
    p.counted[3] = p.req[3] > ZERO
    p.n_terms = <float>(3 + p.counted[2] + p.counted[3])  # cpu, memory, tasks, gpu?, disk?
    _set_t_max(p, query.t_max)
    p.s_max = <float>query.s_max
    p.w_least = query.c_weights[0]
    p.w_most = query.c_weights[1]
    p.w_balanced = query.c_weights[2]
    p.w_spread = query.c_weights[3]
    p.w_fresh = query.c_weights[4]
    p.use_spread = spread is not None and p.w_spread != ZERO
    p.spread = &spread[0] if p.use_spread else NULL
    p.stale = query.now - query.node_timeout
    p.k = 2.0 / query.node_timeout
    return 0


def pick_best(
    const float[:, ::1] feat,
    Py_ssize_t n,
    const unsigned char[::1] mask,
    const double[::1] heartbeat,
    Query query not None,
    const float[::1] spread=None,
):
    """Index (< n) of the best feasible node, or -1 if none is feasible (see _scoring_py)."""
    cdef Kernel p
    cdef Py_ssize_t best
    _kernel_init(&p, feat, n, mask, heartbeat, query, spread)
    if n == 0:
        return -1
    if n >= NOGIL_MIN_NODES:
        with nogil:
            best = _pick(&p, n, <unsigned long long>query.r)
    else:
        best = _pick(&p, n, <unsigned long long>query.r)
    return best


cdef void _score_range(
    const Kernel* p, Py_ssize_t i0, Py_ssize_t i1, float* score
) noexcept nogil:
    """Score nodes ``i0 .. i1 - 1`` into ``score[i0:i1]`` with ``_block``, -inf where infeasible."""
    cdef int feas[BLOCK]
    cdef Py_ssize_t k, m
    while i0 < i1:
        m = i1 - i0 if i1 - i0 < BLOCK else BLOCK
        _block(p, i0, m, score + i0, feas)
        for k in range(m):
            if not feas[k]:
                score[i0 + k] = NEG_INF
        i0 += m


cdef class PlaceRun:
    """Places a run of like requests: one scan scores the fleet, then each pick is an argmax.

    The compiled twin of ``nexus_fast._scoring_py.PlaceRun`` (semantics: there). The cached
    scores (-inf for an infeasible node) come from ``_block``, the scoring routine of
    ``pick_best``, so they are bit for bit the scores ``pick_best`` computes. They are the
    leaves of a tournament tree whose every inner node holds the best score below it and how
    many leaves below it hold that score: ``best(r)`` walks down to the ``(r mod ties)``-th
    tied leaf in index order and ``rescore`` updates one leaf and its path to the root, both
    O(log n) whether the fleet ties everywhere or nowhere. Everything is scored again (and
    the tree rebuilt, O(n)) only when ``t_max`` moves.
    """

    cdef Kernel p
    cdef Py_ssize_t n
    cdef Py_ssize_t leaves  # a power of two >= n; leaf i is tree node leaves + i
    # The arrays the kernel's pointers read: held so they outlive the run.
    cdef const float[:, ::1] feat
    cdef const unsigned char[::1] mask
    cdef const double[::1] heartbeat
    cdef double t_max
    cdef float* top  # per tree node: the best score below it (-inf: nothing feasible)
    cdef Py_ssize_t* ties  # per tree node: how many leaves below it hold that score

    def __cinit__(self):
        self.top = NULL
        self.ties = NULL

    def __init__(
        self,
        const float[:, ::1] feat,
        Py_ssize_t n,
        const unsigned char[::1] mask,
        const double[::1] heartbeat,
        Query query not None,
    ):
        _kernel_init(&self.p, feat, n, mask, heartbeat, query, None)
        self.feat = feat
        self.mask = mask
        self.heartbeat = heartbeat
        self.n = n
        self.t_max = query.t_max
        self.leaves = 1
        while self.leaves < n:
            self.leaves *= 2
        PyMem_Free(self.top)
        PyMem_Free(self.ties)
        self.top = <float*>PyMem_Malloc(2 * self.leaves * sizeof(float))
        self.ties = <Py_ssize_t*>PyMem_Malloc(2 * self.leaves * sizeof(Py_ssize_t))
        if self.top == NULL or self.ties == NULL:
            raise MemoryError()
        self.score_all()

    def __dealloc__(self):
        PyMem_Free(self.top)
        PyMem_Free(self.ties)

    def score_all(self):
        """Score every candidate again; returns how many are feasible."""
        cdef Py_ssize_t n_feasible
        if self.n >= NOGIL_MIN_NODES:
            with nogil:
                n_feasible = self._build()
        else:
            n_feasible = self._build()
        return n_feasible

    cdef Py_ssize_t _build(self) noexcept nogil:
        cdef Py_ssize_t i, n_feasible = 0, leaves = self.leaves
        cdef float* top = self.top
        _score_range(&self.p, 0, self.n, top + leaves)
        for i in range(self.n, leaves):
            top[leaves + i] = NEG_INF
        for i in range(leaves, 2 * leaves):
            self.ties[i] = top[i] > NEG_INF
            n_feasible += self.ties[i]
        for i in range(leaves - 1, 0, -1):
            self._join(i)
        return n_feasible

    cdef inline void _join(self, Py_ssize_t i) noexcept nogil:
        """Tree node ``i`` from its two children: the better score, or the sum of ties."""
        cdef float a = self.top[2 * i], b = self.top[2 * i + 1]
        if a > b:
            self.top[i] = a
            self.ties[i] = self.ties[2 * i]
        elif b > a:
            self.top[i] = b
            self.ties[i] = self.ties[2 * i + 1]
        else:  # equal (-inf on both sides: no ties, both counts are 0)
            self.top[i] = a
            self.ties[i] = self.ties[2 * i] + self.ties[2 * i + 1]

    def best(self, r):
        """The best feasible node now, ties by ``r`` (``0 <= r < 2**63``); -1 if none fits."""
        cdef Py_ssize_t i = 1, left
        cdef unsigned long long k
        cdef float best
        if not 0 <= r < _R_LIMIT:
            raise ValueError("r must be in [0, 2**63)")
        if self.n == 0 or self.ties[1] == 0:
            return -1
        best = self.top[1]
        k = <unsigned long long>r % <unsigned long long>self.ties[1]
        while i < self.leaves:  # down to the k-th leaf holding the best score, in index order
            left = 2 * i
            if self.top[left] == best:
                if k < <unsigned long long>self.ties[left]:
                    i = left
                    continue
                k -= self.ties[left]
            i = left + 1
        return i - self.leaves

    def rescore(self, Py_ssize_t slot, double t_max):
        """Node ``slot``'s column changed (it was reserved); ``t_max``: the fleet's now."""
        cdef Py_ssize_t i = self.leaves + slot
        if slot < 0 or slot >= self.n:
            raise ValueError(f"slot {slot} out of range for {self.n} nodes")
        if t_max != self.t_max:  # every node's tasks term moved: score them all
            self.t_max = t_max
            _set_t_max(&self.p, t_max)
            self.score_all()
            return
        _score_range(&self.p, slot, slot + 1, self.top + self.leaves)
        self.ties[i] = self.top[i] > NEG_INF
        i >>= 1
        while i:
            self._join(i)
            i >>= 1
