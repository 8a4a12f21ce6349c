"""The audit log's storage format: a SHA-256 hash chain in the LMDB sub-database ``audit``.

Layout (one LMDB record per entry)::

    key   = seq as 8-byte big-endian (seq 1, 2, 3, ... with no gaps; keys sort by seq)
    value = hash (32 bytes) || body
    body  = canonical JSON of the entry: the :class:`AuditRecord` fields plus ``"seq"``,
            keys sorted, no whitespace (orjson ``OPT_SORT_KEYS``)
    hash  = SHA-256(previous hash || body); the previous hash of seq 1 is 32 zero bytes

Because each hash covers the one before it, changing, removing or reordering any stored
entry breaks every later link, and :func:`verify` names the first broken one. (Someone able
to rewrite the whole file can recompute the chain: keep the head hash that ``nexus-fast
audit verify`` prints somewhere else to detect that.)

Writing: the store's writer thread keeps the chain head (:class:`ChainHead`, read once at
open with :func:`head_from_last`) and, inside the write transaction that applies a batch,
turns the batch's records into puts with :func:`chain_puts`; it adopts the new head only
after the transaction commits, so a failed or retried transaction never leaves a gap.

This is the chain's storage format, so it lives with the store (the writer and the store
use it; the store imports nothing from ``security``). Which calls are audited and how
refusals are sampled is security policy: :mod:`nexus_fast.security.audit` and
:mod:`nexus_fast.security.auditing`.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple

import orjson

AUDIT_DB: Final = "audit"
"""Name of the LMDB sub-database holding the chain (one of the store's DATABASES)."""

HASH_SIZE: Final = 32
GENESIS_HASH: Final = bytes(HASH_SIZE)
"""The "previous hash" of the first entry."""

MAX_FIELD_CHARS: Final = 512
"""Longest string kept per field: a client-chosen request id cannot bloat the log."""

OUTCOME_OK: Final = "ok"

_SEQ = struct.Struct(">Q")
_FIELDS: Final = (
    "principal",
    "role",
    "peer",
    "method",
    "target",
    "request_id",
    "outcome",
    "time_ms",
    "suppressed",
)
_STR_FIELDS: Final = _FIELDS[:7]
_TRUNCATED = "…"


def _clip(value: str) -> str:
    if len(value) <= MAX_FIELD_CHARS and value.isascii():
        return value  # the usual case, without an encode
    # Lone surrogates cannot be encoded as UTF-8 (orjson refuses them); replace, never fail.
    if len(value) > MAX_FIELD_CHARS:
        value = value[: MAX_FIELD_CHARS - 1] + _TRUNCATED
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """Who did what to what, from where, and how it ended.

    ``outcome`` is ``"ok"`` or the refusal/failure code (``"PERMISSION_DENIED"``,
    ``"RESOURCE_EXHAUSTED"``, ...). ``time_ms`` is wall-clock Unix milliseconds.
    ``suppressed`` counts refusals of the same principal dropped by the
    :class:`~nexus_fast.security.audit.RefusalSampler` since its previous audited
    refusal. Strings longer than :data:`MAX_FIELD_CHARS` are truncated (ending in "…").
    """

    principal: str
    role: str
    peer: str
    method: str
    target: str
    request_id: str
    outcome: str
    time_ms: int
    suppressed: int = 0

    def __post_init__(self) -> None:
        for name in _STR_FIELDS:
            value = getattr(self, name)
            if type(value) is not str or len(value) > MAX_FIELD_CHARS or not value.isascii():
                if not isinstance(value, str):
                    raise TypeError(f"AuditRecord.{name} must be str, got {type(value).__name__}")
                object.__setattr__(self, name, _clip(value))
        for name in ("time_ms", "suppressed"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value < 2**63:
                raise ValueError(f"AuditRecord.{name} must be an int in 0..2**63-1, got {value!r}")

    @classmethod
    def now(
        cls,
        principal: str,
        role: str,
        peer: str,
        method: str,
        target: str = "",
        request_id: str = "",
        outcome: str = OUTCOME_OK,
        suppressed: int = 0,
    ) -> AuditRecord:
        """A record stamped with the current wall-clock time."""
        return cls(
            principal,
            role,
            peer,
            method,
            target,
            request_id,
            outcome,
            time.time_ns() // 1_000_000,
            suppressed,
        )

    def to_dict(self) -> dict[str, Any]:
        """The fields as a plain dict."""
        return {
            "principal": self.principal,
            "role": self.role,
            "peer": self.peer,
            "method": self.method,
            "target": self.target,
            "request_id": self.request_id,
            "outcome": self.outcome,
            "time_ms": self.time_ms,
            "suppressed": self.suppressed,
        }


class ChainHead(NamedTuple):
    """The newest entry of the chain: its sequence number and hash (``(0, GENESIS_HASH)``
    for an empty log)."""

    seq: int
    hash: bytes


EMPTY_HEAD: Final = ChainHead(0, GENESIS_HASH)


def audit_key(seq: int) -> bytes:
    """LMDB key of entry ``seq`` (8-byte big-endian, so keys sort by seq)."""
    return _SEQ.pack(seq)


def audit_seq(key: bytes | memoryview) -> int:
    """Inverse of :func:`audit_key`; ``ValueError`` when the key is not 8 bytes."""
    if len(key) != _SEQ.size:
        raise ValueError(f"audit key must be 8 bytes, got {len(key)}")
    return int(_SEQ.unpack(key)[0])


def canonical_body(seq: int, record: AuditRecord) -> bytes:
    """Deterministic bytes of one entry: the same record and seq always give the same bytes."""
    body = record.to_dict()
    body["seq"] = seq
    return orjson.dumps(body, option=orjson.OPT_SORT_KEYS)


def link_hash(prev_hash: bytes, body: bytes) -> bytes:
    """``SHA-256(prev_hash || body)``."""
    h = hashlib.sha256(prev_hash)
    h.update(body)
    return h.digest()


def encode_entry(prev_hash: bytes, seq: int, record: AuditRecord) -> tuple[bytes, bytes]:
    """The stored value of entry ``seq`` and its hash: ``(hash || body, hash)``."""
    body = canonical_body(seq, record)
    digest = link_hash(prev_hash, body)
    return digest + body, digest


def chain_puts(
    head: ChainHead, records: Sequence[AuditRecord]
) -> tuple[list[tuple[bytes, bytes]], ChainHead]:
    """``(key, value)`` pairs appending ``records`` after ``head``, and the new head.

    Pure: nothing changes until the caller writes the pairs (in key order, e.g. with
    ``cursor.putmulti(pairs, append=True)`` on the ``audit`` database) in the same write
    transaction as the change they record, and adopts the returned head once that
    transaction commits.
    """
    seq, prev = head
    pairs: list[tuple[bytes, bytes]] = []
    # encode_entry inlined: this runs in the store's writer thread, holding the GIL.
    pack = _SEQ.pack
    dumps = orjson.dumps
    sort_keys = orjson.OPT_SORT_KEYS
    sha256 = hashlib.sha256
    for record in records:
        seq += 1
        fields = record.to_dict()
        fields["seq"] = seq
        body = dumps(fields, option=sort_keys)
        prev = sha256(prev + body).digest()
        pairs.append((pack(seq), prev + body))
    return pairs, ChainHead(seq, prev)


def head_from_last(last: tuple[bytes, bytes] | None) -> ChainHead:
    """The chain head given the newest stored ``(key, value)`` (``None``: empty log).

    The store's writer calls this once at open (``cursor.last()`` on ``audit``). It trusts
    the entry; :func:`verify` is what checks it.
    """
    if last is None:
        return EMPTY_HEAD
    key, value = last
    if len(value) < HASH_SIZE:
        raise ValueError("newest audit entry is shorter than its hash")
    return ChainHead(audit_seq(key), bytes(value[:HASH_SIZE]))


def decode_entry(key: bytes, value: bytes) -> tuple[int, bytes, dict[str, Any]]:
    """``(seq, hash, body fields)`` of a stored entry; ``ValueError`` when malformed."""
    seq = audit_seq(key)
    if len(value) <= HASH_SIZE:
        raise ValueError("value shorter than hash + body")
    try:
        body = orjson.loads(value[HASH_SIZE:])
    except orjson.JSONDecodeError:
        raise ValueError("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ValueError("body is not a JSON object")
    return seq, bytes(value[:HASH_SIZE]), body


# --------------------------------------------------------------------------- verification


class ChainBreak(NamedTuple):
    """The first entry that does not continue the chain: its seq and why."""

    seq: int
    reason: str

    def __str__(self) -> str:
        return f"audit entry {self.seq}: {self.reason}"


class ChainVerifier:
    """Checks entries one at a time, in key order; :func:`verify` drives it over a cursor.

    After the entries, ``count`` is how many were good and ``head`` the last good link.
    ``start`` lets verification begin after a known link (e.g. a saved head) instead of
    from genesis.
    """

    __slots__ = ("broken", "count", "head")

    def __init__(self, start: ChainHead = EMPTY_HEAD) -> None:
        self.head = start
        self.count = 0
        self.broken: ChainBreak | None = None

    def feed(self, key: bytes, value: bytes) -> ChainBreak | None:
        """Check the next entry; returns (and keeps) the first break, ``None`` while intact."""
        if self.broken is not None:
            return self.broken
        expected = self.head.seq + 1
        try:
            seq = audit_seq(key)
        except ValueError as exc:
            return self._fail(expected, f"malformed key {bytes(key).hex()}: {exc}")
        if seq > expected:  # name the first missing entry, not the one after the hole
            return self._fail(expected, f"missing (the next stored entry is {seq})")
        if seq < expected:
            return self._fail(seq, f"out of order: comes after entry {self.head.seq}")
        value = bytes(value)
        if len(value) <= HASH_SIZE:
            return self._fail(seq, f"value is {len(value)} bytes, shorter than hash + body")
        stored, body = value[:HASH_SIZE], value[HASH_SIZE:]
        digest = link_hash(self.head.hash, body)
        if digest != stored:
            return self._fail(
                seq,
                "hash mismatch: entry changed or the chain was cut "
                f"(stored {stored.hex()[:16]}…, computed {digest.hex()[:16]}…)",
            )
        # The hash matched, so the body is what was written unless someone recomputed the
        # hash too; a body naming another seq is a moved entry.
        try:
            fields = orjson.loads(body)
        except orjson.JSONDecodeError:
            return self._fail(seq, "body is not valid JSON")
        if not isinstance(fields, dict) or fields.get("seq") != seq:
            return self._fail(seq, "body does not carry its own seq")
        self.head = ChainHead(seq, digest)
        self.count += 1
        return None

    def _fail(self, seq: int, reason: str) -> ChainBreak:
        self.broken = ChainBreak(seq, reason)
        return self.broken


def verify(
    entries: Iterable[tuple[bytes, bytes]], start: ChainHead = EMPTY_HEAD
) -> ChainBreak | None:
    """Walk ``(key, value)`` pairs in key order; ``None`` if the chain holds, else the first break."""
    verifier = ChainVerifier(start)
    for key, value in entries:
        broken = verifier.feed(key, value)
        if broken is not None:
            return broken
    return None


def iter_export(entries: Iterable[tuple[bytes, bytes]]) -> Iterator[dict[str, Any]]:
    """One JSON-able dict per entry: ``seq``, ``hash`` (hex) and the record fields.

    An entry that cannot be decoded yields ``{"seq", "error", "raw"}`` (raw = hex value) so
    an export never stops half-way; use :func:`verify` to check integrity.
    """
    for key, value in entries:
        try:
            seq, digest, body = decode_entry(key, value)
        except ValueError as exc:
            try:
                seq = audit_seq(key)
            except ValueError:
                seq = -1
            yield {"seq": seq, "error": str(exc), "raw": bytes(value).hex()}
            continue
        out: dict[str, Any] = {"seq": seq, "hash": digest.hex()}
        for name, field_value in body.items():
            if name != "seq":
                out[name] = field_value
        yield out
