"""EventRing, pure-Python twin: the typed source of truth for ``_ext/ring.pyx``.

A fixed power-of-two ring of the most recent events, addressed by their contiguous
event index. Slot of index ``i`` is ``i & (capacity - 1)``, so every operation is O(1)
slot math; reads return the stored objects themselves (no copies of the items).

Empty-ring convention: before the first append ``len(ring) == 0``, ``last_index == 0``
and ``first_index == 1`` (i.e. ``first_index == last_index + 1``), and ``since()``
returns ``[]`` for any index. The first append fixes the start; later appends must
continue it exactly.
"""

from __future__ import annotations

from typing import Generic, TypeVar, cast

__all__ = ("EventRing", "RingIndexTooOld")

T = TypeVar("T")


class RingIndexTooOld(LookupError):
    """The requested index is older than what the ring still holds (it was evicted).

    ``oldest_index`` is the oldest index still held; a reader may resume from
    ``oldest_index - 1`` after fetching the gap from the durable log.
    """

    def __init__(self, after_index: int, oldest_index: int) -> None:
        super().__init__(
            f"index {after_index} is too old: the ring holds events from {oldest_index}"
        )
        self.after_index = after_index
        self.oldest_index = oldest_index

    def __reduce__(self) -> tuple[type[RingIndexTooOld], tuple[int, int]]:
        return (type(self), (self.after_index, self.oldest_index))


class EventRing(Generic[T]):
    """Fixed-capacity ring of the most recent items, keyed by contiguous index."""

    __slots__ = ("_buf", "_capacity", "_count", "_first", "_last", "_mask")

    def __init__(self, capacity: int) -> None:
        if capacity < 1 or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two >= 1, got {capacity}")
        self._capacity = capacity
        self._mask = capacity - 1
        self._buf: list[T | None] = [None] * capacity
        self._count = 0
        self._first = 1
        self._last = 0

    @property
    def capacity(self) -> int:
        """The fixed number of slots."""
        return self._capacity

    @property
    def first_index(self) -> int:
        """Index of the oldest held item (``last_index + 1`` when empty)."""
        return self._first

    @property
    def last_index(self) -> int:
        """Index of the newest held item (0 before the first append)."""
        return self._last

    def __len__(self) -> int:
        return self._count

    def __repr__(self) -> str:
        return (
            f"<EventRing capacity={self._capacity} first_index={self._first}"
            f" last_index={self._last} len={self._count}>"
        )

    def append(self, index: int, item: T) -> None:
        """Store ``item`` under ``index``; it must be ``last_index + 1`` after the first.

        When the ring is full the oldest item is overwritten.
        """
        if self._count == 0:
            self._first = index
            self._count = 1
        elif index != self._last + 1:
            raise ValueError(f"index {index} does not follow last index {self._last}")
        elif self._count == self._capacity:
            self._first += 1  # overwrite the oldest
        else:
            self._count += 1
        self._buf[index & self._mask] = item
        self._last = index

    def since(self, after_index: int) -> list[T]:
        """Items with index > ``after_index``, oldest first.

        Raises ``RingIndexTooOld`` if some of them were already evicted.
        """
        return self._slice(after_index, self._count)

    def since_limited(self, after_index: int, max_items: int) -> list[T]:
        """Like ``since`` but at most ``max_items`` items (the oldest ones first)."""
        if max_items < 0:
            raise ValueError(f"max_items must be >= 0, got {max_items}")
        return self._slice(after_index, max_items)

    def _slice(self, after_index: int, limit: int) -> list[T]:
        if self._count == 0 or after_index >= self._last:
            return []
        if after_index < self._first - 1:
            raise RingIndexTooOld(after_index, self._first)
        n = min(self._last - after_index, limit)
        if n <= 0:
            return []
        start = (after_index + 1) & self._mask
        end = start + n
        buf = cast("list[T]", self._buf)  # slots after_index+1 .. after_index+n are filled
        if end <= self._capacity:
            return buf[start:end]
        return buf[start:] + buf[: end - self._capacity]
