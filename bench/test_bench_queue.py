"""CommandQueue: compiled twin vs pure twin vs collections.deque and asyncio.Queue.

The baselines are single FIFOs (no lanes, no per-node split, no discard by key), i.e. the
floor a smarter queue pays on top of. Each round pushes 1000 commands over 16 nodes and 3
priorities, then drains them node by node.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any

import pytest

from nexus_fast._compat import NO_EXTENSIONS

# compiled vs pure twin (baselines are measured in the same run)
TWINS = ["py"] if NO_EXTENSIONS else ["c", "py"]

N = 1000
NODES = 16
KEYS = [f"cmd-{i:06d}" for i in range(N)]
PLAN = [(i % NODES, i % 3, KEYS[i]) for i in range(N)]


@pytest.mark.parametrize("impl", TWINS)
def test_queue_push_pop(benchmark: Any, load_twin: Any, impl: str) -> None:
    q = load_twin("queue", impl).CommandQueue(N * 2)
    item = object()

    def run() -> None:
        push, pop = q.push, q.pop
        for node, prio, key in PLAN:
            push(node, prio, key, item)
        for node in range(NODES):
            while pop(node) is not None:
                pass

    benchmark(run)
    assert len(q) == 0


@pytest.mark.parametrize("impl", TWINS)
def test_queue_push_pop_batch(benchmark: Any, load_twin: Any, impl: str) -> None:
    q = load_twin("queue", impl).CommandQueue(N * 2)
    item = object()

    def run() -> None:
        push, pop_batch = q.push, q.pop_batch
        for node, prio, key in PLAN:
            push(node, prio, key, item)
        for node in range(NODES):
            pop_batch(node, 64)

    benchmark(run)
    assert len(q) == 0


@pytest.mark.parametrize("impl", TWINS)
def test_queue_push_discard(benchmark: Any, load_twin: Any, impl: str) -> None:
    """Every command cancelled before delivery (O(1) removal by key)."""
    q = load_twin("queue", impl).CommandQueue(N * 2)
    item = object()

    def run() -> None:
        push, discard = q.push, q.discard
        for node, prio, key in PLAN:
            push(node, prio, key, item)
        for key in reversed(KEYS):
            discard(key)

    benchmark(run)
    assert len(q) == 0


def test_baseline_deque(benchmark: Any) -> None:
    q: deque[Any] = deque()
    item = object()

    def run() -> None:
        append, popleft = q.append, q.popleft
        for node, prio, key in PLAN:
            append((node, prio, key, item))
        while q:
            popleft()

    benchmark(run)


def test_baseline_asyncio_queue(benchmark: Any) -> None:
    q: asyncio.Queue[Any] = asyncio.Queue(maxsize=N * 2)
    item = object()

    def run() -> None:
        put, get = q.put_nowait, q.get_nowait
        for node, prio, key in PLAN:
            put((node, prio, key, item))
        while not q.empty():
            get()

    benchmark(run)
