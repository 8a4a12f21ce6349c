"""nexus-bench --cluster: parsing, the replicas' config, the etcd size and the ratios."""

from __future__ import annotations

import argparse
import tomllib

import pytest

from nexus_fast.benchmark import cli
from nexus_fast.benchmark.clustercost import (
    cluster_ratios,
    etcd_members,
    medians,
    parse_cluster,
    replica_config,
    system_name,
)
from nexus_fast.benchmark.report import Measurement


def test_parse_cluster() -> None:
    assert parse_cluster("1,3") == [1, 3]
    assert parse_cluster("3") == [3]
    for bad in ("", "0", "6", "3,3", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_cluster(bad)


def test_cli_cluster_option() -> None:
    args = cli.parse_args(["roundtrip", "--cluster", "1,3", "--cluster-rounds", "3"])
    assert args.cluster == [1, 3] and args.cluster_rounds == 3 and not args.spawn
    args = cli.parse_args(["dispatch", "--cluster", "3"])
    assert args.cluster == [3] and args.cluster_rounds == 2
    assert cli.parse_args(["dispatch", "--spawn"]).cluster is None


@pytest.mark.parametrize(
    "argv",
    [
        ["roundtrip", "--cluster", "1", "--spawn"],  # one place for the server under test
        ["roundtrip", "--cluster", "1", "--target", "127.0.0.1:5"],
        ["heartbeat", "--cluster", "1"],  # roundtrip and dispatch only
        ["dispatch", "--cluster", "0"],
    ],
)
def test_cli_cluster_rejects(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2


def test_etcd_members() -> None:
    assert [etcd_members(n) for n in (1, 2, 3, 5)] == [1, 3, 3, 3]


def test_replica_config_is_the_cluster_section() -> None:
    doc = tomllib.loads(replica_config("r1", ["127.0.0.1:2379", "127.0.0.1:2380"]))
    assert doc == {
        "cluster": {
            "enabled": True,
            "name": "r1",
            "etcd_endpoints": ["127.0.0.1:2379", "127.0.0.1:2380"],
            "etcd_prefix": "/nexus-bench",
            "lease_ttl": "2s",
        }
    }


def test_system_name() -> None:
    assert [system_name(n) for n in (0, 1, 3)] == ["embedded", "1 replica", "3 replicas"]


def _m(system: str, rnd: int, rate: float, p50: float) -> Measurement:
    m = Measurement(name="x", throughput=rate, unit="round trips/s", count=10, duration_s=1.0)
    m.extra = {"system": system, "round": rnd}
    m.latency["submit->final"] = {"count": 10, "p50_ms": p50}
    return m


def test_medians_and_ratios() -> None:
    results = [
        _m("embedded", 1, 400.0, 2.0),
        _m("embedded", 1, 9999.0, 0.1),  # a second figure of the same round: not counted
        _m("3 replicas", 1, 100.0, 8.0),
        _m("embedded", 2, 600.0, 3.0),
        _m("3 replicas", 2, 200.0, 12.0),
        _m("embedded", 3, 500.0, 2.5),
        _m("3 replicas", 3, 150.0, 10.0),
    ]
    assert medians(results, "embedded") == (500.0, 2.5)
    assert medians(results, "3 replicas") == (150.0, 10.0)
    assert medians(results, "1 replica") is None
    ratios = {r.name: r.value for r in cluster_ratios(results, [1, 3])}
    assert ratios == {"3 replicas / embedded, throughput": 0.3, "3 replicas / embedded, p50": 4.0}
    assert cluster_ratios(results[2:3], [3]) == []  # no embedded figure: no ratio


def test_cli_relay_options() -> None:
    """nexus-bench relay starts its own systems: its defaults and what it refuses."""
    args = cli.parse_args(["relay"])
    assert (args.nodes, args.rate, args.rounds, args.baseline) == (1000, 2000.0, 2, False)
    args = cli.parse_args(["relay", "--nodes", "20", "--rate", "500", "--rounds", "1"])
    assert (args.nodes, args.rate, args.rounds) == (20, 500.0, 1)
    for bad in (["--spawn"], ["--target", "127.0.0.1:5"], ["--rate", "0"], ["--rounds", "0"]):
        with pytest.raises(SystemExit) as exc:
            cli.parse_args(["relay", *bad])
        assert exc.value.code == 2
