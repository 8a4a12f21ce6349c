"""A small HDR-style latency histogram: log-bucketed, ~2 significant digits, 1 us..60 s.

Values are recorded in integer nanoseconds. Below 256 ns every nanosecond has its own
bucket; above, each power of two is split into 128 linear sub-buckets, so a bucket is at
most 1/128 (< 1%) of its value wide. Recording is a handful of integer operations, cheap
enough to call for every message; histograms merge by adding counts, which is how
per-process or per-worker histograms are combined.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

SUB_BUCKET_BITS = 7
SUB_BUCKETS = 1 << SUB_BUCKET_BITS  # 128 per power of two: < 1% relative bucket width
LINEAR_LIMIT = SUB_BUCKETS * 2  # below this every nanosecond is its own bucket
MAX_SECONDS = 60.0
MAX_NS = int(MAX_SECONDS * 1e9)
PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def bucket_index(ns: int) -> int:
    """Index of the bucket holding ``ns`` (>= 0)."""
    if ns < LINEAR_LIMIT:
        return ns
    shift = ns.bit_length() - (SUB_BUCKET_BITS + 1)
    return shift * SUB_BUCKETS + (ns >> shift)


def bucket_bounds(index: int) -> tuple[int, int]:
    """``(lowest, highest)`` nanosecond values that fall in bucket ``index``."""
    if index < LINEAR_LIMIT:
        return index, index
    shift = index // SUB_BUCKETS - 1
    low = (index - shift * SUB_BUCKETS) << shift
    return low, low + (1 << shift) - 1


N_BUCKETS = bucket_index(MAX_NS) + 1


class LatencyHistogram:
    """Counts of latencies in log-linear buckets; percentiles to ~2 significant digits.

    Values above 60 s are clamped to 60 s and counted in ``saturated``; negative values
    (clock skew between hosts) count as 0.
    """

    __slots__ = ("_counts", "count", "max_ns", "min_ns", "saturated", "sum_ns")

    def __init__(self) -> None:
        self._counts = [0] * N_BUCKETS
        self.count = 0
        self.sum_ns = 0
        self.min_ns = 0
        self.max_ns = 0
        self.saturated = 0

    def record(self, seconds: float) -> None:
        """Record one latency given in seconds."""
        self.record_ns(int(seconds * 1e9))

    def record_ns(self, ns: int, n: int = 1) -> None:
        """Record ``n`` occurrences of a latency of ``ns`` nanoseconds."""
        if ns < 0:
            ns = 0
        elif ns > MAX_NS:
            ns = MAX_NS
            self.saturated += n
        if ns < LINEAR_LIMIT:
            index = ns
        else:
            shift = ns.bit_length() - (SUB_BUCKET_BITS + 1)
            index = shift * SUB_BUCKETS + (ns >> shift)
        self._counts[index] += n
        if self.count == 0 or ns < self.min_ns:
            self.min_ns = ns
        if ns > self.max_ns:
            self.max_ns = ns
        self.count += n
        self.sum_ns += ns * n

    def record_many(self, seconds: Iterable[float]) -> None:
        """Record every latency (seconds) of ``seconds``."""
        for value in seconds:
            self.record_ns(int(value * 1e9))

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other``'s counts to this histogram."""
        if other.count == 0:
            return
        counts = self._counts
        for i, c in enumerate(other._counts):
            if c:
                counts[i] += c
        self.min_ns = other.min_ns if self.count == 0 else min(self.min_ns, other.min_ns)
        self.max_ns = max(self.max_ns, other.max_ns)
        self.count += other.count
        self.sum_ns += other.sum_ns
        self.saturated += other.saturated

    def percentile_ns(self, q: float) -> int:
        """Smallest recorded value (to bucket precision) with at least ``q`` % at or below it.

        The bucket's midpoint is returned, clamped to the observed min and max, so the error
        is at most half a bucket (< 0.4%).
        """
        if not 0.0 <= q <= 100.0:
            raise ValueError(f"percentile must be within 0..100, got {q}")
        if self.count == 0:
            return 0
        # Rank of the wanted value (1-based), as numpy's "inverted_cdf" method defines it.
        rank = max(1, math.ceil(q * self.count / 100.0 - 1e-9))
        seen = 0
        for i, c in enumerate(self._counts):
            if c:
                seen += c
                if seen >= rank:
                    low, high = bucket_bounds(i)
                    mid = (low + high) // 2
                    return min(max(mid, self.min_ns), self.max_ns)
        return self.max_ns

    def percentile(self, q: float) -> float:
        """:meth:`percentile_ns` in seconds."""
        return self.percentile_ns(q) / 1e9

    @property
    def mean(self) -> float:
        """Mean latency in seconds (exact, from the running sum)."""
        return self.sum_ns / self.count / 1e9 if self.count else 0.0

    def summary_ms(self, percentiles: Iterable[float] = PERCENTILES) -> dict[str, float | int]:
        """``{"count", "min_ms", "mean_ms", "p50_ms", ..., "max_ms"}`` for reports."""
        out: dict[str, float | int] = {"count": self.count}
        out["min_ms"] = round(self.min_ns / 1e6, 4)
        out["mean_ms"] = round(self.mean * 1e3, 4)
        for q in percentiles:
            out[percentile_key(q)] = round(self.percentile_ns(q) / 1e6, 4)
        out["max_ms"] = round(self.max_ns / 1e6, 4)
        if self.saturated:
            out["saturated"] = self.saturated
        return out

    def to_dict(self) -> dict[str, Any]:
        """Sparse, JSON-friendly form (bucket index -> count) for merging across processes."""
        return {
            "buckets": {str(i): c for i, c in enumerate(self._counts) if c},
            "count": self.count,
            "sum_ns": self.sum_ns,
            "min_ns": self.min_ns,
            "max_ns": self.max_ns,
            "saturated": self.saturated,
        }

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> LatencyHistogram:
        """Inverse of :meth:`to_dict`."""
        hist = cls()
        for key, c in doc["buckets"].items():
            hist._counts[int(key)] = int(c)
        hist.count = int(doc["count"])
        hist.sum_ns = int(doc["sum_ns"])
        hist.min_ns = int(doc["min_ns"])
        hist.max_ns = int(doc["max_ns"])
        hist.saturated = int(doc.get("saturated", 0))
        return hist


def percentile_key(q: float) -> str:
    """``50.0 -> "p50_ms"``, ``99.9 -> "p99.9_ms"``."""
    text = f"{q:g}"
    return f"p{text}_ms"
