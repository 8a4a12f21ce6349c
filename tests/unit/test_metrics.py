"""The loop-owned metric types render as Prometheus would render its own."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

from nexus_fast.telemetry import metrics


def render(collector: metrics.LoopCounter | metrics.LoopHistogram) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def test_loop_histogram_buckets_are_cumulative_le_bounds() -> None:
    h = metrics.LoopHistogram("t_loop_seconds", "A test histogram.", (0.1, 1.0), registry=None)
    for value in (0.05, 0.1, 0.5, 1.0, 7.0):
        h.observe(value)
    text = render(h)
    assert 't_loop_seconds_bucket{le="0.1"} 2.0' in text  # 0.1 itself is in le=0.1
    assert 't_loop_seconds_bucket{le="1.0"} 4.0' in text
    assert 't_loop_seconds_bucket{le="+Inf"} 5.0' in text
    assert "t_loop_seconds_count 5.0" in text
    assert "t_loop_seconds_sum 8.65" in text
    assert "# TYPE t_loop_seconds histogram" in text


def test_loop_counter_children_and_label_check() -> None:
    c = metrics.LoopCounter("t_loop_things_total", "A test counter.", "kind", registry=None)
    a = c.labels(kind="a")
    a.inc()
    a.inc(4)
    assert c.labels(kind="a") is a
    c.labels(kind="b")  # exported at zero from its first lookup
    text = render(c)
    assert 't_loop_things_total{kind="a"} 5.0' in text
    assert 't_loop_things_total{kind="b"} 0.0' in text
    assert "# TYPE t_loop_things_total counter" in text
    with pytest.raises(ValueError, match="expected the label 'kind'"):
        c.labels(status="a")


def test_unlabelled_counter_and_labelled_histogram() -> None:
    c = metrics.LoopCounter("t_loop_frames_total", "Frames.", registry=None)
    c.inc()
    c.inc(2)
    assert "t_loop_frames_total 3.0" in render(c)
    with pytest.raises(ValueError, match="expected the label None"):
        c.labels(kind="a")
    h = metrics.LoopHistogram("t_loop_lag", "Lag.", (1, 10), label="transport", registry=None)
    h.labels(transport="ws").observe(5)
    h.labels(transport="grpc").observe(50)
    text = render(h)
    assert 't_loop_lag_bucket{le="10.0",transport="ws"} 1.0' in text
    assert 't_loop_lag_bucket{le="10.0",transport="grpc"} 0.0' in text
    assert 't_loop_lag_count{transport="grpc"} 1.0' in text
    assert 't_loop_lag_sum{transport="ws"} 5.0' in text


def test_counts_are_exported_untyped_total_and_as_a_typed_gauge() -> None:
    counts = metrics.CountsCollector("t_things_total", "t_things", "Things by status.", "status")
    counts.source = lambda: {"ready": 3, "down": 1}
    registry = CollectorRegistry()
    registry.register(counts)
    text = generate_latest(registry).decode()
    assert "# TYPE t_things_total untyped" in text
    assert 't_things_total{status="ready"} 3.0' in text
    assert "# TYPE t_things gauge" in text
    assert 't_things{status="ready"} 3.0' in text and 't_things{status="down"} 1.0' in text


def test_every_metric_family_is_documented_in_the_readme() -> None:
    import nexus_fast.server  # noqa: F401 - defines every family, wherever it lives

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    names = {
        metric.name
        for collector in list(REGISTRY._collector_to_names)
        for metric in collector.collect()
        if metric.name.startswith("nexus_")  # python_/process_ are the client's own
    }
    # prometheus_client drops _total from counter family names; the README shows the series.
    missing = [
        name
        for name in sorted(names)
        if f"`{name}`" not in section
        and f"`{name}_total`" not in section
        and f"`{name}_info`" not in section
    ]
    assert not missing, f'README "Metrics" lacks {missing}'
