# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Stored events read from their bytes, compiled twin of ``nexus_fast/_eventlog_py.py``.

Same functions, same results (the pure twin is the typed source of truth, and
tests/unit/test_eventlog.py feeds both the same bytes). Here the protobuf wire walk runs in
C over the buffer of each value, and :func:`collect_batch` copies each stored body from
the LMDB map (the ``buffers=True`` view the cursor yields) straight into one growing C
buffer behind its field header: per event, one C walk of the body and one ``memcpy``, and
no Python object of ours. Every read of the buffers is bounded by their length (checked
in the walk), so boundscheck/wraparound are off.
"""

from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, _PyBytes_Resize
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport int64_t, uint8_t, uint64_t
from cpython.object cimport PyObject
from cpython.ref cimport Py_DECREF, Py_INCREF, Py_XDECREF
from libc.string cimport memcpy

# One exception type for both twins, so callers catch it whichever one runs.
from nexus_fast._eventlog_py import MalformedEvent

__all__ = ("MalformedEvent", "collect_batch", "event_head")


cdef struct Head:
    bint has_index
    int64_t time_ms
    Py_ssize_t topic_at
    Py_ssize_t topic_len
    Py_ssize_t type_at
    Py_ssize_t type_len
    Py_ssize_t key_at
    Py_ssize_t key_len


cdef inline Py_ssize_t _varint(
    const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, uint64_t* out
) noexcept nogil:
    """The varint at ``pos`` into ``out``; the position after it, or -1 when malformed."""
    cdef uint64_t value = 0
    cdef int shift = 0
    cdef uint8_t byte
    if pos < end and p[pos] < 0x80:  # the common case: one byte
        out[0] = p[pos]
        return pos + 1
    while True:
        if pos >= end or shift >= 70:
            return -1
        byte = p[pos]
        pos += 1
        if shift < 64:
            value |= (<uint64_t>(byte & 0x7F)) << shift
        if byte < 0x80:
            out[0] = value
            return pos
        shift += 7


cdef inline bint _cont(uint8_t c) noexcept nogil:
    return 0x80 <= c <= 0xBF


cdef bint _utf8(const uint8_t* s, Py_ssize_t n) noexcept nogil:
    """Strict UTF-8 (no overlongs, surrogates or code points past U+10FFFF), as Python's."""
    cdef Py_ssize_t i = 0
    cdef uint64_t word
    cdef uint8_t c, c1
    while i < n:
        if i + 8 <= n:  # ASCII runs eight bytes at a time
            memcpy(&word, s + i, 8)
            if not (word & 0x8080808080808080ULL):
                i += 8
                continue
        c = s[i]
        if c < 0x80:
            i += 1
        elif c < 0xC2:
            return False
        elif c < 0xE0:
            if i + 1 >= n or not _cont(s[i + 1]):
                return False
            i += 2
        elif c < 0xF0:
            if i + 2 >= n:
                return False
            c1 = s[i + 1]
            if c == 0xE0:
                if not (0xA0 <= c1 <= 0xBF):
                    return False
            elif c == 0xED:
                if not (0x80 <= c1 <= 0x9F):
                    return False
            elif not _cont(c1):
                return False
            if not _cont(s[i + 2]):
                return False
            i += 3
        elif c < 0xF5:
            if i + 3 >= n:
                return False
            c1 = s[i + 1]
            if c == 0xF0:
                if not (0x90 <= c1 <= 0xBF):
                    return False
            elif c == 0xF4:
                if not (0x80 <= c1 <= 0x8F):
                    return False
            elif not _cont(c1):
                return False
            if not (_cont(s[i + 2]) and _cont(s[i + 3])):
                return False
            i += 4
        else:
            return False
    return True


cdef inline Py_ssize_t _tag(
    const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, uint64_t* field, int* wire
) noexcept nogil:
    """The tag at ``pos``: field number and wire type; the position after it, or -1."""
    cdef uint64_t tag
    pos = _varint(p, pos, end, &tag)
    if pos < 0:
        return -1
    field[0] = tag >> 3
    wire[0] = <int>(tag & 7)
    if field[0] == 0 or field[0] > 536870911:  # protobuf's field numbers: 1 .. 2**29 - 1
        return -1
    return pos


cdef inline Py_ssize_t _skip(
    const uint8_t* p, Py_ssize_t pos, Py_ssize_t end, int wire, uint64_t* value,
    Py_ssize_t* start
) noexcept nogil:
    """Past the value of wire type ``wire`` (``value``: a varint's value or a length,
    ``start``: where a length-delimited value begins); the next position, or -1."""
    if wire == 0:
        return _varint(p, pos, end, value)
    if wire == 2:
        pos = _varint(p, pos, end, value)
        if pos < 0 or value[0] > <uint64_t>(end - pos):
            return -1
        start[0] = pos
        return pos + <Py_ssize_t>value[0]
    if wire == 1 or wire == 5:
        pos += 8 if wire == 1 else 4
        return pos if pos <= end else -1
    return -1


cdef int _check_entry(const uint8_t* p, Py_ssize_t pos, Py_ssize_t end) noexcept nogil:
    """A details map entry: its key (1) and value (2) are UTF-8 strings. 0, or -1."""
    cdef uint64_t field, value
    cdef int wire
    cdef Py_ssize_t start = 0
    while pos < end:
        pos = _tag(p, pos, end, &field, &wire)
        if pos < 0 or (field <= 2 and wire != 2):
            return -1
        pos = _skip(p, pos, end, wire, &value, &start)
        if pos < 0:
            return -1
        if field <= 2 and not _utf8(p + start, pos - start):
            return -1
    return 0


cdef inline int _parse(const uint8_t* p, Py_ssize_t end, Head* h) noexcept nogil:
    """Walk a serialized pb.Event (see _eventlog_py.event_head); 0, or -1 when malformed."""
    cdef Py_ssize_t pos = 0, start = 0, n
    cdef uint64_t field, value
    cdef int wire
    h.has_index = False
    h.time_ms = 0
    h.topic_at = h.topic_len = 0
    h.type_at = h.type_len = 0
    h.key_at = h.key_len = 0
    while pos < end:
        pos = _tag(p, pos, end, &field, &wire)
        if pos < 0:
            return -1
        if field <= 2:
            if wire != 0:
                return -1
        elif field <= 8:
            if wire != 2:
                return -1
        pos = _skip(p, pos, end, wire, &value, &start)
        if pos < 0:
            return -1
        if field == 1:
            h.has_index = True
        elif field == 2:
            h.time_ms = <int64_t>value
        elif field <= 5 or field == 7:
            n = pos - start
            if not _utf8(p + start, n):
                return -1
            if field == 3:
                h.topic_at = start
                h.topic_len = n
            elif field == 4:
                h.type_at = start
                h.type_len = n
            elif field == 5:
                h.key_at = start
                h.key_len = n
        elif field == 8:
            if _check_entry(p, start, pos) < 0:
                return -1
    return 0


cdef inline str _str(const uint8_t* p, Py_ssize_t at, Py_ssize_t n):
    return PyUnicode_DecodeUTF8(<const char*>(p + at), n, NULL)


def event_head(body):
    """``(has_index, time_ms, topic, type, key)`` of a serialized ``pb.Event``."""
    cdef Py_buffer view
    cdef Head h
    cdef const uint8_t* p
    PyObject_GetBuffer(body, &view, PyBUF_SIMPLE)
    try:
        p = <const uint8_t*>view.buf
        if _parse(p, view.len, &h) < 0:
            raise MalformedEvent("not a well-formed serialized Event")
        return (  # the walk checked the strings: decoding them cannot fail
            bool(h.has_index),
            h.time_ms,
            _str(p, h.topic_at, h.topic_len),
            _str(p, h.type_at, h.type_len),
            _str(p, h.key_at, h.key_len),
        )
    finally:
        PyBuffer_Release(&view)


cdef struct Out:
    PyObject* data  # the batch: a bytes object written in place, shrunk to ``len`` at the end
    char* buf
    Py_ssize_t len
    Py_ssize_t cap


cdef int _reserve(Out* out, Py_ssize_t more, Py_ssize_t hint) except -1:
    """Room for ``more`` bytes; the first call allocates ``hint`` (the batch's byte bound)."""
    cdef Py_ssize_t cap = out.cap
    if out.len + more <= cap:
        return 0
    cdef object fresh
    if out.data == NULL:
        cap = hint if hint > more else more
        fresh = PyBytes_FromStringAndSize(NULL, cap)
        Py_INCREF(fresh)  # the struct's reference: the only one once this returns
        out.data = <PyObject*>fresh
    else:
        while cap < out.len + more:
            cap *= 2
        _PyBytes_Resize(&out.data, cap)
    out.buf = PyBytes_AS_STRING(<object>out.data)
    out.cap = cap
    return 0


cdef inline Py_ssize_t _put_varint(char* dst, uint64_t value) noexcept nogil:
    cdef Py_ssize_t n = 0
    while value > 0x7F:
        dst[n] = <char>((value & 0x7F) | 0x80)
        value >>= 7
        n += 1
    dst[n] = <char>value
    return n + 1


cdef inline Py_ssize_t _varint_len(uint64_t value) noexcept nogil:
    cdef Py_ssize_t n = 1
    while value > 0x7F:
        value >>= 7
        n += 1
    return n


cdef inline uint64_t _index_of(const uint8_t* k, Py_ssize_t n) noexcept nogil:
    cdef uint64_t v = 0
    cdef Py_ssize_t i
    for i in range(n):
        v = (v << 8) | k[i]
    return v


cdef bytes _pack_index(int64_t index):
    cdef char k[8]
    cdef int i
    for i in range(8):
        k[7 - i] = <char>((<uint64_t>index >> (8 * i)) & 0xFF)
    return PyBytes_FromStringAndSize(k, 8)


cdef uint64_t _key_index(object key) except? 0:
    """The index of an 8-byte big-endian key (0 for any other length: never an event)."""
    cdef Py_buffer kv
    cdef uint64_t index = 0
    PyObject_GetBuffer(key, &kv, PyBUF_SIMPLE)
    if kv.len == 8:
        index = _index_of(<const uint8_t*>kv.buf, kv.len)
    PyBuffer_Release(&kv)
    return index


def collect_batch(
    cursor,
    int64_t after,
    int64_t upto,
    Py_ssize_t max_events,
    Py_ssize_t max_bytes,
    Py_ssize_t scan_limit,
    topics,
    keys,
    fallback,
):
    """One serialized ``EventBatch`` of the matching events after ``after`` (see the twin).

    The fast walk reads values only (``iternext(keys=False)``: one view per event instead
    of a tuple and two) and numbers them from the first key, which it checks; afterwards it
    checks that the key where it stopped is the one that numbering predicts. Keys are
    strictly increasing, so that proves no index was skipped. Were one skipped (the log is
    gap-free by construction: indices are assigned one by one and pruning removes a prefix),
    the step is walked again reading every key, as the twin does.
    """
    cdef int64_t first, scanned, stop_index, predicted
    cdef tuple done
    if after < 0:
        raise ValueError("after must be >= 0")
    if not cursor.set_range(_pack_index(after + 1)):
        return b"", 0, after
    first = <int64_t>_key_index(cursor.key())
    if first != after + 1:
        return b"", 0, after
    done = _walk(cursor.iternext(False, True), False, after, upto, max_events, max_bytes,
                 scan_limit, topics, keys, fallback)
    scanned = done[3]
    if scanned:
        if done[4]:  # stopped at an item: the cursor is on it
            stop_index = <int64_t>_key_index(cursor.key())
            predicted = after + 1 + scanned
        else:  # ran off the end of the log
            cursor.last()
            stop_index = <int64_t>_key_index(cursor.key())
            predicted = after + scanned
        if stop_index != predicted:
            cursor.set_range(_pack_index(after + 1))
            done = _walk(cursor.iternext(True, True), True, after, upto, max_events,
                         max_bytes, scan_limit, topics, keys, fallback)
    return done[:3]


cdef tuple _walk(
    object items,
    bint keyed,
    int64_t after,
    int64_t upto,
    Py_ssize_t max_events,
    Py_ssize_t max_bytes,
    Py_ssize_t scan_limit,
    object topics,
    object keys,
    object fallback,
):
    """(batch, count, last examined, examined, stopped at an item) of one walk."""
    cdef Py_ssize_t count = 0, scanned = 0
    cdef int64_t examined = after
    cdef bint stopped = False
    cdef Out batch
    cdef Out* out = &batch
    # The batch's bytes object is allocated at its bound (one event more than max_bytes
    # rarely goes beyond) and shrunk once at the end: no copy of the batch.
    cdef Py_ssize_t hint = max_bytes + 64 if max_bytes < (1 << 22) else (1 << 22)
    out.data = NULL
    out.buf = NULL
    out.len = 0
    out.cap = 0
    try:
        _fill(out, hint, items, keyed, after, upto, max_events, max_bytes, scan_limit,
              topics, keys, fallback, &count, &examined, &scanned, &stopped)
    except BaseException:
        Py_XDECREF(out.data)
        raise
    if out.data == NULL:
        return (b"", count, examined, scanned, stopped)
    _PyBytes_Resize(&out.data, out.len)
    data = <object>out.data
    Py_DECREF(data)  # the struct's reference; ``data`` holds its own
    return (data, count, examined, scanned, stopped)


cdef int _fill(
    Out* out,
    Py_ssize_t hint,
    object items,
    bint keyed,
    int64_t after,
    int64_t upto,
    Py_ssize_t max_events,
    Py_ssize_t max_bytes,
    Py_ssize_t scan_limit,
    object topics,
    object keys,
    object fallback,
    Py_ssize_t* count_out,
    int64_t* examined_out,
    Py_ssize_t* scanned_out,
    bint* stopped_out,
) except -1:
    """The walk itself: events into ``out`` until a bound (see collect_batch)."""
    cdef Py_buffer vv
    cdef Head h
    cdef const uint8_t* p
    cdef Py_ssize_t n, count = 0, size = 0, scanned = 0, cost = 0, inner
    cdef int64_t index = after, examined = after
    cdef bint take, framed, stopped = False
    cdef object value, item, topic, env, field
    for item in items:
        if keyed:
            index = <int64_t>_key_index((<tuple>item)[0])
            value = (<tuple>item)[1]
        else:
            index = examined + 1
            value = item
        if index != examined + 1 or index > upto or scanned >= scan_limit or count >= max_events:
            stopped = True
            break
        PyObject_GetBuffer(value, &vv, PyBUF_SIMPLE)
        try:
            p = <const uint8_t*>vv.buf
            n = vv.len
            framed = _parse(p, n, &h) < 0 or h.has_index
            if framed:
                env = fallback(index, PyBytes_FromStringAndSize(<const char*>p, n))
                topic = env.topic
                take = (topics is None or topic in topics) and (keys is None or env.key in keys)
                if take:
                    field = env.pb_field
                    cost = len(field)
                    if count and size + cost > max_bytes:
                        stopped = True
                        break
                    _reserve(out, cost, hint)
                    memcpy(out.buf + out.len, PyBytes_AS_STRING(field), cost)
                    out.len += cost
            else:
                take = True
                if topics is not None:
                    take = _str(p, h.topic_at, h.topic_len) in topics
                if take and keys is not None:
                    take = _str(p, h.key_at, h.key_len) in keys
                if take:
                    inner = 1 + _varint_len(<uint64_t>index) + n
                    cost = 1 + _varint_len(<uint64_t>inner) + inner
                    if count and size + cost > max_bytes:
                        stopped = True
                        break
                    _reserve(out, cost, hint)
                    out.buf[out.len] = 0x0A  # EventBatch.events, length-delimited
                    out.len += 1
                    out.len += _put_varint(out.buf + out.len, <uint64_t>inner)
                    out.buf[out.len] = 0x08  # Event.index, varint
                    out.len += 1
                    out.len += _put_varint(out.buf + out.len, <uint64_t>index)
                    memcpy(out.buf + out.len, p, n)
                    out.len += n
        finally:
            PyBuffer_Release(&vv)
        if take:
            size += cost
            count += 1
        examined = index
        scanned += 1
    count_out[0] = count
    examined_out[0] = examined
    scanned_out[0] = scanned
    stopped_out[0] = stopped
    return 0
