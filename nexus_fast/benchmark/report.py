"""Results of a run: measurements, baselines and ratios; the table, JSON and plot.

JSON schema (``"schema": "nexus-bench/1"``)::

    {"schema", "scenario", "ok", "exit_code", "config": {...}, "environment": {...},
     "results": [Measurement], "baseline": [Measurement], "ratios": [Ratio], "notes": [str]}

A Measurement: ``name``, ``throughput`` (per second), ``unit``, ``count``, ``errors``,
``error_rate``, ``duration_s``, ``latency`` (``{label: {"count", "p50_ms", ...}}``),
``server_cpu`` (``{"seconds", "percent"}`` or null), ``client_cpu`` (same), ``extra``.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nexus_fast.benchmark.histogram import PERCENTILES, LatencyHistogram, percentile_key

SCHEMA = "nexus-bench/1"


@dataclass
class Measurement:
    """One measured figure: a throughput, its latencies and the CPU it cost."""

    name: str
    throughput: float
    unit: str
    count: int
    duration_s: float
    errors: int = 0
    latency: dict[str, dict[str, float | int]] = field(default_factory=dict)
    server_cpu: dict[str, float] | None = None
    client_cpu: dict[str, float] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def error_rate(self) -> float:
        """Errors over attempts (count + errors)."""
        total = self.count + self.errors
        return self.errors / total if total else 0.0

    def add_latency(self, label: str, hist: LatencyHistogram) -> None:
        """Attach a latency histogram summary under ``label``."""
        self.latency[label] = hist.summary_ms()

    def to_dict(self) -> dict[str, Any]:
        """JSON form (adds ``error_rate``)."""
        doc = asdict(self)
        doc["error_rate"] = self.error_rate
        return doc


@dataclass
class Ratio:
    """``value = ours / baseline`` as this benchmark defines it, with its target if any."""

    name: str
    value: float | None
    definition: str
    target: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


def cpu_figure(seconds: float | None, wall: float) -> dict[str, float] | None:
    """``{"seconds", "percent"}`` of one core over ``wall`` seconds."""
    if seconds is None:
        return None
    return {
        "seconds": round(seconds, 3),
        "percent": round(100.0 * seconds / wall, 1) if wall > 0 else 0.0,
    }


def per_server_cpu(m: Measurement) -> float | None:
    """Throughput per second of server CPU: what the server could carry on one whole core.

    When a client, not the server, sets a rate (neither server near 100%), the raw ratio
    says more about the client; this one compares what each server spends per operation.
    It assumes the cost per operation stays the same up to saturation, so it is a ceiling.
    """
    cpu = m.server_cpu
    if not cpu or not cpu.get("percent"):
        return None
    return m.throughput / (cpu["percent"] / 100.0)


def cpu_ratio(name: str, ours: Measurement, base: Measurement, target: str) -> Ratio:
    """``name`` per server CPU second: ours / the baseline's (see :func:`per_server_cpu`)."""
    a, b = per_server_cpu(ours), per_server_cpu(base)
    detail = (
        f"{a:,.0f} / {b:,.0f} {ours.unit.split('/')[0]} per server CPU-second"
        if a is not None and b is not None
        else "server CPU unknown"
    )
    return Ratio(f"{name}, per server CPU", ratio(a, b), detail, target)


def ratio(ours: float | None, base: float | None) -> float | None:
    """``ours / base`` rounded, or None when either is missing or the base is zero."""
    if ours is None or not base:
        return None
    return round(ours / base, 3)


def environment() -> dict[str, Any]:
    """Machine and software facts recorded with every report."""
    from nexus_fast.about import versions

    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
    }
    try:
        import nexus_fast

        env["hot_paths"] = nexus_fast.implementation()
    except Exception:  # pragma: no cover - reporting must not fail the run
        pass
    try:
        env["versions"] = versions()
    except Exception:  # pragma: no cover
        pass
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fp:
            for line in fp:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


@dataclass
class Report:
    """Everything one ``nexus-bench`` run produced."""

    scenario: str
    config: dict[str, Any]
    results: list[Measurement] = field(default_factory=list)
    baseline: list[Measurement] = field(default_factory=list)
    ratios: list[Ratio] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    environment: dict[str, Any] = field(default_factory=environment)
    exit_code: int = 0

    def error_rate(self) -> float:
        """Errors over attempts across our (not the baseline's) measurements."""
        errors = sum(m.errors for m in self.results)
        total = sum(m.count + m.errors for m in self.results)
        return errors / total if total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The JSON document (see the module docstring)."""
        return {
            "schema": SCHEMA,
            "scenario": self.scenario,
            "ok": self.exit_code == 0,
            "exit_code": self.exit_code,
            "config": self.config,
            "environment": self.environment,
            "results": [m.to_dict() for m in self.results],
            "baseline": [m.to_dict() for m in self.baseline],
            "ratios": [r.to_dict() for r in self.ratios],
            "notes": self.notes,
        }

    def write_json(self, path: str | Path) -> None:
        """Write :meth:`to_dict` to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    def table(self) -> str:
        """Human-readable table: one row per measurement and latency, then the ratios."""
        names = [m.name for m in self.results] + ["baseline: " + m.name for m in self.baseline]
        w = max([34, *map(len, names)])
        head = (
            f"{'measurement':<{w}} {'throughput':>14} {'unit':<12} {'errors':>7} "
            f"{'latency':<18} " + " ".join(f"{_pname(q):>9}" for q in PERCENTILES) + "  srv cpu"
        )
        lines = [f"nexus-bench {self.scenario}", head, "-" * len(head)]
        for section, rows in (("", self.results), ("baseline: ", self.baseline)):
            for m in rows:
                cpu = f"{m.server_cpu['percent']:.0f}%" if m.server_cpu else "-"
                lat_rows = list(m.latency.items()) or [("", {})]
                for i, (label, lat) in enumerate(lat_rows):
                    first = i == 0
                    name = (section + m.name) if first else ""
                    tput = f"{m.throughput:,.0f}" if first else ""
                    unit = m.unit if first else ""
                    errs = str(m.errors) if first else ""
                    pcts = " ".join(
                        f"{lat[percentile_key(q)]:>9.3f}" if percentile_key(q) in lat else " " * 9
                        for q in PERCENTILES
                    )
                    lines.append(
                        f"{name:<{w}} {tput:>14} {unit:<12} {errs:>7} {label:<18} {pcts}"
                        + (f"  {cpu}" if first else "")
                    )
        lines.append("latencies in ms")
        if self.ratios:
            lines.append("")
            lines.append("ratios")
            for r in self.ratios:
                value = "n/a" if r.value is None else f"{r.value:.3f}"
                target = f"  (target {r.target})" if r.target else ""
                lines.append(f"  {r.name:<40} {value:>8}  = {r.definition}{target}")
        for note in self.notes:
            lines.append(f"note: {note}")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> None:
        """Draw latency percentiles of every measurement (needs matplotlib)."""
        try:
            import matplotlib  # type: ignore[import-not-found,unused-ignore]

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt  # type: ignore[import-not-found,unused-ignore]
        except ImportError:
            raise RuntimeError(
                "--plot needs matplotlib: pip install 'nexus-fast[plot]' (or pip install matplotlib)"
            ) from None
        fig, ax = plt.subplots(figsize=(9, 5))
        xs = [_pname(q) for q in PERCENTILES]
        for prefix, rows in (("", self.results), ("baseline ", self.baseline)):
            for m in rows:
                for label, lat in m.latency.items():
                    ys = [lat.get(percentile_key(q), 0.0) for q in PERCENTILES]
                    style = "--" if prefix else "-"
                    ax.plot(xs, ys, style, marker="o", label=f"{prefix}{m.name}: {label}")
        ax.set_yscale("log")
        ax.set_ylabel("latency (ms)")
        ax.set_title(f"nexus-bench {self.scenario}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize="small")
        fig.tight_layout()
        fig.savefig(str(path), dpi=100)
        plt.close(fig)


def _pname(q: float) -> str:
    return f"p{q:g}"
