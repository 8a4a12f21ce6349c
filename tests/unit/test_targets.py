"""The client target list (nexus_fast/node/targets.py): parsing, round robin, backoff, hints."""

from __future__ import annotations

import random

import grpc
import pytest

from nexus_fast.node.targets import (
    LEADER_METADATA,
    MAX_TARGETS,
    TargetList,
    fails_over,
    leader_hint,
    parse_targets,
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
