"""One node -> slot index, shared by the scheduler (matrix columns) and the command queue.

A slot is a small dense integer per node: the scheduler's column in its feature matrix
and, plus one, the node's lane in the command queue (lane 0 holds unplaced commands). Both
used to number nodes on their own; with one index a placement names the slot the queue
pushes to, and nothing maps a node id twice on a submit.

Each user *acquires* a node's slot while it keeps per-slot state and *releases* it when
done; the slot returns to the free list when its last holder lets go. So the order in which
the scheduler and the queue hear that a node was removed does not matter: the queue can
still drain the slot after the scheduler has cleared its column, and a new node never
inherits queued work. Freed slots are reused lowest first, so the scanned range stays dense.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterator

__all__ = ["NodeSlots"]


class NodeSlots:
    """Node id <-> dense slot (0, 1, ...), reference-counted by its holders."""

    __slots__ = ("_free", "_holders", "_ids", "_slots")

    def __init__(self) -> None:
        self._slots: dict[str, int] = {}
        self._ids: list[str | None] = []
        self._holders: list[int] = []
        self._free: list[int] = []  # min-heap

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._slots

    def __iter__(self) -> Iterator[str]:
        return iter(self._slots)

    @property
    def high(self) -> int:
        """One past the highest slot ever given out (array sizes)."""
        return len(self._ids)

    def get(self, node_id: str) -> int | None:
        """The node's slot, or None when nobody holds one for it."""
        return self._slots.get(node_id)

    def node_at(self, slot: int) -> str | None:
        """The node holding ``slot``, or None when it is free."""
        return self._ids[slot] if 0 <= slot < len(self._ids) else None

    def acquire(self, node_id: str) -> int:
        """The node's slot, allocated if it has none; one more holder either way."""
        slot = self._slots.get(node_id)
        if slot is None:
            if self._free:
                slot = heapq.heappop(self._free)
                self._ids[slot] = node_id
            else:
                slot = len(self._ids)
                self._ids.append(node_id)
                self._holders.append(0)
            self._slots[node_id] = slot
        self._holders[slot] += 1
        return slot

    def release(self, node_id: str) -> bool:
        """One holder less; the slot is freed with the last one. False if none was held."""
        slot = self._slots.get(node_id)
        if slot is None:
            return False
        left = self._holders[slot] - 1
        self._holders[slot] = left
        if not left:
            del self._slots[node_id]
            self._ids[slot] = None
            heapq.heappush(self._free, slot)
        return True
