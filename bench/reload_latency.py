"""How long a configuration reload takes to apply, by file watch and by SIGHUP.

Starts a real nexus-fast server (temporary data dir, free loopback ports) whose ``--config``
is a symlink. The file-watch path replaces the symlink (what ``kubectl`` ConfigMaps and
config management do); the SIGHUP path rewrites the file behind it, which the watcher does
not see, then signals. Each sample is the time from the change to the new value in
``GET /api/v1/config``.

    .venv/bin/python bench/reload_latency.py --rounds 10
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from nexus_fast.benchmark.procs import free_ports


def _config(path: Path, timeout_s: int) -> Path:
    path.write_text(f'[commands]\ndefault_timeout = "{timeout_s}s"\n')
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "watched").mkdir()
        (root / "files").mkdir()
        link = root / "watched" / "nexus.toml"
        link.symlink_to(_config(root / "files" / "first.toml", 30))
        grpc_port, ws_port, http_port = free_ports(3)
        server = subprocess.Popen(
            [sys.executable, "-m", "nexus_fast.cli", "--config", str(link),
             "--grpc-port", str(grpc_port), "--ws-port", str(ws_port),
             "--http-port", str(http_port), "--db-path", str(root / "data")],
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        url = f"http://127.0.0.1:{http_port}/api/v1/config"

        def current() -> float:
            with urllib.request.urlopen(url, timeout=5) as response:
                return float(json.load(response)["config"]["commands"]["default_timeout"]["value"])

        def wait_until(value: int, started: float) -> float:
            while current() != value:
                time.sleep(0.002)
            return time.perf_counter() - started

        try:
            for _ in range(600):
                try:
                    current()
                    break
                except OSError:
                    time.sleep(0.1)
            samples: dict[str, list[float]] = {"file watch": [], "SIGHUP": []}
            for i in range(args.rounds):
                fresh = root / "watched" / "next"
                fresh.symlink_to(_config(root / "files" / f"{i}.toml", 100 + i))
                started = time.perf_counter()
                fresh.replace(link)
                samples["file watch"].append(wait_until(100 + i, started))
            behind = link.resolve()
            for i in range(args.rounds):
                _config(behind, 200 + i)
                started = time.perf_counter()
                server.send_signal(signal.SIGHUP)
                samples["SIGHUP"].append(wait_until(200 + i, started))
        finally:
            server.terminate()
            server.wait(30)
    for name, values in samples.items():
        values.sort()
        print(
            f"{name}: median {values[len(values) // 2] * 1000:.0f} ms, "
            f"max {values[-1] * 1000:.0f} ms over {len(values)} reloads"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
