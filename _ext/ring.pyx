# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""EventRing, compiled twin of ``nexus_fast/_ring_py.py`` (the typed source of truth).

Same behaviour, C integers for the index math. Indices are int64. boundscheck and
wraparound are off: every subscript is ``index & mask``, always in ``[0, capacity)``,
and tests/unit/test_ring.py covers wraparound, overwrite and capacity 1.
"""

from cpython.list cimport PyList_GET_ITEM, PyList_New, PyList_SET_ITEM
from cpython.object cimport PyObject
from cpython.ref cimport Py_INCREF
from libc.stdint cimport int64_t
from types import GenericAlias

# One exception type for both twins, so callers catch it whichever one runs.
from nexus_fast._ring_py import RingIndexTooOld

__all__ = ("EventRing", "RingIndexTooOld")


cdef class EventRing:
    """Fixed-capacity ring of the most recent items, keyed by contiguous index."""

    cdef list _buf
    cdef Py_ssize_t _capacity
    cdef Py_ssize_t _count
    cdef int64_t _mask
    cdef int64_t _first
    cdef int64_t _last

    def __init__(self, Py_ssize_t capacity):
        if capacity < 1 or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two >= 1, got {capacity}")
        self._capacity = capacity
        self._mask = capacity - 1
        self._buf = [None] * capacity
        self._count = 0
        self._first = 1
        self._last = 0

    def __class_getitem__(cls, item):
        return GenericAlias(cls, item)

    @property
    def capacity(self):
        """The fixed number of slots."""
        return self._capacity

    @property
    def first_index(self):
        """Index of the oldest held item (``last_index + 1`` when empty)."""
        return self._first

    @property
    def last_index(self):
        """Index of the newest held item (0 before the first append)."""
        return self._last

    def __len__(self):
        return self._count

    def __repr__(self):
        return (
            f"<EventRing capacity={self._capacity} first_index={self._first}"
            f" last_index={self._last} len={self._count}>"
        )

    cpdef append(self, int64_t index, object item):
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
        self._buf[<Py_ssize_t>(index & self._mask)] = item
        self._last = index

    cpdef list since(self, int64_t after_index):
        """Items with index > ``after_index``, oldest first.

        Raises ``RingIndexTooOld`` if some of them were already evicted.
        """
        return self._slice(after_index, self._count)

    cpdef list since_limited(self, int64_t after_index, Py_ssize_t max_items):
        """Like ``since`` but at most ``max_items`` items (the oldest ones first)."""
        if max_items < 0:
            raise ValueError(f"max_items must be >= 0, got {max_items}")
        return self._slice(after_index, max_items)

    cdef list _slice(self, int64_t after_index, Py_ssize_t limit):
        cdef int64_t avail
        cdef Py_ssize_t n, start, i, j, head
        cdef list buf, out
        cdef PyObject* item
        if self._count == 0 or after_index >= self._last:
            return []
        if after_index < self._first - 1:
            raise RingIndexTooOld(after_index, self._first)
        avail = self._last - after_index
        n = <Py_ssize_t>avail if avail < limit else limit
        if n <= 0:
            return []
        start = <Py_ssize_t>((after_index + 1) & self._mask)
        # Build the result directly: one allocation, the references copied over the one
        # or two contiguous runs of the buffer (no intermediate slices, no concatenation).
        # Slots after_index+1 .. after_index+n are filled (n <= count), so no NULLs.
        buf = self._buf
        out = PyList_New(n)
        head = self._capacity - start
        if head > n:
            head = n
        for i in range(head):
            item = PyList_GET_ITEM(buf, start + i)
            Py_INCREF(<object>item)
            PyList_SET_ITEM(out, i, <object>item)
        j = 0
        for i in range(head, n):
            item = PyList_GET_ITEM(buf, j)
            Py_INCREF(<object>item)
            PyList_SET_ITEM(out, i, <object>item)
            j += 1
        return out
