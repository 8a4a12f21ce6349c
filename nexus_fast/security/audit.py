"""Audit policy: which refusals are recorded (:class:`RefusalSampler`).

The chain's storage format (:class:`AuditRecord`, its canonical encoding, :class:`ChainHead`,
:func:`chain_puts`, :func:`verify`, the ``audit`` database) is a store concern and lives in
:mod:`nexus_fast.store.audit_chain`; it is re-exported here for compatibility. Which calls
are audited, and the glue to the core's commits: :mod:`nexus_fast.security.auditing`.
"""

from __future__ import annotations

import time

from nexus_fast.security.limits import Clock, RateLimiter
from nexus_fast.store.audit_chain import (
    AUDIT_DB,
    EMPTY_HEAD,
    GENESIS_HASH,
    HASH_SIZE,
    MAX_FIELD_CHARS,
    OUTCOME_OK,
    AuditRecord,
    ChainBreak,
    ChainHead,
    ChainVerifier,
    audit_key,
    audit_seq,
    canonical_body,
    chain_puts,
    decode_entry,
    encode_entry,
    head_from_last,
    iter_export,
    link_hash,
    verify,
)

__all__ = [
    "AUDIT_DB",
    "EMPTY_HEAD",
    "GENESIS_HASH",
    "HASH_SIZE",
    "MAX_FIELD_CHARS",
    "OUTCOME_OK",
    "AuditRecord",
    "ChainBreak",
    "ChainHead",
    "ChainVerifier",
    "RefusalSampler",
    "audit_key",
    "audit_seq",
    "canonical_body",
    "chain_puts",
    "decode_entry",
    "encode_entry",
    "head_from_last",
    "iter_export",
    "link_hash",
    "verify",
]


class RefusalSampler:
    """Decides which refusals are audited: at most ``burst`` at once and ``per_second``
    after that, per principal; the rest are counted and reported in the next one.

    Refused calls cost the server nothing else, so without this a client could grow the
    audit log (and the disk) at the rate it can send bad requests.
    """

    __slots__ = ("_limiter", "_max_keys", "_suppressed")

    def __init__(
        self,
        per_second: float = 1.0,
        burst: int = 10,
        clock: Clock = time.monotonic,
        max_principals: int = 10000,
    ) -> None:
        if per_second <= 0:
            raise ValueError("per_second must be > 0")
        self._limiter = RateLimiter(per_second, burst, clock, max_principals)
        self._suppressed: dict[str, int] = {}
        self._max_keys = max_principals

    def admit(self, principal: str) -> int | None:
        """``None``: drop this refusal. Otherwise audit it, with the returned number of
        refusals suppressed since the last audited one (goes in ``AuditRecord.suppressed``)."""
        if self._limiter.check(principal):
            n = self._suppressed.get(principal)
            if n is not None:
                self._suppressed[principal] = n + 1
            elif len(self._suppressed) < self._max_keys:
                self._suppressed[principal] = 1
            # Beyond the cap the count is lost, never the memory bound.
            return None
        return self._suppressed.pop(principal, 0)

    def record(
        self,
        principal: str,
        role: str,
        peer: str,
        method: str,
        target: str,
        request_id: str,
        outcome: str,
    ) -> AuditRecord | None:
        """The refusal record to audit now, or ``None`` when it is sampled out."""
        suppressed = self.admit(principal)
        if suppressed is None:
            return None
        return AuditRecord.now(
            principal, role, peer, method, target, request_id, outcome, suppressed
        )
