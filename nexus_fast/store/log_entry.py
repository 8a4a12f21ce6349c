"""The replicated log's record: state-store requests <-> protobuf ``LogEntry`` bytes.

One entry is one group commit of the cluster leader (``nexus_fast.store.replicated``): the
requests of that batch, each as the leader's ``commit(ops, events, audit)`` received it.
Every replica applies an entry as ONE ``LmdbStore.commit`` of all its requests plus the
``cluster_applied_seq`` marker (:func:`applied_put`), so the entry and the applied position
are one LMDB transaction, and the event indices and the audit chain, assigned by each
replica's writer in request order, come out the same everywhere.

Requests are encoded one by one when they are queued (:func:`encode_request`: the size is
known at ``commit()``, and a request too big for an entry fails there) and an entry is the
concatenation of the encoded requests behind a small header (:func:`encode_entry`): protobuf
lets a repeated message field be written as consecutive length-prefixed records, so the
group-commit task never re-serializes anything.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from typing import Final, NamedTuple

from google.protobuf.message import DecodeError

from nexus_fast import errors
from nexus_fast.pb import cluster_pb2
from nexus_fast.store.audit_chain import AuditRecord
from nexus_fast.store.base import CommitResult, Delete, DeleteRange, Op, Put

OP_PUT: Final = 0
OP_DELETE: Final = 1
OP_DELETE_RANGE: Final = 2

APPLIED_DB: Final = "meta"
APPLIED_KEY: Final = b"cluster_applied_seq"
"""Key in ``meta`` holding the seq of the newest applied entry (8-byte big-endian)."""

_SEQ = struct.Struct(">Q")
_REQUESTS_TAG: Final = b"\x1a"  # LogEntry.requests: field 3, wire type 2 (length-delimited)
_NO_EVENTS: Final = CommitResult(0, 0)
ENTRY_HEADER_MAX: Final = 22
"""Most bytes the seq and term fields take (two tags and two 10-byte varints)."""


class EntryTooLarge(errors.InvalidArgument, ValueError):
    """One request alone is larger than a log entry may be (``max_entry_bytes``)."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            "request",
            f"{size} bytes encoded exceed the cluster's max_entry_bytes ({limit}); "
            "split the change into smaller requests",
        )
        self.size = size
        self.limit = limit


class BadEntry(errors.Unavailable):
    """A log entry does not decode (a damaged or foreign value under the log prefix)."""


class DecodedRequest(NamedTuple):
    """One decoded request of an entry: the arguments of the leader's ``commit()``."""

    ops: tuple[Op, ...]
    events: tuple[bytes, ...]
    audit: tuple[AuditRecord, ...]


class DecodedEntry(NamedTuple):
    """A decoded entry."""

    seq: int
    term: int
    requests: list[DecodedRequest]


def log_prefix(prefix: bytes) -> bytes:
    """The etcd key prefix of the log under the cluster prefix (``{prefix}/log/``)."""
    return prefix + b"/log/"


def log_key(prefix: bytes, seq: int) -> bytes:
    """etcd key of entry ``seq``: zero-padded so keys sort by seq."""
    return b"%s/log/%020d" % (prefix, seq)


def log_seq(prefix: bytes, key: bytes) -> int:
    """Inverse of :func:`log_key`; ``ValueError`` for a key that is not a log key."""
    head = log_prefix(prefix)
    tail = key[len(head) :]
    if not key.startswith(head) or len(tail) != 20 or not tail.isdigit():
        raise ValueError(f"not a log key: {key!r:.120}")
    return int(tail)


def applied_put(seq: int) -> Put:
    """The op recording ``seq`` as applied, committed with the entry it belongs to."""
    return Put(APPLIED_DB, APPLIED_KEY, _SEQ.pack(seq))


def decode_applied(raw: bytes | None) -> int:
    """The applied seq stored by :func:`applied_put` (0 when absent)."""
    if raw is None:
        return 0
    if len(raw) != _SEQ.size:
        raise ValueError(f"{APPLIED_KEY.decode()} must be 8 bytes, got {len(raw)}")
    return int(_SEQ.unpack(raw)[0])


def encode_request(
    ops: Sequence[Op], events: Sequence[bytes], audit: Sequence[AuditRecord]
) -> bytes:
    """One ``LogRequest`` message's bytes (validated by the caller: ops are Put/Delete/DeleteRange)."""
    msg = cluster_pb2.LogRequest()
    add_op = msg.ops.add
    for op in ops:
        if type(op) is Put:
            add_op(kind=OP_PUT, db=op.db, key=op.key, value=op.value)
        elif type(op) is Delete:
            add_op(kind=OP_DELETE, db=op.db, key=op.key)
        elif type(op) is DeleteRange:
            if op.end is None:
                add_op(kind=OP_DELETE_RANGE, db=op.db, key=op.start)
            else:
                add_op(kind=OP_DELETE_RANGE, db=op.db, key=op.start, end=op.end, has_end=True)
        else:
            raise ValueError(f"unknown op {op!r:.80}")
    msg.events.extend(events)
    add_audit = msg.audit.add
    for rec in audit:
        add_audit(
            principal=rec.principal,
            role=rec.role,
            peer=rec.peer,
            method=rec.method,
            target=rec.target,
            request_id=rec.request_id,
            outcome=rec.outcome,
            time_ms=rec.time_ms,
            suppressed=rec.suppressed,
        )
    return msg.SerializeToString()


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def framed_size(encoded_request: bytes) -> int:
    """Bytes ``encoded_request`` adds to an entry (tag, length prefix, body)."""
    return 1 + len(_varint(len(encoded_request))) + len(encoded_request)


def encode_entry(seq: int, term: int, encoded_requests: Sequence[bytes]) -> bytes:
    """A ``LogEntry``'s bytes from requests already encoded by :func:`encode_request`."""
    parts = [cluster_pb2.LogEntry(seq=seq, term=term).SerializeToString()]
    for body in encoded_requests:
        parts.append(_REQUESTS_TAG)
        parts.append(_varint(len(body)))
        parts.append(body)
    return b"".join(parts)


def _decode_op(op: cluster_pb2.LogOp) -> Op:
    kind = op.kind
    if kind == OP_PUT:
        return Put(op.db, op.key, op.value)
    if kind == OP_DELETE:
        return Delete(op.db, op.key)
    if kind == OP_DELETE_RANGE:
        return DeleteRange(op.db, op.key, op.end if op.has_end else None)
    raise BadEntry(f"log entry holds an op of unknown kind {kind}")


def decode_entry(data: bytes) -> DecodedEntry:
    """Decode an entry's bytes; :class:`BadEntry` when they are not a valid entry."""
    try:
        msg = cluster_pb2.LogEntry.FromString(data)
    except DecodeError as exc:
        raise BadEntry(f"log entry does not decode: {exc}") from None
    requests: list[DecodedRequest] = []
    for req in msg.requests:
        try:
            audit = tuple(
                AuditRecord(
                    a.principal,
                    a.role,
                    a.peer,
                    a.method,
                    a.target,
                    a.request_id,
                    a.outcome,
                    a.time_ms,
                    a.suppressed,
                )
                for a in req.audit
            )
        except (TypeError, ValueError) as exc:
            raise BadEntry(f"log entry {msg.seq} holds a bad audit record: {exc}") from None
        requests.append(
            DecodedRequest(tuple(_decode_op(op) for op in req.ops), tuple(req.events), audit)
        )
    return DecodedEntry(msg.seq, msg.term, requests)


def flatten(
    requests: Sequence[DecodedRequest],
) -> tuple[list[Op], list[bytes], list[AuditRecord]]:
    """The ops, events and audit records of ``requests`` in order, for one store commit."""
    ops: list[Op] = []
    events: list[bytes] = []
    audit: list[AuditRecord] = []
    for req in requests:
        ops.extend(req.ops)
        events.extend(req.events)
        audit.extend(req.audit)
    return ops, events, audit


def split_result(result: CommitResult, event_counts: Sequence[int]) -> list[CommitResult]:
    """Each request's own :class:`CommitResult` from the range one commit of all of them got.

    ``event_counts[i]`` is how many events request ``i`` carried; requests without events
    get ``(0, 0)``, as from ``LmdbStore.commit``.
    """
    total = sum(event_counts)
    first, last = result
    if total != (last - first + 1 if first else 0):
        raise ValueError(f"{total} events do not fit the committed range {first}..{last}")
    out: list[CommitResult] = []
    idx = first
    for n in event_counts:
        if n:
            out.append(CommitResult(idx, idx + n - 1))
            idx += n
        else:
            out.append(_NO_EVENTS)
    return out
