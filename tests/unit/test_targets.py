"""The client target list (nexus_fast/node/targets.py): parsing, round robin, backoff, hints."""

from __future__ import annotations

import random
from pathlib import Path

import click
import grpc
import pytest

from nexus_fast.node.targets import (
    LEADER_METADATA,
    MAX_TARGETS,
    TargetList,
    fails_over,
    leader_hint,
    parse_targets,
    spread_order,
)


def test_parse_comma_separated_and_repeated_keeps_order_without_repeats() -> None:
    assert parse_targets("a:1,b:2") == ["a:1", "b:2"]
    assert parse_targets(["a:1", "b:2, c:3", "a:1"]) == ["a:1", "b:2", "c:3"]
    assert parse_targets(" a:1 ,,") == ["a:1"]
    assert parse_targets("[::1]:50053") == ["[::1]:50053"]


@pytest.mark.parametrize("bad", ["", ",", "host", "host:", ":50053", "h:0", "h:70000", "h:x"])
def test_parse_rejects_bad_targets(bad: str) -> None:
    with pytest.raises(ValueError, match="target"):
        parse_targets(bad)


def test_parse_bounds_the_list() -> None:
    with pytest.raises(ValueError, match="at most"):
        parse_targets([f"h:{i}" for i in range(1, MAX_TARGETS + 2)])


def test_only_unavailable_fails_over() -> None:
    assert fails_over(grpc.StatusCode.UNAVAILABLE)
    for code in (grpc.StatusCode.OK, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INTERNAL, None):
        assert not fails_over(code)


def test_leader_hint_from_trailing_metadata() -> None:
    assert leader_hint([("x", "y"), (LEADER_METADATA, "10.0.0.2:50053")]) == "10.0.0.2:50053"
    assert leader_hint([(LEADER_METADATA, b"h:1")]) == "h:1"
    assert leader_hint([(LEADER_METADATA, "garbage")]) is None
    assert leader_hint(None) is None
    assert leader_hint(()) is None
    assert leader_hint(grpc.aio.Metadata((LEADER_METADATA, "h:2"))) == "h:2"


def test_round_robin_from_the_start_index() -> None:
    targets = TargetList(["a:1", "b:2", "c:3"], start=4, rng=random.Random(1))
    assert targets.current == "b:2"
    seen = []
    for _ in range(4):
        targets.next()
        seen.append(targets.current)
    assert seen == ["c:3", "a:1", "b:2", "c:3"]
    assert targets.failovers == 4 and targets.failures == 4


def test_backoff_grows_per_round_is_capped_and_resets_on_ok() -> None:
    class Top(random.Random):
        def uniform(self, a: float, b: float) -> float:
            return b  # the ceiling itself

    targets = TargetList(["a:1", "b:2"], base=0.5, cap=3.0, rng=Top())
    delays = [targets.next() for _ in range(8)]
    # Two targets: the first pass keeps the base, then it doubles per pass, up to the cap.
    assert delays == [0.5, 0.5, 1.0, 1.0, 2.0, 2.0, 3.0, 3.0]
    targets.ok()
    assert targets.failures == 0 and targets.next() == 0.5


def test_delay_is_jittered_within_the_ceiling() -> None:
    targets = TargetList(["a:1"], base=0.2, cap=10.0, rng=random.Random(7))
    delays = [targets.next() for _ in range(40)]
    assert all(0.0 <= d <= 10.0 for d in delays)
    assert len(set(delays)) == len(delays)  # jitter: no two the same
    assert max(delays[-10:]) > 1.0  # grown well past the base
    assert targets.current == "a:1" and targets.failovers == 0  # one target: stay


def test_leader_hint_is_preferred_and_learned() -> None:
    targets = TargetList(["a:1", "b:2", "c:3"], rng=random.Random(3))
    targets.next(leader="c:3")
    assert targets.current == "c:3"
    targets.next(leader="c:3")  # the named leader is the one that failed: move on
    assert targets.current == "a:1"
    targets.next(leader="d:4")  # not in the list: learned and used
    assert targets.current == "d:4" and targets.targets == ["a:1", "b:2", "c:3", "d:4"]


def test_learned_targets_are_bounded() -> None:
    targets = TargetList([f"h:{i}" for i in range(1, MAX_TARGETS + 1)])
    targets.next(leader="other:1")
    assert len(targets.targets) == MAX_TARGETS and "other:1" not in targets.targets
    assert targets.current == "h:2"  # round robin instead


def test_empty_list_is_an_error() -> None:
    with pytest.raises(ValueError):
        TargetList([])


def test_spread_order_starts_on_i_mod_n_and_spreads_the_next_hop() -> None:
    targets = ["a:1", "b:2", "c:3"]
    orders = [spread_order(targets, i) for i in range(12)]
    assert [o[0] for o in orders] == ["a:1", "b:2", "c:3"] * 4
    assert all(sorted(o) == sorted(targets) for o in orders)
    # The nodes that start on a:1 (i = 0, 3, 6, 9) go on to b:2 and c:3 in turn.
    assert [orders[i][1] for i in (0, 3, 6, 9)] == ["b:2", "c:3", "b:2", "c:3"]
    assert spread_order(["a:1"], 5) == ["a:1"]


def test_fleet_parses_several_targets_and_spreads_nodes() -> None:
    from nexus_fast.node.cli import parse_args
    from nexus_fast.node.fleet import Fleet

    args = parse_args(["--target", "a:1,b:2", "--target", "c:3", "--nodes", "6"])
    assert args.target == "a:1,b:2,c:3"
    fleet = Fleet(args, args.node_specs)
    assert [node.targets.current for node in fleet.nodes] == ["a:1", "b:2", "c:3"] * 2
    with pytest.raises(SystemExit):
        parse_args(["--target", "a:1,nope"])


def test_ctl_connection_takes_several_targets_from_flag_env_and_context(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from nexus_fast.ctl.config import CtlConfig, Settings, resolve

    monkeypatch.delenv("NEXUS_TARGET", raising=False)
    path = tmp_path / "c.toml"
    path.write_text('current_context = "x"\n[contexts.x]\ntarget = ["h1:1", "h2:2"]\n')
    assert resolve(Settings(), CtlConfig.load(path)).targets == ("h1:1", "h2:2")
    monkeypatch.setenv("NEXUS_TARGET", "e1:1,e2:2")
    assert resolve(Settings(), CtlConfig.load(path)).targets == ("e1:1", "e2:2")
    conn = resolve(Settings(target="f:1,g:2", http="8082"), CtlConfig.load(path))
    assert conn.targets == ("f:1", "g:2") and conn.http == "http://f:8082"
    with pytest.raises(click.UsageError, match="--target"):
        resolve(Settings(target="f:1,bad"), CtlConfig.load(path))


def test_bench_takes_several_targets() -> None:
    from nexus_fast.benchmark.cli import parse_args

    args = parse_args(["dispatch", "--target", "127.0.0.1:1,127.0.0.1:2", "--http", "8082"])
    assert args.targets == ["127.0.0.1:1", "127.0.0.1:2"]
    assert args.http_url == "http://127.0.0.1:8082"
    with pytest.raises(SystemExit):
        parse_args(["dispatch", "--target", "127.0.0.1:1,10.1.2.3:2"])  # not loopback
