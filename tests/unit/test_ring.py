"""EventRing behaviour, run against both twins (``ring_impl``) and a list model."""

from __future__ import annotations

import pickle
from types import ModuleType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


def test_capacity_must_be_power_of_two(ring_impl: ModuleType) -> None:
    for bad in (0, -1, 3, 6, 100):
        with pytest.raises(ValueError):
            ring_impl.EventRing(bad)
    for good in (1, 2, 4, 1024):
        assert ring_impl.EventRing(good).capacity == good


def test_empty_ring(ring_impl: ModuleType) -> None:
    ring = ring_impl.EventRing(8)
    assert len(ring) == 0
    assert ring.last_index == 0
    assert ring.first_index == ring.last_index + 1
    for after in (-5, 0, 1, 10**6):
        assert ring.since(after) == []
        assert ring.since_limited(after, 3) == []


def test_first_append_sets_start(ring_impl: ModuleType) -> None:
    ring = ring_impl.EventRing(4)
    ring.append(100, "a")
    assert (ring.first_index, ring.last_index, len(ring)) == (100, 100, 1)
    assert ring.since(99) == ["a"]
    assert ring.since(100) == []
    with pytest.raises(ring_impl.RingIndexTooOld):
        ring.since(98)


def test_indices_must_be_contiguous(ring_impl: ModuleType) -> None:
    ring = ring_impl.EventRing(4)
    ring.append(1, "a")
    for bad in (1, 3, 0, -1):
        with pytest.raises(ValueError):
            ring.append(bad, "x")
    ring.append(2, "b")
    assert ring.since(0) == ["a", "b"]


def test_overwrite_and_wraparound(ring_impl: ModuleType) -> None:
    ring = ring_impl.EventRing(4)
    for i in range(1, 11):
        ring.append(i, f"e{i}")
    assert (ring.first_index, ring.last_index, len(ring)) == (7, 10, 4)
    # the window 7..10 straddles the end of the buffer (slots 3,0,1,2)
    assert ring.since(6) == ["e7", "e8", "e9", "e10"]
    assert ring.since(8) == ["e9", "e10"]
    assert ring.since(9) == ["e10"]
    assert ring.since(10) == []
    assert ring.since(11) == []
    assert ring.since_limited(6, 2) == ["e7", "e8"]
    assert ring.since_limited(7, 3) == ["e8", "e9", "e10"]
    assert ring.since_limited(7, 0) == []
    assert ring.since_limited(6, 100) == ["e7", "e8", "e9", "e10"]


def test_too_old_carries_oldest_index(ring_impl: ModuleType) -> None:
    ring = ring_impl.EventRing(2)
    for i in range(1, 6):
        ring.append(i, i)
    with pytest.raises(ring_impl.RingIndexTooOld) as info:
        ring.since(2)
    assert info.value.oldest_index == 4
    assert isinstance(info.value, LookupError)
    with pytest.raises(ring_impl.RingIndexTooOld):
        ring.since_limited(0, 1)
    copy = pickle.loads(pickle.dumps(info.value))
    assert copy.oldest_index == 4


def test_capacity_one(ring_impl: ModuleType) -> None:
    ring = ring_impl.EventRing(1)
    ring.append(0, "a")
    assert ring.since(-1) == ["a"]
    ring.append(1, "b")
    assert (ring.first_index, ring.last_index, len(ring)) == (1, 1, 1)
    assert ring.since(0) == ["b"]
    with pytest.raises(ring_impl.RingIndexTooOld):
        ring.since(-1)


def test_negative_and_large_indices(ring_impl: ModuleType) -> None:
    ring = ring_impl.EventRing(4)
    for i in range(-3, 3):
        ring.append(i, i)
    assert ring.since(-2) == [-1, 0, 1, 2]
    big = 2**62
    ring2 = ring_impl.EventRing(8)
    for i in range(big, big + 10):
        ring2.append(i, i)
    assert ring2.since(big + 5) == [big + 6, big + 7, big + 8, big + 9]


def test_since_limited_rejects_negative(ring_impl: ModuleType) -> None:
    ring = ring_impl.EventRing(4)
    ring.append(1, 1)
    with pytest.raises(ValueError):
        ring.since_limited(0, -1)


def test_returns_references_not_copies(ring_impl: ModuleType) -> None:
    ring = ring_impl.EventRing(4)
    item = {"payload": b"x"}
    ring.append(1, item)
    assert ring.since(0)[0] is item


def test_wrapped_reads_hold_their_own_references(ring_impl: ModuleType) -> None:
    # A window across the end of the buffer, cut exactly at the end, and crossing it;
    # results are fresh lists that keep their items alive after they are overwritten.
    ring = ring_impl.EventRing(8)
    for i in range(1, 14):
        ring.append(i, [i])  # slots: 9..13 -> 1..5, 6..8 -> 6..8
    items = ring.since(5)
    assert items == [[i] for i in range(6, 14)]
    assert ring.since_limited(5, 3) == [[6], [7], [8]]  # stops exactly at the buffer end
    assert ring.since_limited(6, 4) == [[7], [8], [9], [10]]  # crosses it
    assert ring.since_limited(8, 2) == [[9], [10]]  # after the wrap only
    items.append("extra")
    assert len(ring.since(5)) == 8  # the ring's buffer is not shared with the result
    before = ring.since(5)
    for i in range(14, 30):
        ring.append(i, [i])
    assert before == [[i] for i in range(6, 14)]  # still alive once evicted
    assert ring.since(21) == [[i] for i in range(22, 30)]
    with pytest.raises(ring_impl.RingIndexTooOld):
        ring.since(5)


def test_generic_alias_and_repr(ring_impl: ModuleType) -> None:
    assert ring_impl.EventRing[bytes] is not None
    ring = ring_impl.EventRing(4)
    assert "capacity=4" in repr(ring)


# --- property test: both twins against a trivially correct list model ---------------------


class ListRing:
    """Model: keep everything in a list, drop the oldest beyond capacity."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.entries: list[tuple[int, Any]] = []
        self.evicted = False

    def append(self, index: int, item: Any) -> None:
        self.entries.append((index, item))
        if len(self.entries) > self.capacity:
            del self.entries[0]

    def since(self, after: int, limit: int | None = None) -> list[Any] | str:
        if not self.entries or after >= self.entries[-1][0]:
            return []
        if after < self.entries[0][0] - 1:
            return "too-old"
        out = [item for index, item in self.entries if index > after]
        return out if limit is None else out[:limit]


ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 4)),  # append a run of n events
        st.tuples(st.just("since"), st.integers(-3, 40)),  # offset from first_index
        st.tuples(st.just("limited"), st.integers(-3, 40), st.integers(0, 6)),
    ),
    max_size=60,
)


def _call(fn: Any, *args: Any) -> list[Any] | str:
    try:
        return list(fn(*args))
    except Exception as exc:
        return "too-old" if type(exc).__name__ == "RingIndexTooOld" else repr(exc)


@settings(max_examples=150)
@given(cap_exp=st.integers(0, 4), start=st.integers(-50, 50), script=ops)
def test_matches_list_model(
    ring_impl: ModuleType, cap_exp: int, start: int, script: list[tuple[Any, ...]]
) -> None:
    capacity = 1 << cap_exp
    ring = ring_impl.EventRing(capacity)
    model = ListRing(capacity)
    nxt = start
    for op in script:
        if op[0] == "append":
            for _ in range(op[1]):
                ring.append(nxt, ("ev", nxt))
                model.append(nxt, ("ev", nxt))
                nxt += 1
        else:
            after = start - 1 + op[1] - 2
            if op[0] == "since":
                assert _call(ring.since, after) == model.since(after)
            else:
                assert _call(ring.since_limited, after, op[2]) == model.since(after, op[2])
        assert len(ring) == len(model.entries)
        if model.entries:
            assert ring.first_index == model.entries[0][0]
            assert ring.last_index == model.entries[-1][0]
