"""Run a chaos script (scripts/chaos.py, scripts/chaos_cluster.py) and read its figures."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from .conftest import REPO


def run_chaos_script(
    script: str, tmp_path: Path, rounds: int, seed: int, timeout: float
) -> tuple[dict[str, Any], str, int]:
    """``scripts/<script>`` for ``rounds`` rounds: (its figures, a detail text for assertion
    messages, its exit code). Fails unless it wrote figures for every round."""
    out = tmp_path / f"{script}.json"
    # Its own process group: a timeout kills the script with its servers, fleets and etcd.
    proc = subprocess.Popen(
        [
            sys.executable,
            str(REPO / "scripts" / script),
            *("--rounds", str(rounds), "--seed", str(seed), "--json", str(out)),
            *("--workdir", str(tmp_path / "work")),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert out.exists(), f"{script} wrote no figures (exit {proc.returncode}):\n{stderr}"
    figures: dict[str, Any] = json.loads(out.read_text())
    detail = f"{json.dumps(figures, indent=1)}\n{stderr[-3000:]}"
    assert figures["rounds"] == rounds, detail
    return figures, detail, proc.returncode
