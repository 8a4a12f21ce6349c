"""CommandQueue, pure-Python twin: the typed source of truth for ``_ext/queue.pyx``.

A bounded queue of commands waiting for a node. Each node (a small dense int; pick any
one as the slot for "not placed yet") has ``lanes`` priority lanes, FIFO within a lane;
``pop`` serves the highest lane first. Every item carries a unique key, so ``discard``
removes a queued item in O(1) (a command cancelled or timed out before delivery).

Items should not be ``None``: ``pop`` returns ``None`` for "nothing queued".
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Generic, TypeVar

__all__ = ("CommandQueue", "DuplicateKey", "QueueFull")

T = TypeVar("T")

_INT32_MAX = 2**31 - 1  # the compiled twin keeps slots and node ids in int32


class QueueFull(Exception):
    """The queue already holds ``capacity`` items."""

    def __init__(self, capacity: int) -> None:
        super().__init__(f"command queue is full (capacity {capacity})")
        self.capacity = capacity

    def __reduce__(self) -> tuple[type[QueueFull], tuple[int]]:
        return (type(self), (self.capacity,))


class DuplicateKey(KeyError):
    """An item with this key is already queued."""


class CommandQueue(Generic[T]):
    """Bounded, per-node, priority-laned FIFO with O(1) push, pop and discard by key."""

    __slots__ = ("_capacity", "_depth", "_lanes", "_max_nodes", "_nodes", "_where")

    def __init__(self, capacity: int, lanes: int = 3, max_nodes: int = 65536) -> None:
        if not 1 <= capacity <= _INT32_MAX:
            raise ValueError(f"capacity must be in 1..{_INT32_MAX}, got {capacity}")
        if not 1 <= lanes <= 64:
            raise ValueError(f"lanes must be in 1..64, got {lanes}")
        if not 1 <= max_nodes <= _INT32_MAX:
            raise ValueError(f"max_nodes must be in 1..{_INT32_MAX}, got {max_nodes}")
        self._capacity = capacity
        self._lanes = lanes
        self._max_nodes = max_nodes
        # node -> one OrderedDict(key -> item) per lane, index = priority.
        self._nodes: dict[int, list[OrderedDict[str, T]]] = {}
        self._depth: dict[int, int] = {}  # only nodes with items
        self._where: dict[str, tuple[int, int]] = {}  # key -> (node, priority)

    @property
    def capacity(self) -> int:
        """Maximum number of queued items over all nodes."""
        return self._capacity

    @property
    def lanes(self) -> int:
        """Number of priority lanes; priorities are ``0 .. lanes - 1``, higher first."""
        return self._lanes

    @property
    def max_nodes(self) -> int:
        """Node ids are ``0 .. max_nodes - 1``."""
        return self._max_nodes

    def __len__(self) -> int:
        return len(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __repr__(self) -> str:
        return f"<CommandQueue len={len(self._where)} capacity={self._capacity}>"

    def _check_node(self, node: int) -> None:
        if not 0 <= node < self._max_nodes:
            raise ValueError(f"node must be in 0..{self._max_nodes - 1}, got {node}")

    def push(self, node: int, priority: int, key: str, item: T) -> None:
        """Queue ``item`` for ``node`` at the tail of lane ``priority``.

        Raises ``QueueFull``, ``DuplicateKey``, or ``ValueError`` for a bad node/priority.
        """
        self._check_node(node)
        if not 0 <= priority < self._lanes:
            raise ValueError(f"priority must be in 0..{self._lanes - 1}, got {priority}")
        if key in self._where:
            raise DuplicateKey(key)
        if len(self._where) >= self._capacity:
            raise QueueFull(self._capacity)
        lanes = self._nodes.get(node)
        if lanes is None:
            lanes = self._nodes[node] = [OrderedDict() for _ in range(self._lanes)]
        lanes[priority][key] = item
        self._where[key] = (node, priority)
        self._depth[node] = self._depth.get(node, 0) + 1

    def pop(self, node: int) -> T | None:
        """Remove and return the next item for ``node`` (highest lane, then FIFO)."""
        self._check_node(node)
        if node not in self._depth:
            return None
        for lane in reversed(self._nodes[node]):
            if lane:
                key, item = lane.popitem(last=False)
                del self._where[key]
                self._dec_depth(node)
                return item
        raise AssertionError("depth bookkeeping out of sync")  # pragma: no cover

    def pop_batch(self, node: int, max_items: int) -> list[T]:
        """Remove and return up to ``max_items`` items for ``node``, in ``pop`` order."""
        self._check_node(node)
        if max_items < 0:
            raise ValueError(f"max_items must be >= 0, got {max_items}")
        out: list[T] = []
        if node not in self._depth:
            return out
        for lane in reversed(self._nodes[node]):
            while lane and len(out) < max_items:
                key, item = lane.popitem(last=False)
                del self._where[key]
                out.append(item)
        if out:
            self._dec_depth(node, len(out))
        return out

    def discard(self, key: str) -> bool:
        """Remove the item queued under ``key``; False if there is none."""
        where = self._where.pop(key, None)
        if where is None:
            return False
        node, priority = where
        del self._nodes[node][priority][key]
        self._dec_depth(node)
        return True

    def depth(self, node: int) -> int:
        """Number of items queued for ``node``."""
        self._check_node(node)
        return self._depth.get(node, 0)

    def nodes_with_items(self) -> list[int]:
        """Ids of the nodes with at least one queued item, ascending."""
        return sorted(self._depth)

    def _dec_depth(self, node: int, n: int = 1) -> None:
        left = self._depth[node] - n
        if left:
            self._depth[node] = left
        else:
            del self._depth[node]
