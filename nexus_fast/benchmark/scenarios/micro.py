"""``micro``: each hot path, compiled twin vs pure twin, timed in this process.

The workloads are the ones of the pytest-benchmark suites in ``bench/`` (ring of 4096 in
steady state, 1000 appends / 1000 tail reads of 64; queue of 1000 commands over 16 nodes
and 3 priorities pushed then drained; one placement over 1,000 and 10,000 nodes), here
timed for a fixed share of ``--duration`` each so the ratio c/py lands in one report. A
batch of 100 like placements over 1,000 nodes runs twice per twin: with the batch kernel
(``PlaceRun``) and with the per-pick scan it replaced (a ``pick_best`` per placement), and
their ratio is reported per twin. The
modules are imported directly (``nexus_fast._ring_c`` / ``_ring_py`` ...), not through the
selectors, so both twins run whatever ``NEXUS_NO_EXTENSIONS`` says.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Callable
from types import ModuleType
from typing import Any

import numpy as np
from numpy.typing import NDArray

from nexus_fast.benchmark.common import Context
from nexus_fast.benchmark.report import Measurement, Ratio, cpu_figure, ratio

RING_CAPACITY = 4096
OPS = 1000
TAIL = 64
NODES = 16
RUN = 100  # like placements per run: a batch of 100
WEIGHTS = (1.0, 0.0, 0.5, 1.0, 0.1)  # least, most, balanced, spread, fresh (config defaults)
TARGETS = {"ring append": ">= 3", "ring since": ">= 3", "queue": ">= 3", "scoring 1k": ">= 5"}


def load_twin(hot_path: str, impl: str) -> ModuleType | None:
    """``nexus_fast._{hot_path}_{impl}``, or None when it is not built."""
    try:
        return importlib.import_module(f"nexus_fast._{hot_path}_{impl}")
    except ImportError:
        return None


def ring_append(mod: ModuleType) -> Callable[[], int]:
    """1000 appends to a full ring (overwriting)."""
    ring = mod.EventRing(RING_CAPACITY)
    for i in range(1, RING_CAPACITY * 2 + 1):
        ring.append(i, i)
    state = [RING_CAPACITY * 2 + 1]
    payload = b"event"

    def run() -> int:
        append = ring.append
        start = state[0]
        for i in range(start, start + OPS):
            append(i, payload)
        state[0] = start + OPS
        return OPS

    return run


def ring_since(mod: ModuleType) -> Callable[[], int]:
    """1000 subscriber catch-ups of the newest 64 events."""
    ring = mod.EventRing(RING_CAPACITY)
    last = RING_CAPACITY * 2
    for i in range(1, last + 1):
        ring.append(i, i)
    after = last - TAIL

    def run() -> int:
        since = ring.since
        for _ in range(OPS):
            since(after)
        return OPS

    return run


def queue_push_pop(mod: ModuleType) -> Callable[[], int]:
    """1000 pushes over 16 nodes and 3 priorities, then drained node by node (2000 ops)."""
    q = mod.CommandQueue(OPS * 2)
    plan = [(i % NODES, i % 3, f"cmd-{i:06d}") for i in range(OPS)]
    item = object()

    def run() -> int:
        push, pop = q.push, q.pop
        for node, prio, key in plan:
            push(node, prio, key, item)
        for node in range(NODES):
            while pop(node) is not None:
                pass
        return 2 * OPS

    return run


def fleet(n: int) -> tuple[NDArray[np.float32], NDArray[np.uint8], NDArray[np.float64], float]:
    """The fleet of bench/test_bench_scoring.py: ``(feat, mask, heartbeat, now)``, t_max 20."""
    from nexus_fast.scoring import N_ROWS, ROW_AVAIL, ROW_CAP, ROW_FREE, ROW_TASKS

    rng = np.random.default_rng(n)
    shapes = np.array([[4, 16, 0, 100], [8, 32, 0, 200], [16, 64, 1, 500], [64, 256, 8, 2000]])
    cap = shapes[rng.integers(0, len(shapes), n)].T.astype(np.float32)
    feat = np.zeros((N_ROWS, n), np.float32)
    feat[ROW_CAP : ROW_CAP + 4] = np.maximum(cap, np.float32(1e-6))
    free = cap * rng.random((4, n), np.float32)
    feat[ROW_FREE : ROW_FREE + 4] = free
    feat[ROW_AVAIL : ROW_AVAIL + 4] = free * rng.uniform(0.5, 1.0, (4, n)).astype(np.float32)
    feat[ROW_TASKS] = rng.integers(0, 21, n)
    mask = (rng.random(n) >= 0.02).astype(np.uint8)
    now = 1_000_000.0
    heartbeat = now - rng.random(n) * 5.0
    return feat, mask, heartbeat, now


def scoring(n: int) -> Callable[[ModuleType], Callable[[], int]]:
    """One placement over ``n`` nodes (the fleet of bench/test_bench_scoring.py)."""

    def make(mod: ModuleType) -> Callable[[], int]:
        feat, mask, heartbeat, now = fleet(n)
        pick, query = mod.pick_best, mod.Query

        def run() -> int:
            # One Query per placement, as the scheduler builds it.
            pick(
                feat,
                n,
                mask,
                heartbeat,
                query((1.0, 2.0, 0.0, 0.0), WEIGHTS, now, 30.0, 20.0, 0.0, 7),
            )
            return 1

        return run

    return make


def placement_run(n: int, *, kernel: bool) -> Callable[[ModuleType], Callable[[], int]]:
    """``RUN`` like placements over ``n`` nodes, each reserved before the next (a batch).

    ``kernel``: one ``PlaceRun`` (score once, argmax per pick, re-score the reserved node);
    otherwise the per-pick scan (a ``pick_best`` per placement, as before the kernel). Both
    reserve the same way (the reserved column's free, available and task rows, written
    through a memoryview so the bookkeeping weighs little next to the picks) and start each
    run from the same fleet.
    """

    def make(mod: ModuleType) -> Callable[[], int]:
        from nexus_fast.scoring import ROW_AVAIL, ROW_FREE, ROW_TASKS

        start, mask, heartbeat, now = fleet(n)
        feat = start.copy()
        req = (1.0, 2.0, 0.0, 0.0)
        query = mod.Query

        cells: Any = feat.data  # a memoryview: element writes without numpy's per-call cost

        def reserve(slot: int, t_max: float) -> float:
            cells[ROW_FREE, slot] -= 1.0
            cells[ROW_FREE + 1, slot] -= 2.0
            cells[ROW_AVAIL, slot] -= 1.0
            cells[ROW_AVAIL + 1, slot] -= 2.0
            tasks = cells[ROW_TASKS, slot] + 1.0
            cells[ROW_TASKS, slot] = tasks
            return t_max if t_max >= tasks else tasks

        def run() -> int:
            np.copyto(feat, start)
            t_max = 20.0
            if kernel:
                placer = mod.PlaceRun(
                    feat, n, mask, heartbeat, query(req, WEIGHTS, now, 30.0, t_max)
                )
                for r in range(RUN):
                    slot = placer.best(r)
                    t_max = reserve(slot, t_max)
                    placer.rescore(slot, t_max)
            else:
                for r in range(RUN):
                    q = query(req, WEIGHTS, now, 30.0, t_max, 0.0, r)
                    t_max = reserve(mod.pick_best(feat, n, mask, heartbeat, q), t_max)
            return RUN

        return run

    return make


CASES: list[tuple[str, str, Callable[[ModuleType], Callable[[], int]], str]] = [
    ("ring append", "ring", ring_append, "appends/s"),
    ("ring since", "ring", ring_since, "reads/s"),
    ("queue", "queue", queue_push_pop, "ops/s"),
    ("scoring 1k", "scoring", scoring(1_000), "placements/s"),
    ("scoring 10k", "scoring", scoring(10_000), "placements/s"),
    ("per-pick scan 1k", "scoring", placement_run(1_000, kernel=False), "placements/s"),
    ("placement run 1k", "scoring", placement_run(1_000, kernel=True), "placements/s"),
]
# The batch kernel against the per-pick scan it replaces, each twin on its own.
KERNEL_RATIO = ("placement run 1k", "per-pick scan 1k")


def time_it(fn: Callable[[], int], seconds: float) -> tuple[int, float]:
    """Call ``fn`` (each call returns its op count) for about ``seconds``; ``(ops, elapsed)``."""
    fn()  # warm-up: first-call costs (allocation, caches) are not the steady state
    ops = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        ops += fn()
        now = time.perf_counter()
        if now >= end:
            return ops, now - t0


async def run(ctx: Context) -> None:
    """Time every case with both twins; compiled rows are results, pure rows the baseline."""
    share = ctx.args.duration / (2 * len(CASES))
    throughput: dict[tuple[str, str], float] = {}
    for name, hot_path, make, unit in CASES:
        if ctx.stopping():
            return
        figures: dict[str, Measurement] = {}
        for impl in ("c", "py"):
            mod = load_twin(hot_path, impl)
            if mod is None:
                ctx.report.notes.append(f"nexus_fast._{hot_path}_{impl} is not built: skipped")
                continue
            fn = make(mod)
            c0 = time.process_time()
            ops, elapsed = time_it(fn, share)
            figures[impl] = Measurement(
                name=f"{name} [{impl}]",
                throughput=ops / elapsed,
                unit=unit,
                count=ops,
                duration_s=round(elapsed, 3),
                client_cpu=cpu_figure(time.process_time() - c0, elapsed),
            )
            throughput[name, impl] = ops / elapsed
            await asyncio.sleep(0)  # Ctrl-C is handled between cases
        if "c" in figures:
            ctx.report.results.append(figures["c"])
        if "py" in figures:
            ctx.report.baseline.append(figures["py"])
        if "c" in figures and "py" in figures:
            ctx.report.ratios.append(
                Ratio(
                    f"{name} c/py",
                    ratio(figures["c"].throughput, figures["py"].throughput),
                    "compiled twin ops/s / pure twin ops/s",
                    TARGETS.get(name, ""),
                )
            )
    ours, base = KERNEL_RATIO
    for impl in ("c", "py"):
        if (ours, impl) in throughput and (base, impl) in throughput:
            ctx.report.ratios.append(
                Ratio(
                    f"{ours} / {base} [{impl}]",
                    ratio(throughput[ours, impl], throughput[base, impl]),
                    f"placements/s of PlaceRun / of a pick_best per placement, {impl} twin",
                )
            )
