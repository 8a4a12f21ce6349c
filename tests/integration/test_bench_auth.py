"""``nexus-bench --spawn --auth``: the same load against auth off and auth on, one run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import REPO

pytestmark = pytest.mark.integration


def _bench(*argv: str, timeout: float = 90.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nexus_fast.benchmark.cli", *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
    )


@pytest.mark.parametrize("scenario", ["heartbeat", "dispatch"])
def test_auth_off_and_on_in_one_run(tmp_path: Path, scenario: str) -> None:
    out = tmp_path / "out.json"
    done = _bench(scenario, "--spawn", "--auth", "--nodes", "20", "--duration", "1",
                  "--json", str(out))  # fmt: skip
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr[-3000:]}"
    doc = json.loads(out.read_text())
    off, on = doc["results"]
    assert (off["extra"]["auth"], on["extra"]["auth"]) == ("off", "on")
    assert off["name"].endswith("[auth off]") and on["name"].endswith("[auth on]")
    for m in (off, on):
        assert m["throughput"] > 0 and m["errors"] == 0, m
    # The second server really had auth on: a scrape with a forged token got 401.
    assert doc["config"]["auth_check"] == {"metrics_with_forged_token": 401}
    ratios = {r["name"]: r for r in doc["ratios"]}
    assert ratios["auth on / auth off"]["value"] == round(on["throughput"] / off["throughput"], 3)
    assert "auth on / auth off, per server CPU" in ratios
    assert "auth on / auth off" in done.stdout


@pytest.mark.parametrize(
    "argv",
    [
        ["heartbeat", "--auth", "--target", "127.0.0.1:1"],
        ["events", "--spawn", "--auth"],
        ["dispatch", "--spawn", "--auth", "--baseline"],
        ["dispatch", "--spawn", "--auth", "--token", "x"],
    ],
)
def test_auth_needs_spawn_and_its_own_credentials(argv: list[str]) -> None:
    done = _bench(*argv, timeout=30)
    assert done.returncode == 2, done.stderr
    assert "--auth" in done.stderr
