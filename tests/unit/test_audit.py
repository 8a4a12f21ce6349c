"""Audit hash chain: canonical encoding, puts, verification, refusal sampling."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from nexus_fast.security.audit import RefusalSampler
from nexus_fast.store import DATABASES, LmdbStore
from nexus_fast.store.audit_chain import (
    AUDIT_DB,
    EMPTY_HEAD,
    GENESIS_HASH,
    MAX_FIELD_CHARS,
    AuditRecord,
    ChainBreak,
    ChainHead,
    ChainVerifier,
    audit_key,
    audit_seq,
    canonical_body,
    chain_puts,
    encode_entry,
    head_from_last,
    iter_export,
    verify,
)


def rec(i: int = 0, outcome: str = "ok", principal: str = "alice") -> AuditRecord:
    return AuditRecord(
        principal=principal,
        role="operator",
        peer="ipv4:127.0.0.1:5000",
        method="/nexus.ControlService/SubmitCommands",
        target=f"command:c{i}",
        request_id=f"req-{i}",
        outcome=outcome,
        time_ms=1_700_000_000_000 + i,
    )


def chain(n: int) -> list[tuple[bytes, bytes]]:
    pairs, _ = chain_puts(EMPTY_HEAD, [rec(i) for i in range(n)])
    return pairs


class FakeClock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


# --------------------------------------------------------------------------- encoding


def test_body_is_canonical_sorted_and_carries_seq() -> None:
    body = canonical_body(7, rec(1))
    assert body == canonical_body(7, rec(1))
    fields = orjson.loads(body)
    assert list(fields) == sorted(fields)
    assert fields["seq"] == 7 and fields["principal"] == "alice" and fields["suppressed"] == 0
    assert b" " not in body.replace(b"127.0.0.1", b"")  # compact: no formatting whitespace
    assert canonical_body(8, rec(1)) != body


def test_keys_are_big_endian_sequence_numbers() -> None:
    assert audit_key(1) == b"\x00" * 7 + b"\x01"
    assert audit_key(256) < audit_key(257) < audit_key(1 << 40)
    assert audit_seq(audit_key(123456789)) == 123456789
    with pytest.raises(ValueError):
        audit_seq(b"\x01")


def test_chain_puts_links_each_entry_to_the_previous() -> None:
    records = [rec(0), rec(1), rec(2)]
    pairs, head = chain_puts(EMPTY_HEAD, records)
    assert [audit_seq(k) for k, _ in pairs] == [1, 2, 3]
    prev = GENESIS_HASH
    for (key, value), record in zip(pairs, records):
        body = value[32:]
        assert body == canonical_body(audit_seq(key), record)
        assert (value, value[:32]) == encode_entry(prev, audit_seq(key), record)
        assert value[:32] == hashlib.sha256(prev + body).digest()
        assert orjson.loads(body)["seq"] == audit_seq(key)
        prev = value[:32]
    assert head == ChainHead(3, prev)


def test_batch_boundaries_do_not_change_the_chain() -> None:
    records = [rec(i) for i in range(5)]
    whole, head = chain_puts(EMPTY_HEAD, records)
    first, mid = chain_puts(EMPTY_HEAD, records[:2])
    second, end = chain_puts(mid, records[2:])
    assert first + second == whole and end == head
    assert chain_puts(head, []) == ([], head)


def test_head_from_last_resumes_the_chain() -> None:
    pairs = chain(4)
    head = head_from_last(pairs[-1])
    assert head == chain_puts(EMPTY_HEAD, [rec(i) for i in range(4)])[1]
    assert head_from_last(None) == EMPTY_HEAD
    more, _ = chain_puts(head, [rec(9)])
    assert verify(pairs + more) is None


def test_record_fields_are_bounded_and_always_encodable() -> None:
    r = AuditRecord(
        "x" * 10_000, "viewer", "peer", "m", "t", "bad \ud800 surrogate", "ok", time_ms=1
    )
    assert len(r.principal) == MAX_FIELD_CHARS and r.principal.endswith("…")
    assert "\ud800" not in r.request_id
    assert len(canonical_body(1, r)) < 8 * MAX_FIELD_CHARS
    with pytest.raises(TypeError):
        AuditRecord(None, "r", "p", "m", "t", "i", "ok", 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        AuditRecord("a", "r", "p", "m", "t", "i", "ok", -1)
    with pytest.raises(ValueError):
        AuditRecord("a", "r", "p", "m", "t", "i", "ok", True)


def test_record_now_stamps_wall_clock_ms() -> None:
    r = AuditRecord.now("a", "admin", "peer", "/x/Y", outcome="PERMISSION_DENIED")
    assert r.time_ms > 1_600_000_000_000 and r.outcome == "PERMISSION_DENIED"


# --------------------------------------------------------------------------- verify


def test_intact_chain_verifies() -> None:
    assert verify([]) is None
    assert verify(chain(50)) is None
    v = ChainVerifier()
    for key, value in chain(3):
        assert v.feed(key, value) is None
    assert v.count == 3 and v.head.seq == 3


@given(
    n=st.integers(min_value=1, max_value=12),
    data=st.data(),
)
def test_any_flipped_value_byte_names_that_entry(n: int, data: st.DataObject) -> None:
    pairs = chain(n)
    victim = data.draw(st.integers(min_value=0, max_value=n - 1))
    key, value = pairs[victim]
    pos = data.draw(st.integers(min_value=0, max_value=len(value) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=7))
    flipped = bytearray(value)
    flipped[pos] ^= 1 << bit
    pairs[victim] = (key, bytes(flipped))
    broken = verify(pairs)
    assert broken is not None
    assert broken.seq == victim + 1


def test_deleted_entry_is_named() -> None:
    pairs = chain(5)
    del pairs[2]
    assert verify(pairs) == ChainBreak(3, "missing (the next stored entry is 4)")
    assert verify(chain(5)[1:]) == ChainBreak(1, "missing (the next stored entry is 2)")


def test_swapped_entries_are_detected() -> None:
    pairs = chain(5)
    (k1, v1), (k2, v2) = pairs[1], pairs[2]
    pairs[1], pairs[2] = (k1, v2), (k2, v1)
    broken = verify(pairs)
    assert broken is not None and broken.seq == 2


def test_rewritten_entry_with_recomputed_hash_breaks_the_next_link() -> None:
    pairs = chain(4)
    prev = pairs[0][1][:32]
    forged_body = canonical_body(2, rec(1, principal="mallory"))
    pairs[1] = (pairs[1][0], hashlib.sha256(prev + forged_body).digest() + forged_body)
    broken = verify(pairs)
    assert broken is not None and broken.seq == 3 and "hash mismatch" in broken.reason


def test_entry_moved_with_consistent_hash_is_caught_by_its_seq() -> None:
    # Someone who recomputes the hash but keeps a body from another position.
    body = canonical_body(5, rec(0))
    value = hashlib.sha256(GENESIS_HASH + body).digest() + body
    broken = verify([(audit_key(1), value)])
    assert broken == ChainBreak(1, "body does not carry its own seq")


@pytest.mark.parametrize(
    ("value", "reason"),
    [(b"short", "shorter than hash"), (GENESIS_HASH, "shorter than hash")],
)
def test_truncated_value(value: bytes, reason: str) -> None:
    broken = verify([(audit_key(1), value)])
    assert broken is not None and broken.seq == 1 and reason in broken.reason


def test_bad_key_and_verify_from_a_saved_head() -> None:
    broken = verify([(b"abc", b"x" * 40)])
    assert broken is not None and "malformed key" in broken.reason
    pairs = chain(6)
    head = head_from_last(pairs[2])
    assert verify(pairs[3:], start=head) is None
    assert verify(pairs[3:], start=EMPTY_HEAD) is not None
    v = ChainVerifier()
    v.feed(b"abc", b"")
    assert v.feed(*pairs[0]) is v.broken  # stays broken: the first break is the answer


def test_export_rows() -> None:
    pairs = [*chain(2), (audit_key(3), b"garbage")]
    rows = list(iter_export(pairs))
    assert rows[0]["seq"] == 1 and rows[0]["principal"] == "alice"
    assert rows[0]["hash"] == pairs[0][1][:32].hex()
    assert rows[1]["target"] == "command:c1"
    assert rows[2]["seq"] == 3 and "error" in rows[2] and rows[2]["raw"] == b"garbage".hex()


# --------------------------------------------------------------------------- refusals


def test_refusals_sampled_per_principal_with_suppressed_count() -> None:
    clock = FakeClock()
    s = RefusalSampler(per_second=1.0, burst=2, clock=clock)
    assert s.admit("bad") == 0
    assert s.admit("bad") == 0
    assert [s.admit("bad") for _ in range(5)] == [None] * 5
    assert s.admit("other") == 0  # one noisy principal does not silence the rest
    clock.now += 1.0
    r = s.record("bad", "viewer", "peer", "/m", "t", "rid", "PERMISSION_DENIED")
    assert r is not None and r.suppressed == 5 and r.outcome == "PERMISSION_DENIED"
    assert s.record("bad", "viewer", "peer", "/m", "t", "rid", "PERMISSION_DENIED") is None


def test_refusal_sampler_memory_is_bounded() -> None:
    clock = FakeClock()
    s = RefusalSampler(per_second=1.0, burst=1, clock=clock, max_principals=10)
    for i in range(1000):
        s.admit(f"p{i}")
        s.admit(f"p{i}")
    assert len(s._suppressed) <= 10
    assert len(s._limiter) <= 10


# --------------------------------------------------------------------------- the real store


def test_puts_commit_through_the_store_and_verify(tmp_path: Path) -> None:
    """The store's writer chains commit(audit=...) exactly as chain_puts does."""
    assert AUDIT_DB in DATABASES

    async def run() -> list[tuple[bytes, bytes]]:
        store = LmdbStore(tmp_path / "db", map_size=1 << 20)
        await store.open()
        try:
            head = head_from_last(None)
            for batch in ([rec(0)], [rec(1), rec(2)], [rec(3, outcome="RESOURCE_EXHAUSTED")]):
                pairs, head = chain_puts(head, batch)
                await store.commit((), (), batch)
                assert store.scan(AUDIT_DB)[-len(pairs) :] == pairs
            stored = store.scan(AUDIT_DB)
            assert head_from_last(stored[-1]) == head == store.audit_head
            return stored
        finally:
            await store.close()

    stored = asyncio.run(run())
    assert len(stored) == 4
    assert verify(stored) is None
