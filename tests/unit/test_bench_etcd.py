"""nexus-bench etcd: argument parsing, the log's key shape and the per-commit arithmetic."""

from __future__ import annotations

import argparse

import pytest

from nexus_fast.benchmark import cli
from nexus_fast.benchmark.report import Measurement
from nexus_fast.benchmark.scenarios.etcdcommit import (
    commit_ratios,
    cpu_notes,
    log_key,
    parse_members,
    per_commit_us,
)


def test_parse_members() -> None:
    assert parse_members("1,3") == [1, 3]
    assert parse_members(" 3 ") == [3]
    for bad in ("", "0", "6", "1,1", "a", "1,,x"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse_members(bad)


def test_cli_etcd_defaults_and_options() -> None:
    args = cli.parse_args(["etcd"])
    assert args.members == [1, 3] and args.levels == [1, 16, 64] and args.value_bytes == 1024
    assert args.baseline is False
    args = cli.parse_args(
        ["etcd", "--members", "3", "--levels", "1,8", "--value-bytes", "200", "--baseline"]
    )
    assert (args.members, args.levels, args.value_bytes, args.baseline) == ([3], [1, 8], 200, True)
    # state keeps its own default levels
    assert cli.parse_args(["state"]).levels == [1, 16, 256]


@pytest.mark.parametrize(
    "argv",
    [
        ["etcd", "--members", "0"],
        ["etcd", "--value-bytes", "0"],
        ["etcd", "--value-bytes", str(5 << 20)],
        ["etcd", "--levels", "0"],
        ["etcd", "--target", "127.0.0.1:1"],  # not a served scenario
    ],
)
def test_cli_etcd_rejects(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.parse_args(argv)
    assert exc.value.code == 2


def test_log_key_is_the_replicated_logs_shape() -> None:
    assert log_key(7) == b"/nexus-bench/log/00000000000000000007"
    assert log_key(7) < log_key(10) < log_key(10**12)  # lexical order = seq order


def test_per_commit_us() -> None:
    assert per_commit_us(0.5, 1000) == 500.0
    assert per_commit_us(None, 1000) is None
    assert per_commit_us(1.0, 0) is None


def _m(
    name: str, kind: str, level: int, rate: float, p50: float, etcd_us: float | None
) -> Measurement:
    m = Measurement(name=name, throughput=rate, unit="commits/s", count=100, duration_s=1.0)
    m.extra = {"kind": kind, "in_flight": level, "etcd_cpu_us_per_op": etcd_us}
    m.extra["client_cpu_us_per_op"] = 50.0
    m.latency["commit"] = {"count": 100, "p50_ms": p50}
    return m


def test_commit_ratios_pair_same_level() -> None:
    ours = [
        _m("etcd 3, 1", "etcd txn", 1, 400.0, 2.0, 300.0),
        _m("etcd 3, 16", "etcd txn", 16, 1600, 8, 200),
    ]
    base = [
        _m("lmdb, 1", "lmdb commit", 1, 800.0, 1.0, None),
        _m("range", "etcd range", 1, 900, 0.6, 80),
    ]
    ratios = {r.name: r.value for r in commit_ratios(ours, base)}
    # level 16 has no LMDB baseline: no ratio invented for it
    assert ratios == {"etcd 3, 1: p50 / LMDB p50": 2.0, "etcd 3, 1: commits/s / LMDB": 0.5}


def test_cpu_notes() -> None:
    notes = cpu_notes(
        [_m("etcd 1, 1", "etcd txn", 1, 1.0, 1.0, 312.4), _m("lmdb", "lmdb commit", 1, 1, 1, None)]
    )
    assert notes[0] == "CPU per op, etcd 1, 1: etcd 312 us (all members), this process 50 us"
    assert notes[1].startswith("CPU per op, lmdb: no etcd")
