"""nexus-bench etcd against real etcd members (Debian's etcd-server): a tiny run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import run_module

pytestmark = pytest.mark.integration


def test_etcd_scenario_real_etcd(tmp_path: Path) -> None:
    out = tmp_path / "etcd.json"
    argv = ["etcd", "--members", "1", "--levels", "1,4", "--duration", "4", "--baseline"]
    proc = run_module("nexus_fast.benchmark.cli", *argv, "--json", str(out), timeout=30)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    assert doc["ok"] is True
    txns = doc["results"]
    assert [m["extra"]["in_flight"] for m in txns] == [1, 4]
    for m in txns:
        assert m["extra"]["kind"] == "etcd txn" and m["extra"]["members"] == 1
        assert m["count"] > 0 and m["errors"] == 0  # every fenced txn succeeded
        assert m["latency"]["commit"]["count"] == m["count"]
        assert m["extra"]["etcd_cpu_us_per_op"] >= 0  # etcd's CPU read from /proc
    # /proc counts in clock ticks (10 ms): a short phase may show none, both phases not
    assert sum(m["extra"]["etcd_cpu_us_per_op"] for m in txns) > 0
    kinds = sorted(m["extra"]["kind"] for m in doc["baseline"])
    assert kinds == ["etcd range", "etcd range", "lmdb commit", "lmdb commit"]
    names = [r["name"] for r in doc["ratios"]]
    assert "etcd 1 member, fenced txn, 1 in flight: p50 / LMDB p50" in names
    assert "CPU per op" in proc.stdout
