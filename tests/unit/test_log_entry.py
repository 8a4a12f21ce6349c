"""The replicated log's codec: requests <-> LogEntry bytes, and CommitResult splitting."""

from __future__ import annotations

import pytest

from nexus_fast import errors
from nexus_fast.pb import cluster_pb2
from nexus_fast.store.audit_chain import AuditRecord
from nexus_fast.store.base import CommitResult, Delete, DeleteRange, Put
from nexus_fast.store.log_entry import (
    ENTRY_HEADER_MAX,
    BadEntry,
    DecodedRequest,
    EntryTooLarge,
    applied_put,
    decode_applied,
    decode_entry,
    encode_entry,
    encode_request,
    flatten,
    framed_size,
    log_key,
    log_prefix,
    log_seq,
    split_result,
)

OPS = (
    Put("nodes", b"n1", b"\x00\xffvalue"),
    Put("commands", b"c1", b""),
    Delete("nodes", b"gone"),
    DeleteRange("agents", b"a", b"b"),
    DeleteRange("agents", b"", b""),  # an empty end is still an end
    DeleteRange("commands", b"x", None),
)
AUDIT = (
    AuditRecord("alice", "admin", "ipv4:1.2.3.4:5", "/x/Y", "node-1", "r1", "ok", 123, 0),
    AuditRecord("é" * 600, "", "", "", "", "", "PERMISSION_DENIED", 2**63 - 1, 7),
)


def test_round_trip_is_exact() -> None:
    one = encode_request(OPS, (b"e1", b"", b"\x00" * 300), AUDIT)
    two = encode_request((), (), ())
    three = encode_request((Put("meta", b"k", b"v"),), (b"only",), ())
    data = encode_entry(42, 7, [one, two, three])
    entry = decode_entry(data)
    assert (entry.seq, entry.term) == (42, 7)
    assert entry.requests == [
        DecodedRequest(OPS, (b"e1", b"", b"\x00" * 300), AUDIT),
        DecodedRequest((), (), ()),
        DecodedRequest((Put("meta", b"k", b"v"),), (b"only",), ()),
    ]
    # The clipped audit field survives as clipped, byte for byte.
    assert entry.requests[0].audit[1].principal == AUDIT[1].principal
    # The concatenated framing is what protobuf itself writes for the same message.
    msg = cluster_pb2.LogEntry(seq=42, term=7)
    for body in (one, two, three):
        msg.requests.append(cluster_pb2.LogRequest.FromString(body))
    assert msg.SerializeToString() == data


def test_sizes_are_exact() -> None:
    body = encode_request(OPS, (b"x" * 200,), AUDIT)
    assert len(encode_entry(1, 1, [body])) == len(encode_entry(1, 1, [])) + framed_size(body)
    header = encode_entry(2**64 - 1, 2**64 - 1, [])
    assert len(header) == ENTRY_HEADER_MAX


def test_flatten_keeps_request_order() -> None:
    reqs = [
        DecodedRequest((Put("nodes", b"a", b"1"),), (b"e1",), AUDIT[:1]),
        DecodedRequest((Delete("nodes", b"a"),), (b"e2", b"e3"), ()),
    ]
    ops, events, audit = flatten(reqs)
    assert ops == [Put("nodes", b"a", b"1"), Delete("nodes", b"a")]
    assert events == [b"e1", b"e2", b"e3"]
    assert audit == list(AUDIT[:1])


def test_split_result() -> None:
    assert split_result(CommitResult(10, 14), [2, 0, 3]) == [
        CommitResult(10, 11),
        CommitResult(0, 0),
        CommitResult(12, 14),
    ]
    assert split_result(CommitResult(0, 0), [0, 0]) == [CommitResult(0, 0)] * 2
    with pytest.raises(ValueError, match="do not fit"):
        split_result(CommitResult(10, 14), [2, 2])


def test_bad_bytes_are_a_typed_error() -> None:
    with pytest.raises(BadEntry, match="does not decode"):
        decode_entry(b"\xff\xff\xff")
    bad_kind = cluster_pb2.LogEntry(seq=1, term=1)
    bad_kind.requests.add().ops.add(kind=9, db="nodes", key=b"k")
    with pytest.raises(BadEntry, match="unknown kind 9"):
        decode_entry(bad_kind.SerializeToString())
    assert isinstance(BadEntry("x"), errors.Unavailable)


def test_keys_and_applied_marker() -> None:
    key = log_key(b"/nexus", 17)
    assert key == b"/nexus/log/00000000000000000017"
    assert key.startswith(log_prefix(b"/nexus"))
    assert log_seq(b"/nexus", key) == 17
    assert sorted([log_key(b"/p", 10), log_key(b"/p", 9)]) == [
        log_key(b"/p", 9),
        log_key(b"/p", 10),
    ]
    for bad in (
        b"/nexus/log/12",
        b"/other/log/00000000000000000017",
        b"/nexus/log/0000000000000000001x",
    ):
        with pytest.raises(ValueError):
            log_seq(b"/nexus", bad)
    op = applied_put(2**40 + 3)
    assert (op.db, op.key) == ("meta", b"cluster_applied_seq")
    assert decode_applied(op.value) == 2**40 + 3
    assert decode_applied(None) == 0
    with pytest.raises(ValueError):
        decode_applied(b"\x01")


def test_entry_too_large_is_invalid_argument_and_value_error() -> None:
    exc = EntryTooLarge(2000, 1024)
    assert isinstance(exc, ValueError)
    assert isinstance(exc, errors.InvalidArgument)
    assert "max_entry_bytes (1024)" in str(exc)
