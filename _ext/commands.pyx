# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Command bookkeeping, compiled twin of ``nexus_fast/_commands_py.py`` (the typed source
of truth): the transition table, acks, and each transition's record write and event.

Same arguments, same results. The loops run in C; what costs in the pure twin is the
interpreter around each record (building keys, tuples of parts, a ``b"".join`` per event):
here each event is sized once and written into one bytes object. The records themselves
stay protobuf messages (their fields are read and set through their Python API).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.unicode cimport PyUnicode_AsUTF8String
from libc.stdint cimport uint64_t
from libc.string cimport memcpy

from nexus_fast._commands_py import TRANSITIONS
from nexus_fast.pb import fabric_pb2 as pb

__all__ = ("TRANSITIONS", "TransitionWriter", "apply_acks", "can_move")

cdef int DISPATCHED = pb.COMMAND_STATE_DISPATCHED
cdef int ACKED = pb.COMMAND_STATE_ACKED

# The table as a bitmap: row = from state, bit = to state (states are 0..8).
cdef unsigned int _MOVES[16]
for _old, _new in TRANSITIONS:
    _MOVES[_old] |= 1u << _new


def can_move(int old, int new):
    """True when a command in state ``old`` may move to ``new``."""
    if not (0 <= old < 16 and 0 <= new < 32):
        return False
    return bool(_MOVES[old] & (1u << new))


def apply_acks(active, acks, str node_id, long long ts_ms, list changed):
    """Move each acked DISPATCHED record of ``node_id`` to ACKED (see the twin)."""
    cdef int stale = 0
    cdef object record
    get = active.get
    for ack in acks:
        record = get(ack.command_id)
        if record is None or record.node_id != node_id or record.state != DISPATCHED:
            stale += 1
            continue
        record.state = ACKED
        record.updated_ms = ts_ms
        changed.append(record)
    return stale


cdef inline Py_ssize_t _varint_len(uint64_t value) noexcept nogil:
    cdef Py_ssize_t n = 1
    while value > 0x7F:
        value >>= 7
        n += 1
    return n


cdef inline Py_ssize_t _put_varint(char* dst, uint64_t value) noexcept nogil:
    cdef Py_ssize_t n = 0
    while value > 0x7F:
        dst[n] = <char>((value & 0x7F) | 0x80)
        value >>= 7
        n += 1
    dst[n] = <char>value
    return n + 1


cdef inline Py_ssize_t _copy(char* dst, bytes src):
    cdef Py_ssize_t n = PyBytes_GET_SIZE(src)
    memcpy(dst, PyBytes_AS_STRING(src), n)
    return n


cdef bytes _expiry_key(uint64_t finished_ms, bytes rid):
    """``x/`` + finished_ms (8 bytes big-endian) + ``/`` + id."""
    cdef Py_ssize_t n = PyBytes_GET_SIZE(rid)
    cdef bytes key = PyBytes_FromStringAndSize(NULL, 11 + n)
    cdef char* p = PyBytes_AS_STRING(key)
    cdef int i
    p[0] = b"x"
    p[1] = b"/"
    for i in range(8):
        p[9 - i] = <char>((finished_ms >> (8 * i)) & 0xFF)
    p[10] = b"/"
    memcpy(p + 11, PyBytes_AS_STRING(rid), n)
    return key


cdef class TransitionWriter:
    """Stages command records and their transition events (see the twin)."""

    cdef object _db
    cdef object _put
    cdef dict _heads
    cdef frozenset _final
    cdef Py_ssize_t _limit
    cdef object _slim

    def __init__(self, db, put, heads, final_states, Py_ssize_t payload_limit, slim):
        self._db = db
        self._put = put
        self._heads = dict(heads)
        self._final = frozenset(final_states)
        self._limit = payload_limit
        self._slim = slim

    def stage(
        self,
        records,
        list ops,
        list events,
        list final,
        bytes time_field,
        bytes actor,
        dict index=None,
    ):
        """Append each record's put(s), its event and (final states) the record itself;
        with ``index``, a record already in ``ops`` has its put replaced (see the twin)."""
        cdef object record, state, at
        cdef bytes body, rid, key, head, event
        cdef Py_ssize_t n_id, n_body, size
        cdef char* p
        db = self._db
        put = self._put
        for record in records:
            body = record.SerializeToString()
            rid = PyUnicode_AsUTF8String(record.id)
            n_id = PyBytes_GET_SIZE(rid)
            key = PyBytes_FromStringAndSize(NULL, 2 + n_id)
            p = PyBytes_AS_STRING(key)
            p[0] = b"c"
            p[1] = b"/"
            memcpy(p + 2, PyBytes_AS_STRING(rid), n_id)
            if index is None:
                ops.append(put(db, key, body))
            else:
                at = index.get(key)
                if at is None:
                    index[key] = len(ops)
                    ops.append(put(db, key, body))
                else:
                    ops[<Py_ssize_t>at] = put(db, key, body)
            state = record.state
            if state in self._final:
                ops.append(put(db, _expiry_key(<uint64_t>record.finished_ms, rid), b""))
                final.append(record)
            if len(record.spec.payload) > self._limit:
                events.append(self._slim(record, body, time_field, actor))
                continue
            head = <bytes>self._heads[state]
            n_body = PyBytes_GET_SIZE(body)
            size = (
                PyBytes_GET_SIZE(time_field)
                + PyBytes_GET_SIZE(head)
                + 1 + _varint_len(<uint64_t>n_id) + n_id
                + 1 + _varint_len(<uint64_t>n_body) + n_body
                + PyBytes_GET_SIZE(actor)
            )
            event = PyBytes_FromStringAndSize(NULL, size)
            p = PyBytes_AS_STRING(event)
            p += _copy(p, time_field)
            p += _copy(p, head)
            p[0] = 0x2A  # Event field 5 (key)
            p += 1
            p += _put_varint(p, <uint64_t>n_id)
            memcpy(p, PyBytes_AS_STRING(rid), n_id)
            p += n_id
            p[0] = 0x32  # Event field 6 (payload)
            p += 1
            p += _put_varint(p, <uint64_t>n_body)
            memcpy(p, PyBytes_AS_STRING(body), n_body)
            p += n_body
            _copy(p, actor)
            events.append(event)
