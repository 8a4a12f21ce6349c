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


def test_roundtrip_cluster_one_replica(tmp_path: Path) -> None:
    """--cluster 1: the embedded server and one cluster-mode replica on one etcd member,
    the same round trips on both, and the cluster / embedded ratios."""
    out = tmp_path / "cluster.json"
    argv = ["roundtrip", "--cluster", "1", "--cluster-rounds", "1", "--duration", "2"]
    argv += ["--warmup", "5", "--json", str(out)]
    proc = run_module("nexus_fast.benchmark.cli", *argv, timeout=90)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    assert doc["config"]["server"]["systems"] == ["embedded", "1 replica"]
    assert doc["config"]["server"]["etcd_members"] == {"1 replica": 1}
    by_system = {m["extra"]["system"]: m for m in doc["results"]}
    assert set(by_system) == {"embedded", "1 replica"}
    for m in by_system.values():
        assert m["count"] > 0 and m["errors"] == 0
    # the cluster's server CPU counts the replica and its etcd member
    assert by_system["1 replica"]["server_cpu"]["seconds"] > 0
    names = {r["name"]: r["value"] for r in doc["ratios"]}
    assert names["1 replica / embedded, throughput"] > 0
    assert names["1 replica / embedded, p50"] > 0


@pytest.mark.once
def test_relay_scenario_three_replicas(tmp_path: Path) -> None:
    """nexus-bench relay: 1 etcd member, 3 replicas, nodes on the two followers only; the
    leader counts the relayed heartbeats and its CPU per relayed heartbeat is a finite
    positive figure, next to the embedded server's and the echo's from the same run."""
    out = tmp_path / "relay.json"
    argv = ["relay", "--nodes", "20", "--rate", "500", "--duration", "3", "--rounds", "1"]
    proc = run_module("nexus_fast.benchmark.cli", *argv, "--json", str(out), timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    assert doc["ok"] is True and doc["config"]["server"]["etcd_members"] == 1
    by_role = {m["extra"]["role"]: m for m in doc["results"] + doc["baseline"]}
    assert set(by_role) == {"leader", "follower 1", "follower 2", "embedded", "echo"}
    leader = by_role["leader"]
    assert leader["count"] > 0 and leader["errors"] == 0  # relayed heartbeats reached it
    # every heartbeat went through a follower: the leader handled what the nodes wrote
    assert leader["count"] <= leader["extra"]["client_writes"] + 20
    for role in ("follower 1", "follower 2"):
        f = by_role[role]
        assert f["count"] > 0 and f["extra"]["relay_ups"] > 0  # nodes on both followers
        assert f["extra"]["frames_per_relay_up"] >= 1.0
    relayed = sum(by_role[r]["count"] for r in ("follower 1", "follower 2"))
    assert relayed + 20 >= leader["count"]  # what the leader handled, the followers relayed
    for m in by_role.values():
        us = m["extra"]["us_per_message"]
        assert us is not None and 0 < us < 1e6, m  # positive and finite
    ratios = {r["name"]: r["value"] for r in doc["ratios"]}
    assert ratios["leader per relayed / embedded per direct"] > 0
    assert "frames per RelayUp" in proc.stdout
