"""CommandQueue behaviour, run against both twins (``queue_impl``) and a dict+lists model."""

from __future__ import annotations

import gc
import pickle
import weakref
from types import ModuleType
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test


def test_constructor_validation(queue_impl: ModuleType) -> None:
    Q = queue_impl.CommandQueue
    for kwargs in ({"capacity": 0}, {"capacity": 4, "lanes": 0}, {"capacity": 4, "max_nodes": 0}):
        with pytest.raises(ValueError):
            Q(**kwargs)
    q = Q(5)
    assert (q.capacity, q.lanes, len(q)) == (5, 3, 0)
    assert q.nodes_with_items() == []


def test_fifo_within_lane_and_priorities(queue_impl: ModuleType) -> None:
    q = queue_impl.CommandQueue(16)
    q.push(1, 0, "low1", "L1")
    q.push(1, 2, "high1", "H1")
    q.push(1, 1, "mid1", "M1")
    q.push(1, 2, "high2", "H2")
    q.push(1, 0, "low2", "L2")
    assert [q.pop(1) for _ in range(6)] == ["H1", "H2", "M1", "L1", "L2", None]
    assert len(q) == 0


def test_bad_priority_and_node(queue_impl: ModuleType) -> None:
    q = queue_impl.CommandQueue(4, lanes=2, max_nodes=3)
    for prio in (-1, 2):
        with pytest.raises(ValueError):
            q.push(0, prio, "k", 1)
    for node in (-1, 3):
        with pytest.raises(ValueError):
            q.push(node, 0, "k", 1)
        with pytest.raises(ValueError):
            q.pop(node)
        with pytest.raises(ValueError):
            q.depth(node)
    assert len(q) == 0 and "k" not in q


def test_full_queue(queue_impl: ModuleType) -> None:
    q = queue_impl.CommandQueue(2)
    q.push(0, 0, "a", 1)
    q.push(5, 0, "b", 2)
    with pytest.raises(queue_impl.QueueFull, match="capacity 2") as info:
        q.push(1, 1, "c", 3)
    assert info.value.capacity == 2
    assert pickle.loads(pickle.dumps(info.value)).capacity == 2
    assert "c" not in q and len(q) == 2
    assert q.discard("a")
    q.push(1, 1, "c", 3)  # room again
    assert q.nodes_with_items() == [1, 5]


def test_duplicate_key(queue_impl: ModuleType) -> None:
    q = queue_impl.CommandQueue(4)
    q.push(0, 0, "a", 1)
    with pytest.raises(queue_impl.DuplicateKey):
        q.push(1, 2, "a", 2)
    with pytest.raises(KeyError):  # DuplicateKey is a KeyError
        q.push(0, 0, "a", 2)
    assert q.depth(1) == 0 and len(q) == 1
    assert q.pop(0) == 1
    q.push(1, 2, "a", 3)  # the key is free once popped
    assert q.pop(1) == 3


@pytest.mark.parametrize("victim", ["head", "middle", "tail"])
def test_discard_positions(queue_impl: ModuleType, victim: str) -> None:
    q = queue_impl.CommandQueue(8)
    for key in ("head", "middle", "tail"):
        q.push(3, 1, key, key.upper())
    assert victim in q
    assert q.discard(victim) is True
    assert victim not in q
    assert q.discard(victim) is False
    assert q.depth(3) == 2
    expected = [k.upper() for k in ("head", "middle", "tail") if k != victim]
    assert q.pop_batch(3, 10) == expected
    # lane is consistent after the removal: new pushes go to the tail
    q.push(3, 1, "x", "X")
    q.push(3, 1, "y", "Y")
    assert q.pop_batch(3, 10) == ["X", "Y"]


def test_discard_only_item_empties_node(queue_impl: ModuleType) -> None:
    q = queue_impl.CommandQueue(4)
    q.push(2, 0, "a", 1)
    assert q.discard("a")
    assert q.depth(2) == 0 and q.nodes_with_items() == [] and q.pop(2) is None
    assert q.discard("missing") is False


def test_pop_batch(queue_impl: ModuleType) -> None:
    q = queue_impl.CommandQueue(16)
    for i in range(5):
        q.push(0, i % 3, f"k{i}", i)
    assert q.pop_batch(0, 0) == []
    assert q.pop_batch(0, 3) == [2, 1, 4]
    assert q.depth(0) == 2
    assert q.pop_batch(0, 10) == [0, 3]
    assert q.pop_batch(0, 10) == []
    assert q.pop_batch(7, 10) == []
    with pytest.raises(ValueError):
        q.pop_batch(0, -1)


def test_nodes_are_independent_and_tables_grow(queue_impl: ModuleType) -> None:
    q = queue_impl.CommandQueue(100, max_nodes=1000)
    q.push(999, 0, "far", "F")
    q.push(0, 0, "near", "N")
    q.push(17, 2, "mid", "M")
    assert q.nodes_with_items() == [0, 17, 999]
    assert (q.depth(999), q.depth(17), q.depth(500)) == (1, 1, 0)
    assert q.pop(500) is None
    assert q.pop(999) == "F"
    assert q.nodes_with_items() == [0, 17]


def test_slot_reuse_at_capacity_one(queue_impl: ModuleType) -> None:
    q = queue_impl.CommandQueue(1, lanes=1)
    for i in range(50):
        q.push(i % 4, 0, f"k{i}", i)
        with pytest.raises(queue_impl.QueueFull):
            q.push(0, 0, "other", -1)
        assert q.pop(i % 4) == i
    assert len(q) == 0


def test_released_items_are_not_retained(queue_impl: ModuleType) -> None:
    class Cmd:
        pass

    q = queue_impl.CommandQueue(4)
    cmd, other = Cmd(), Cmd()
    ref, ref2 = weakref.ref(cmd), weakref.ref(other)
    q.push(0, 0, "a", cmd)
    q.push(0, 0, "b", other)
    assert q.pop(0) is cmd
    assert q.discard("b")
    del cmd, other
    gc.collect()
    assert ref() is None and ref2() is None


def test_generic_alias_and_repr(queue_impl: ModuleType) -> None:
    assert queue_impl.CommandQueue[str] is not None
    assert "capacity=3" in repr(queue_impl.CommandQueue(3))


# --- stateful property test: both twins against a trivially correct model -----------------


class ModelQueue:
    """Model: node -> lanes -> list of (key, item); linear scans everywhere."""

    def __init__(self, capacity: int, lanes: int) -> None:
        self.capacity = capacity
        self.lanes = lanes
        self.nodes: dict[int, list[list[tuple[str, Any]]]] = {}

    def keys(self) -> set[str]:
        return {k for lanes in self.nodes.values() for lane in lanes for k, _ in lane}

    def push(self, node: int, prio: int, key: str, item: Any) -> str | None:
        if not 0 <= prio < self.lanes:
            return "ValueError"
        if key in self.keys():
            return "DuplicateKey"
        if len(self.keys()) >= self.capacity:
            return "QueueFull"
        self.nodes.setdefault(node, [[] for _ in range(self.lanes)])[prio].append((key, item))
        return None

    def pop(self, node: int) -> Any:
        for lane in reversed(self.nodes.get(node, [])):
            if lane:
                return lane.pop(0)[1]
        return None

    def discard(self, key: str) -> bool:
        for lanes in self.nodes.values():
            for lane in lanes:
                for i, (k, _) in enumerate(lane):
                    if k == key:
                        del lane[i]
                        return True
        return False

    def depth(self, node: int) -> int:
        return sum(len(lane) for lane in self.nodes.get(node, []))


def _outcome(fn: Any, *args: Any) -> str | None:
    try:
        fn(*args)
    except Exception as exc:
        return type(exc).__name__
    return None


NODES = st.integers(0, 5)
KEYS = st.sampled_from([f"k{i}" for i in range(12)])


def make_machine(impl: ModuleType) -> type[RuleBasedStateMachine]:
    class QueueMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.q = impl.CommandQueue(6, lanes=3, max_nodes=8)
            self.model = ModelQueue(6, 3)
            self.counter = 0

        @rule(node=NODES, prio=st.integers(-1, 3), key=KEYS)
        def push(self, node: int, prio: int, key: str) -> None:
            self.counter += 1
            item = (key, self.counter)
            assert _outcome(self.q.push, node, prio, key, item) == self.model.push(
                node, prio, key, item
            )

        @rule(node=NODES)
        def pop(self, node: int) -> None:
            assert self.q.pop(node) == self.model.pop(node)

        @rule(node=NODES, n=st.integers(0, 4))
        def pop_batch(self, node: int, n: int) -> None:
            expected = [self.model.pop(node) for _ in range(n)]
            assert self.q.pop_batch(node, n) == [x for x in expected if x is not None]

        @rule(key=KEYS)
        def discard(self, key: str) -> None:
            assert self.q.discard(key) == self.model.discard(key)

        @invariant()
        def same_shape(self) -> None:
            keys = self.model.keys()
            assert len(self.q) == len(keys)
            for key in ("k0", "k5", "k11"):
                assert (key in self.q) == (key in keys)
            depths = {n: self.model.depth(n) for n in range(8)}
            assert {n: self.q.depth(n) for n in range(8)} == depths
            assert self.q.nodes_with_items() == [n for n, d in depths.items() if d]

    return QueueMachine


def test_stateful_matches_model(queue_impl: ModuleType) -> None:
    run_state_machine_as_test(
        make_machine(queue_impl),
        settings=settings(max_examples=80, stateful_step_count=40, deadline=None),
    )
