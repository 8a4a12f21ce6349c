"""Crash loop: the real server killed again and again (SIGKILL and every crash failpoint).

``scripts/chaos.py`` does the work (``make chaos`` runs 1,000 rounds of it): a nexus-node
fleet that stays up and records what it ran, a client that records every answered submit
and a resuming WatchEvents subscriber, the server restarted on the same data after each
kill. These tests run it for a few rounds in each twin mode and 50 in the compiled pass,
and hold it to its figures: nothing acknowledged lost, everything final, no idempotency
key on two commands, nothing run twice on a node, every event seen once, no gap.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .chaos_util import run_chaos_script


def crash_loop(tmp_path: Path, rounds: int, seed: int, timeout: float) -> dict[str, object]:
    figures, detail, returncode = run_chaos_script("chaos.py", tmp_path, rounds, seed, timeout)
    for zero in (
        "lost",
        "not_final",
        "idempotency_violations",
        "ran_twice_on_a_node",
        "succeeded_not_run",
        "event_gaps",
        "events_seen_twice",
        "unexpected_errors",
        "server_tracebacks",
    ):
        assert figures[zero] == 0, f"{zero}: {detail}"
    assert returncode == 0, detail
    assert isinstance(figures["commands_acknowledged"], int), detail
    assert figures["commands_acknowledged"] > rounds, detail  # the client really worked
    assert isinstance(figures["events"], int) and figures["events"] > rounds, detail
    return figures


@pytest.mark.timeout(300)
def test_crash_loop_a_few_rounds(tmp_path: Path) -> None:
    # Both twin modes: 5 rounds, SIGKILL or a crash failpoint (seeded).
    figures = crash_loop(tmp_path, rounds=5, seed=15, timeout=240)
    crashes = figures["failpoint_crashes"]
    assert isinstance(crashes, dict) and sum(crashes.values()) >= 1, figures


@pytest.mark.once
@pytest.mark.timeout(900)
def test_crash_loop_fifty_rounds(tmp_path: Path) -> None:
    figures = crash_loop(tmp_path, rounds=50, seed=2026, timeout=840)
    rounds = figures["failpoint_rounds"]
    crashes = figures["failpoint_crashes"]
    assert isinstance(rounds, dict) and isinstance(crashes, dict)
    # Every crash site had its rounds, and each one really crashed the server there.
    assert (
        set(rounds)
        == set(crashes)
        == {
            "store.before_commit",
            "store.commit",
            "store.after_commit",
            "commands.before_dispatch",
            "commands.before_reply",
            "stream.send",
        }
    ), figures
    assert figures["kill_rounds"], figures
