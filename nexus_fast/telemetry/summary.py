"""Human-readable metrics: current values, rates and latency percentiles, from the registry.

The JSON endpoints (``/api/v1/metrics[/database|/performance]``) read the same Prometheus
registry ``/metrics`` renders; nothing is counted twice. A :class:`MetricsWindow` sampler
snapshots the registry's counters and histogram buckets every :data:`SAMPLE_INTERVAL_S`
and keeps :data:`WINDOW_S` of them: rates are (now - oldest snapshot) / elapsed, and
percentiles are read from the histograms' bucket increments over the same window (linear
interpolation inside a bucket, as Prometheus' ``histogram_quantile``). Until the sampler
has a snapshot, both are over the time since start (``"window_seconds"`` says which).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any, Final

from prometheus_client import REGISTRY
from prometheus_client.registry import CollectorRegistry

from nexus_fast.telemetry import process

__all__ = [
    "SAMPLE_INTERVAL_S",
    "WINDOW_S",
    "MetricsWindow",
    "Snapshot",
    "percentiles",
    "take_snapshot",
]

SAMPLE_INTERVAL_S: Final = 5.0
WINDOW_S: Final = 60.0
QUANTILES: Final = (0.5, 0.9, 0.99)
_STARTED: Final = time.monotonic()

Labels = tuple[tuple[str, str], ...]


class Snapshot:
    """Every sample of the registry at one moment: ``values[sample name][labels]``."""

    __slots__ = ("at", "values")

    def __init__(self, at: float, values: dict[str, dict[Labels, float]]) -> None:
        self.at = at
        self.values = values

    def get(self, name: str, **labels: str) -> float:
        """One sample's value (0 when absent)."""
        return self.values.get(name, {}).get(tuple(sorted(labels.items())), 0.0)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        """``{label value: value}`` of a family with one label (summing any others)."""
        out: dict[str, float] = {}
        for key, value in self.values.get(name, {}).items():
            for k, v in key:
                if k == label:
                    out[v] = out.get(v, 0.0) + value
        return out

    def total(self, name: str) -> float:
        """Sum of a family's samples over every label set."""
        return sum(self.values.get(name, {}).values())


def take_snapshot(registry: CollectorRegistry = REGISTRY) -> Snapshot:
    """Collect the registry once (the ``/metrics`` collectors, gauges included)."""
    values: dict[str, dict[Labels, float]] = {}
    for family in registry.collect():
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            values.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = float(
                sample.value
            )
    return Snapshot(time.monotonic(), values)


def percentiles(
    now: Snapshot, then: Snapshot | None, family: str, **labels: str
) -> dict[str, float | int | None]:
    """p50/p90/p99, mean and count of a histogram family's observations since ``then``.

    ``labels`` select the series (none: all series summed). Values are in the family's
    unit; ``None`` when nothing was observed.
    """
    bucket_name = f"{family}_bucket"
    wanted = set(labels.items())

    def buckets(snapshot: Snapshot | None) -> dict[float, float]:
        out: dict[float, float] = {}
        if snapshot is None:
            return out
        for key, value in snapshot.values.get(bucket_name, {}).items():
            if not wanted <= set(key):
                continue
            le = float(dict(key)["le"])
            out[le] = out.get(le, 0.0) + value
        return out

    def delta(name: str) -> float:
        series = [(k, v) for k, v in now.values.get(name, {}).items() if wanted <= set(k)]
        old = then.values.get(name, {}) if then is not None else {}
        return sum(v - old.get(k, 0.0) for k, v in series)

    current, base = buckets(now), buckets(then)
    cumulative = sorted((le, count - base.get(le, 0.0)) for le, count in current.items())
    count = int(delta(f"{family}_count"))
    out: dict[str, float | int | None] = {"count": count}
    out["mean"] = delta(f"{family}_sum") / count if count else None
    for q in QUANTILES:
        out[f"p{round(q * 100)}"] = _quantile(q, cumulative) if count else None
    return out


def _quantile(q: float, cumulative: list[tuple[float, float]]) -> float | None:
    """Prometheus' histogram_quantile over (upper bound, cumulative count) pairs."""
    if not cumulative or cumulative[-1][1] <= 0:
        return None
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in cumulative:
        if count >= rank:
            if math.isinf(bound):
                return lower  # beyond the last finite bucket: its bound is the best we know
            if count == below:
                return bound
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = bound, count
    return lower


class MetricsWindow:
    """Registry snapshots of the last :data:`WINDOW_S` seconds, taken by :meth:`run`."""

    def __init__(
        self, registry: CollectorRegistry = REGISTRY, interval: float = SAMPLE_INTERVAL_S
    ) -> None:
        self.registry = registry
        self.interval = interval
        self._snapshots: deque[Snapshot] = deque(maxlen=int(WINDOW_S / interval) + 1)

    def sample(self) -> Snapshot:
        """Take a snapshot and keep it in the window; returns it."""
        snapshot = take_snapshot(self.registry)
        self._snapshots.append(snapshot)
        return snapshot

    def baseline(self) -> Snapshot | None:
        """The oldest snapshot kept (None: none yet, figures are since start)."""
        return self._snapshots[0] if self._snapshots else None

    async def run(self) -> None:
        """Sample forever (cancel to stop); also feeds the CPU gauge's window."""
        while True:
            self.sample()
            process.cpu_percent()
            await asyncio.sleep(self.interval)

    def report(self) -> Reading:
        """The current snapshot against the window's baseline."""
        return Reading(take_snapshot(self.registry), self.baseline())


class Reading:
    """A snapshot now and the baseline its rates and percentiles are taken against."""

    def __init__(self, now: Snapshot, then: Snapshot | None) -> None:
        self.now = now
        self.then = then
        start = then.at if then is not None else _STARTED
        self.window_seconds = max(now.at - start, 1e-9)

    def rate(self, name: str, **labels: str) -> float:
        """Per-second increase of a counter sample (all label sets when none given)."""
        if labels:
            current = self.now.get(name, **labels)
            old = self.then.get(name, **labels) if self.then is not None else 0.0
        else:
            current = self.now.total(name)
            old = self.then.total(name) if self.then is not None else 0.0
        return round(max(current - old, 0.0) / self.window_seconds, 3)

    def rates_by(self, name: str, label: str) -> dict[str, float]:
        """Per-second increase of each value of ``label``."""
        now = self.now.by_label(name, label)
        old = self.then.by_label(name, label) if self.then is not None else {}
        return {
            k: round(max(v - old.get(k, 0.0), 0.0) / self.window_seconds, 3) for k, v in now.items()
        }

    def latency(self, family: str, **labels: str) -> dict[str, float | int | None]:
        """:func:`percentiles` over this reading's window, rounded for reading."""
        figures = percentiles(self.now, self.then, family, **labels)
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in figures.items()}

    def labels_of(self, name: str, label: str) -> Iterable[str]:
        """The values ``label`` takes in a family, sorted."""
        return sorted(self.now.by_label(name, label))


def counts(values: Mapping[str, float]) -> dict[str, int]:
    """Float samples of a count family as ints."""
    return {k: int(v) for k, v in sorted(values.items())}


def header(reading: Reading) -> dict[str, Any]:
    """The fields every JSON metrics answer starts with."""
    return {
        "time_ms": int(time.time() * 1000),
        "window_seconds": round(reading.window_seconds, 3),
        "window": "sampled" if reading.then is not None else "since_start",
    }
