"""The plain pieces of the etcd client: errors, values, compare/op builders, prefix ranges.

Import them from :mod:`nexus_fast.cluster.etcd` (which re-exports them); they live here so
the client and its watch share them without importing each other.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

from nexus_fast import errors
from nexus_fast.pb import etcd_rpc_pb2 as pb

Compare = pb.Compare
RequestOp = pb.RequestOp
CompareOp = Literal["==", "!=", "<", ">"]

# etcd refuses a call carrying this when it has no raft leader (rpctypes.MetadataRequireLeaderKey),
# and cancels such a watch or keepalive stream when its member loses the leader.
REQUIRE_LEADER = (("hasleader", "true"),)


class EtcdError(errors.Unavailable):
    """etcd could not do it: no reachable member with a leader within the timeout, or etcd
    refused the request. ``code`` is the last gRPC status name seen ("" if none);
    ``maybe_committed`` is True when a mutation may have been applied anyway."""

    def __init__(
        self,
        message: str,
        endpoints: Sequence[str] = (),
        *,
        code: str = "",
        maybe_committed: bool = False,
    ) -> None:
        where = f" (endpoints {', '.join(endpoints)})" if endpoints else ""
        super().__init__(f"etcd unavailable: {message}{where}")
        self.code = code
        self.maybe_committed = maybe_committed
        self.endpoints = list(endpoints)


class EtcdCompacted(EtcdError):
    """The revision asked for is older than etcd's compaction point (``compact_revision``,
    0 when etcd did not say): read the current state instead of the history."""

    def __init__(self, compact_revision: int, endpoints: Sequence[str] = ()) -> None:
        super().__init__(
            f"revision compacted (etcd keeps revisions from {compact_revision})",
            endpoints,
            code="OUT_OF_RANGE",
        )
        self.compact_revision = compact_revision


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as etcd stores it (mvccpb.KeyValue)."""

    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True, slots=True)
class WatchEvent:
    """One change seen by a watch; for "delete", ``kv.mod_revision`` is the deletion's."""

    kind: Literal["put", "delete"]
    kv: KeyValue


class TxnResult(NamedTuple):
    """A txn's outcome: which branch ran, the revision after it, each range op's kvs."""

    succeeded: bool
    revision: int
    ranges: list[list[KeyValue]]


@dataclass(slots=True)
class EndpointStatus:
    """One member's answer to Maintenance.Status; ``ok`` = it answered and knows a leader."""

    endpoint: str
    ok: bool
    leader: int = 0
    raft_term: int = 0
    revision: int = 0
    error: str = ""


def prefix_end(prefix: bytes) -> bytes:
    """The ``range_end`` covering every key that starts with ``prefix`` (etcd's
    GetPrefixRangeEnd): the last byte below 0xff incremented, what follows it dropped;
    ``b"\\0"`` (no upper bound) when there is none."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"


_RESULTS = {
    "==": pb.Compare.EQUAL,
    "!=": pb.Compare.NOT_EQUAL,
    "<": pb.Compare.LESS,
    ">": pb.Compare.GREATER,
}


def _result(op: str) -> pb.Compare.CompareResult:
    try:
        return _RESULTS[op]
    except KeyError:
        raise ValueError(f"compare operator must be one of == != < >, not {op!r}") from None


def cmp_create_revision(key: bytes, op: CompareOp, revision: int) -> pb.Compare:
    """Compare ``key``'s create revision (0 = the key does not exist)."""
    return pb.Compare(
        key=key, result=_result(op), target=pb.Compare.CREATE, create_revision=revision
    )


def cmp_mod_revision(key: bytes, op: CompareOp, revision: int) -> pb.Compare:
    """Compare ``key``'s last modification revision."""
    return pb.Compare(key=key, result=_result(op), target=pb.Compare.MOD, mod_revision=revision)


def cmp_version(key: bytes, op: CompareOp, version: int) -> pb.Compare:
    """Compare ``key``'s version (puts since its creation; 0 = the key does not exist)."""
    return pb.Compare(key=key, result=_result(op), target=pb.Compare.VERSION, version=version)


def cmp_value(key: bytes, op: CompareOp, value: bytes) -> pb.Compare:
    """Compare ``key``'s value (bytewise)."""
    return pb.Compare(key=key, result=_result(op), target=pb.Compare.VALUE, value=value)


def op_put(key: bytes, value: bytes, lease: int = 0) -> pb.RequestOp:
    """A txn op writing ``key`` (attached to ``lease`` when non-zero)."""
    return pb.RequestOp(request_put=pb.PutRequest(key=key, value=value, lease=lease))


def op_delete(key: bytes, range_end: bytes | None = None) -> pb.RequestOp:
    """A txn op deleting ``key`` (or ``[key, range_end)``)."""
    return pb.RequestOp(
        request_delete_range=pb.DeleteRangeRequest(key=key, range_end=range_end or b"")
    )


def op_range(key: bytes, range_end: bytes | None = None) -> pb.RequestOp:
    """A txn op reading ``key`` (or ``[key, range_end)``); its kvs land in ``TxnResult.ranges``."""
    return pb.RequestOp(request_range=pb.RangeRequest(key=key, range_end=range_end or b""))


def to_kv(m: pb.KeyValue) -> KeyValue:
    return KeyValue(m.key, m.value, m.create_revision, m.mod_revision, m.version, m.lease)
