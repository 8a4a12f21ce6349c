"""``micro``: each hot path, compiled twin vs pure twin, timed in this process.

The workloads are the ones of the pytest-benchmark suites in ``bench/`` (ring of 4096 in
steady state, 1000 appends / 1000 tail reads of 64; queue of 1000 commands over 16 nodes
and 3 priorities pushed then drained; one placement over 1,000 and 10,000 nodes), here
timed for a fixed share of ``--duration`` each so the ratio c/py lands in one report. The
modules are imported directly (``nexus_fast._ring_c`` / ``_ring_py`` ...), not through the
selectors, so both twins run whatever ``NEXUS_NO_EXTENSIONS`` says.
"""

from __future__ import annotations

import asyncio
import importlib
import time
from collections.abc import Callable
from types import ModuleType

import numpy as np

from nexus_fast.benchmark.common import Context
from nexus_fast.benchmark.report import Measurement, Ratio, cpu_figure, ratio

RING_CAPACITY = 4096
OPS = 1000
TAIL = 64
NODES = 16
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


def scoring(n: int) -> Callable[[ModuleType], Callable[[], int]]:
    """One placement over ``n`` nodes (the fleet of bench/test_bench_scoring.py)."""

    def make(mod: ModuleType) -> Callable[[], int]:
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


CASES: list[tuple[str, str, Callable[[ModuleType], Callable[[], int]], str]] = [
    ("ring append", "ring", ring_append, "appends/s"),
    ("ring since", "ring", ring_since, "reads/s"),
    ("queue", "queue", queue_push_pop, "ops/s"),
    ("scoring 1k", "scoring", scoring(1_000), "placements/s"),
    ("scoring 10k", "scoring", scoring(10_000), "placements/s"),
]


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
