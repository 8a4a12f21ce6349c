"""EventRing: compiled twin vs pure twin vs collections.deque(maxlen) (the obvious choice).

Scenario: a ring of 4096 events in steady state (full, overwriting); each round appends
1000 events, or serves 1000 subscriber catch-ups of the last 64 events.
"""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Any

import pytest

from nexus_fast._compat import NO_EXTENSIONS

# compiled vs pure twin (baselines are measured in the same run)
TWINS = ["py"] if NO_EXTENSIONS else ["c", "py"]

CAPACITY = 4096
APPENDS = 1000
READS = 1000
TAIL = 64


class DequeRing:
    """Baseline: deque(maxlen) plus the index of its newest item."""

    def __init__(self, capacity: int) -> None:
        self.buf: deque[Any] = deque(maxlen=capacity)
        self.last = 0

    def append(self, index: int, item: Any) -> None:
        self.buf.append(item)
        self.last = index

    def since(self, after: int) -> list[Any]:
        n = self.last - after
        return list(islice(self.buf, len(self.buf) - n, None))


def filled(load_twin: Any, impl: str) -> tuple[Any, int]:
    ring = DequeRing(CAPACITY) if impl == "deque" else load_twin("ring", impl).EventRing(CAPACITY)
    for i in range(1, CAPACITY * 2 + 1):
        ring.append(i, i)
    return ring, CAPACITY * 2


@pytest.mark.parametrize("impl", [*TWINS, "deque"])
def test_ring_append(benchmark: Any, load_twin: Any, impl: str) -> None:
    ring, last = filled(load_twin, impl)
    state = {"next": last + 1}
    payload = b"event"

    def run() -> None:
        append = ring.append
        start = state["next"]
        for i in range(start, start + APPENDS):
            append(i, payload)
        state["next"] = start + APPENDS

    benchmark(run)


@pytest.mark.parametrize("impl", [*TWINS, "deque"])
def test_ring_since_tail(benchmark: Any, load_twin: Any, impl: str) -> None:
    ring, last = filled(load_twin, impl)
    after = last - TAIL

    def run() -> int:
        since = ring.since
        total = 0
        for _ in range(READS):
            total += len(since(after))
        return total

    assert benchmark(run) == READS * TAIL


@pytest.mark.parametrize("impl", TWINS)
def test_ring_since_wrapping(benchmark: Any, load_twin: Any, impl: str) -> None:
    """A window that straddles the end of the buffer (two slices joined)."""
    ring, last = filled(load_twin, impl)
    ring.append(last + 1, last + 1)
    ring.append(last + 2, last + 2)  # newest two wrapped to slots 0 and 1
    after = last + 2 - TAIL

    def run() -> int:
        since = ring.since
        total = 0
        for _ in range(READS):
            total += len(since(after))
        return total

    assert benchmark(run) == READS * TAIL
