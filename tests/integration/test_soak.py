"""Soak, CI length: one minute at half the measured maximum command rate (scripts/soak.py).

0 errors (RPC errors, commands not succeeded, event gaps), heap RSS growth below 10% after
warm-up, p99 latency stable (first vs last 20 s window). ``make soak`` runs 10 minutes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO


@pytest.mark.once
def test_one_minute_at_half_the_maximum_rate(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "scripts/soak.py", "--minutes", "1", "--json", str(out), "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["passed"] and result["errors"] == 0
    assert result["commands"] >= 0.8 * 60 * result["rate_per_s"]  # the load really ran
    assert result["events_seen"] > result["commands"]  # and the subscriber followed it
    assert result["rss_growth_pct"] < 10
