"""Fan-out to WebSocket subscribers: nexus_fast's event path vs bare picows vs `websockets`.

Short mode (the default here) keeps it to a few seconds; the full figures come from the
script: ``python bench/fanout/fanout.py --subscribers 100 --events 20000`` (throughput) and
``... --events 10000 --rate 2000 --batch 10`` (latency at a steady rate).
"""

from __future__ import annotations

import os

import pytest

from bench.fanout.fanout import compare, stalled_peer, table

SUBSCRIBERS = int(os.environ.get("FANOUT_SUBSCRIBERS", "20"))
EVENTS = int(os.environ.get("FANOUT_EVENTS", "2000"))


@pytest.mark.parametrize(("label", "rate", "batch"), [("max rate", 0, 50), ("paced", 1000, 10)])
def test_fanout_against_bare_servers(label: str, rate: float, batch: int) -> None:
    results = compare(
        SUBSCRIBERS, EVENTS if rate == 0 else EVENTS // 2, batch, timeout=60, rate=rate
    )
    print(f"\n{label}, {SUBSCRIBERS} subscribers:\n{table(results)}")
    for r in results:
        assert r["ok"] and r["delivered"] == r["expected"], r


def test_a_stalled_subscriber_does_not_slow_the_others() -> None:
    """Same run, same clients: nexus with one subscriber that stops reading vs none.

    The integration test (tests/integration/test_events_ws.py) checks the behaviour (the
    stalled one is cut off, the others get everything); the pace comparison lives here.
    """
    base, stalled = stalled_peer(SUBSCRIBERS, EVENTS, 50)
    print(f"\n{SUBSCRIBERS} subscribers, then plus one stalled:\n{table([base, stalled])}")
    for r in (base, stalled):
        assert r["ok"] and r["delivered"] == r["expected"], r
    assert stalled["events_per_s"] >= 0.5 * base["events_per_s"], (base, stalled)
    assert stalled["p50_ms"] <= 3 * base["p50_ms"] + 50, (base, stalled)
