# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""CommandQueue, compiled twin of ``nexus_fast/_queue_py.py`` (the typed source of truth).

No allocation per item: all slots are preallocated. Each queued item lives in a slot;
the slots of one (node, lane) form an intrusive doubly-linked list through the
``_next``/``_prev`` int32 arrays, free slots a singly-linked free list through ``_next``.
Per-(node, lane) head/tail tables grow (doubling) as higher node ids appear. The only
Python structure touched per operation is the key -> slot dict, whose values are
preallocated int objects. boundscheck/wraparound are off: slot and node indices are
range-checked on entry and tests/unit/test_queue.py covers the edges.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from libc.stdint cimport INT32_MAX, int32_t
from types import GenericAlias

# One set of exception types for both twins, so callers catch them whichever one runs.
from nexus_fast._queue_py import DuplicateKey, QueueFull

__all__ = ("CommandQueue", "DuplicateKey", "QueueFull")



cdef class CommandQueue:
    """Bounded, per-node, priority-laned FIFO with O(1) push, pop and discard by key."""

    cdef Py_ssize_t _capacity
    cdef Py_ssize_t _lanes
    cdef Py_ssize_t _max_nodes
    cdef Py_ssize_t _size
    cdef Py_ssize_t _nodes_alloc
    cdef int32_t _free
    cdef int32_t* _next
    cdef int32_t* _prev
    cdef int32_t* _slot_node
    cdef int32_t* _slot_lane
    cdef int32_t* _head   # [_nodes_alloc * _lanes], -1 = empty
    cdef int32_t* _tail   # [_nodes_alloc * _lanes]
    cdef int32_t* _depth  # [_nodes_alloc]
    cdef list _items
    cdef list _keys
    cdef list _slot_ids   # int objects 0..capacity-1, reused as dict values
    cdef dict _where      # key -> slot id

    def __cinit__(self, Py_ssize_t capacity, Py_ssize_t lanes=3, Py_ssize_t max_nodes=65536):
        cdef Py_ssize_t i
        if not 1 <= capacity <= INT32_MAX:
            raise ValueError(f"capacity must be in 1..{INT32_MAX}, got {capacity}")
        if not 1 <= lanes <= 64:
            raise ValueError(f"lanes must be in 1..64, got {lanes}")
        if not 1 <= max_nodes <= INT32_MAX:
            raise ValueError(f"max_nodes must be in 1..{INT32_MAX}, got {max_nodes}")
        self._capacity = capacity
        self._lanes = lanes
        self._max_nodes = max_nodes
        self._size = 0
        self._nodes_alloc = 0
        self._next = <int32_t*>PyMem_Malloc(capacity * sizeof(int32_t))
        self._prev = <int32_t*>PyMem_Malloc(capacity * sizeof(int32_t))
        self._slot_node = <int32_t*>PyMem_Malloc(capacity * sizeof(int32_t))
        self._slot_lane = <int32_t*>PyMem_Malloc(capacity * sizeof(int32_t))
        if (self._next == NULL or self._prev == NULL or self._slot_node == NULL
                or self._slot_lane == NULL):
            raise MemoryError()
        for i in range(capacity):
            self._next[i] = <int32_t>(i + 1)
            self._prev[i] = -1
        self._next[capacity - 1] = -1
        self._free = 0
        self._items = [None] * capacity
        self._keys = [None] * capacity
        self._slot_ids = list(range(capacity))
        self._where = {}

    def __dealloc__(self):
        PyMem_Free(self._next)
        PyMem_Free(self._prev)
        PyMem_Free(self._slot_node)
        PyMem_Free(self._slot_lane)
        PyMem_Free(self._head)
        PyMem_Free(self._tail)
        PyMem_Free(self._depth)

    def __class_getitem__(cls, item):
        return GenericAlias(cls, item)

    @property
    def capacity(self):
        """Maximum number of queued items over all nodes."""
        return self._capacity

    @property
    def lanes(self):
        """Number of priority lanes; priorities are ``0 .. lanes - 1``, higher first."""
        return self._lanes

    @property
    def max_nodes(self):
        """Node ids are ``0 .. max_nodes - 1``."""
        return self._max_nodes

    def __len__(self):
        return self._size

    def __contains__(self, key):
        return key in self._where

    def __repr__(self):
        return f"<CommandQueue len={self._size} capacity={self._capacity}>"

    cdef inline int _check_node(self, Py_ssize_t node) except -1:
        if node < 0 or node >= self._max_nodes:
            raise ValueError(f"node must be in 0..{self._max_nodes - 1}, got {node}")
        return 0

    cdef int _grow(self, Py_ssize_t node) except -1:
        cdef Py_ssize_t new_alloc = max(node + 1, self._nodes_alloc * 2, 8)
        cdef Py_ssize_t i
        cdef int32_t* head
        cdef int32_t* tail
        cdef int32_t* depth
        if new_alloc > self._max_nodes:
            new_alloc = self._max_nodes
        head = <int32_t*>PyMem_Realloc(self._head, new_alloc * self._lanes * sizeof(int32_t))
        if head == NULL:
            raise MemoryError()
        self._head = head
        tail = <int32_t*>PyMem_Realloc(self._tail, new_alloc * self._lanes * sizeof(int32_t))
        if tail == NULL:
            raise MemoryError()
        self._tail = tail
        depth = <int32_t*>PyMem_Realloc(self._depth, new_alloc * sizeof(int32_t))
        if depth == NULL:
            raise MemoryError()
        self._depth = depth
        for i in range(self._nodes_alloc * self._lanes, new_alloc * self._lanes):
            head[i] = -1
            tail[i] = -1
        for i in range(self._nodes_alloc, new_alloc):
            depth[i] = 0
        self._nodes_alloc = new_alloc
        return 0

    cpdef push(self, Py_ssize_t node, Py_ssize_t priority, object key, object item):
        """Queue ``item`` for ``node`` at the tail of lane ``priority``.

        Raises ``QueueFull``, ``DuplicateKey``, or ``ValueError`` for a bad node/priority.
        """
        cdef int32_t slot, tail
        cdef Py_ssize_t cell
        self._check_node(node)
        if priority < 0 or priority >= self._lanes:
            raise ValueError(f"priority must be in 0..{self._lanes - 1}, got {priority}")
        if key in self._where:
            raise DuplicateKey(key)
        if self._size >= self._capacity:
            raise QueueFull(self._capacity)
        if node >= self._nodes_alloc:
            self._grow(node)
        self._where[key] = self._slot_ids[self._free]
        slot = self._free
        self._free = self._next[slot]
        self._items[slot] = item
        self._keys[slot] = key
        self._slot_node[slot] = <int32_t>node
        self._slot_lane[slot] = <int32_t>priority
        cell = node * self._lanes + priority
        tail = self._tail[cell]
        self._prev[slot] = tail
        self._next[slot] = -1
        if tail < 0:
            self._head[cell] = slot
        else:
            self._next[tail] = slot
        self._tail[cell] = slot
        self._depth[node] += 1
        self._size += 1

    cdef object _take(self, int32_t slot):
        """Unlink ``slot``, return its item to the caller and the slot to the free list."""
        cdef int32_t prev = self._prev[slot]
        cdef int32_t nxt = self._next[slot]
        cdef int32_t node = self._slot_node[slot]
        cdef Py_ssize_t cell = node * self._lanes + self._slot_lane[slot]
        item = self._items[slot]
        key = self._keys[slot]
        self._items[slot] = None
        self._keys[slot] = None
        del self._where[key]
        if prev < 0:
            self._head[cell] = nxt
        else:
            self._next[prev] = nxt
        if nxt < 0:
            self._tail[cell] = prev
        else:
            self._prev[nxt] = prev
        self._next[slot] = self._free
        self._prev[slot] = -1
        self._free = slot
        self._depth[node] -= 1
        self._size -= 1
        return item

    cpdef object pop(self, Py_ssize_t node):
        """Remove and return the next item for ``node`` (highest lane, then FIFO)."""
        cdef Py_ssize_t lane, base
        cdef int32_t slot
        self._check_node(node)
        if node >= self._nodes_alloc or self._depth[node] == 0:
            return None
        base = node * self._lanes
        for lane in range(self._lanes - 1, -1, -1):
            slot = self._head[base + lane]
            if slot >= 0:
                return self._take(slot)
        raise AssertionError("depth bookkeeping out of sync")

    cpdef list pop_batch(self, Py_ssize_t node, Py_ssize_t max_items):
        """Remove and return up to ``max_items`` items for ``node``, in ``pop`` order."""
        cdef Py_ssize_t lane, base
        cdef int32_t slot
        cdef list out = []
        self._check_node(node)
        if max_items < 0:
            raise ValueError(f"max_items must be >= 0, got {max_items}")
        if node >= self._nodes_alloc or self._depth[node] == 0:
            return out
        base = node * self._lanes
        for lane in range(self._lanes - 1, -1, -1):
            slot = self._head[base + lane]
            while slot >= 0 and len(out) < max_items:
                out.append(self._take(slot))
                slot = self._head[base + lane]
        return out

    cpdef bint discard(self, object key):
        """Remove the item queued under ``key``; False if there is none."""
        slot = self._where.get(key)
        if slot is None:
            return False
        self._take(<int32_t>slot)
        return True

    cpdef Py_ssize_t depth(self, Py_ssize_t node) except -1:
        """Number of items queued for ``node``."""
        self._check_node(node)
        if node >= self._nodes_alloc:
            return 0
        return self._depth[node]

    cpdef list nodes_with_items(self):
        """Ids of the nodes with at least one queued item, ascending."""
        cdef Py_ssize_t node
        return [node for node in range(self._nodes_alloc) if self._depth[node] > 0]
