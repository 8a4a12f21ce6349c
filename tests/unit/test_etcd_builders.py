"""etcd client pieces that need no server: prefix ranges, compare/op builders, errors."""

from __future__ import annotations

import pytest

from nexus_fast import errors
from nexus_fast.cluster.etcd import (
    EtcdClient,
    EtcdCompacted,
    EtcdError,
    cmp_create_revision,
    cmp_mod_revision,
    cmp_value,
    cmp_version,
    op_delete,
    op_put,
    op_range,
    prefix_end,
)
from nexus_fast.pb import etcd_rpc_pb2 as pb


@pytest.mark.parametrize(
    ("prefix", "end"),
    [
        (b"/nexus/log/", b"/nexus/log0"),  # "/" + 1 = "0"
        (b"a", b"b"),
        (b"a\xff", b"b"),  # trailing 0xff bytes carry over
        (b"a\xfe\xff\xff", b"a\xff"),
        (b"\xff\xff", b"\0"),  # no key above: the whole keyspace from the prefix on
        (b"", b"\0"),
    ],
)
def test_prefix_end(prefix: bytes, end: bytes) -> None:
    assert prefix_end(prefix) == end


def test_prefix_end_bounds_exactly_the_prefixed_keys() -> None:
    prefix = b"/p/\xff"
    end = prefix_end(prefix)
    inside = [prefix, prefix + b"\0", prefix + b"\xff" * 8]
    outside = [b"/p/\xfe", b"/p0", b"/q"]
    assert all(prefix <= k < end for k in inside)
    assert not any(prefix <= k < end for k in outside)


def test_compare_builders_set_etcds_fields() -> None:
    c = cmp_create_revision(b"/l", "==", 0)
    assert (c.key, c.result, c.target, c.create_revision) == (
        b"/l", pb.Compare.EQUAL, pb.Compare.CREATE, 0
    )  # fmt: skip
    assert c.WhichOneof("target_union") == "create_revision"  # 0 is sent, not "unset"
    v = cmp_version(b"/k", "!=", 3)
    assert (v.result, v.target, v.version) == (pb.Compare.NOT_EQUAL, pb.Compare.VERSION, 3)
    m = cmp_mod_revision(b"/k", "<", 9)
    assert (m.result, m.target, m.mod_revision) == (pb.Compare.LESS, pb.Compare.MOD, 9)
    x = cmp_value(b"/k", ">", b"abc")
    assert (x.result, x.target, x.value) == (pb.Compare.GREATER, pb.Compare.VALUE, b"abc")
    # Field numbers are etcd's (the wire carries numbers, not names).
    assert pb.Compare.DESCRIPTOR.fields_by_name["range_end"].number == 64
    assert pb.WatchResponse.DESCRIPTOR.fields_by_name["events"].number == 11
    assert pb.DESCRIPTOR.package == "etcdserverpb"


def test_compare_rejects_unknown_operators() -> None:
    with pytest.raises(ValueError, match="compare operator"):
        cmp_version(b"/k", "<=", 1)  # type: ignore[arg-type]


def test_op_builders() -> None:
    put = op_put(b"/k", b"v", lease=7)
    assert put.WhichOneof("request") == "request_put"
    assert (put.request_put.key, put.request_put.value, put.request_put.lease) == (b"/k", b"v", 7)
    d = op_delete(b"/a", b"/b")
    assert (d.request_delete_range.key, d.request_delete_range.range_end) == (b"/a", b"/b")
    assert op_delete(b"/a").request_delete_range.range_end == b""
    r = op_range(b"/a", prefix_end(b"/a"))
    assert (r.request_range.key, r.request_range.range_end) == (b"/a", b"/b")


def test_errors_are_unavailable_and_name_etcd() -> None:
    exc = EtcdError("put: no answer", ["127.0.0.1:1", "127.0.0.1:2"], maybe_committed=True)
    assert isinstance(exc, errors.Unavailable)
    assert str(exc) == "etcd unavailable: put: no answer (endpoints 127.0.0.1:1, 127.0.0.1:2)"
    assert exc.maybe_committed
    compacted = EtcdCompacted(42)
    assert isinstance(compacted, EtcdError) and compacted.compact_revision == 42
    assert str(compacted).startswith("etcd unavailable: ")


def test_client_endpoints_and_arguments() -> None:
    client = EtcdClient(["http://127.0.0.1:2379", "127.0.0.1:2380"], timeout=1.5)
    assert client.endpoints == ["127.0.0.1:2379", "127.0.0.1:2380"]
    with pytest.raises(ValueError):
        EtcdClient([])
    with pytest.raises(ValueError):
        EtcdClient(["127.0.0.1:2379"], timeout=0)
