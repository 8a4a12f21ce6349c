"""Server memory under a steady fleet: 10,000 nodes, 100 event subscribers, a command load.

Starts a real nexus-fast server (temporary data dir, free loopback ports), a nexus-node
fleet, 100 WebSocket subscribers following every event and a steady SubmitCommands load,
then samples the server's resident memory every ``--every`` seconds for ``--duration``
seconds. Memory must settle after warm-up: the report compares the second half of the run
with the first.

    .venv/bin/python bench/soak_memory.py --duration 300 --json soak.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
import websockets

from nexus_fast.benchmark.procs import free_ports, http_get
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def memory(pid: int) -> dict[str, int]:
    """RssAnon (heap: what a leak grows) and RssFile (LMDB pages mapped in) in bytes."""
    found = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile", "VmRSS"):
                found[key] = int(value.split()[0]) * 1024
    return found


async def subscriber(url: str, counts: list[int], slot: int, stop: asyncio.Event) -> None:
    async with websockets.connect(url, max_size=None) as ws:
        await ws.send(json.dumps({"op": "subscribe", "topics": []}))
        while not stop.is_set():
            try:
                frame = await asyncio.wait_for(ws.recv(), 1.0)
            except TimeoutError:
                continue
            if isinstance(frame, str) and frame.startswith('{"type":"events"'):
                counts[slot] += frame.count('"index":')


async def command_load(target: str, per_second: int, stop: asyncio.Event) -> int:
    sent = 0
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pb_grpc.ControlServiceStub(channel)
        while not stop.is_set():
            started = time.monotonic()
            await stub.SubmitCommands(
                pb.SubmitCommandsRequest(
                    commands=[pb.CommandSpec(kind="soak") for _ in range(per_second)]
                ),
                timeout=30,
            )
            sent += per_second
            await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
    return sent


async def run(args: argparse.Namespace) -> dict[str, object]:
    data = Path(tempfile.mkdtemp(prefix="nexus-soak-"))
    grpc_port, ws_port, http_port = free_ports(3)
    env = dict(os.environ, NEXUS_LOG_LEVEL="warning")
    server = subprocess.Popen(
        [sys.executable, "-m", "nexus_fast.cli", "--config", str(REPO / "configs/development.toml"),
         "--grpc-port", str(grpc_port), "--ws-port", str(ws_port), "--http-port", str(http_port),
         "--db-path", str(data / "data")],
        env=env, cwd=REPO,
    )  # fmt: skip
    fleet: subprocess.Popen[bytes] | None = None
    try:
        base = f"http://{HOST}:{http_port}"
        for _ in range(200):
            with contextlib.suppress(OSError):
                if http_get(base + "/ready")[0] == 200:
                    break
            await asyncio.sleep(0.05)
        fleet = subprocess.Popen(
            [sys.executable, "-m", "nexus_fast.node", "--target", f"{HOST}:{grpc_port}",
             "--nodes", str(args.nodes), "--status-interval", "0", "--exec-duration", "0.01"],
            cwd=REPO, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        stop = asyncio.Event()
        counts = [0] * args.subscribers
        url = f"ws://{HOST}:{ws_port}/v1/events"
        subs = [
            asyncio.create_task(subscriber(url, counts, i, stop)) for i in range(args.subscribers)
        ]
        load = asyncio.create_task(command_load(f"{HOST}:{grpc_port}", args.rate, stop))
        samples: list[tuple[float, int, int]] = []
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < args.duration:
            mem = memory(server.pid)
            samples.append((round(elapsed, 1), mem["RssAnon"], mem["RssFile"]))
            print(
                f"t={elapsed:6.1f}s  server heap (RssAnon)={mem['RssAnon'] / 2**20:7.1f} MiB  "
                f"mapped files (RssFile)={mem['RssFile'] / 2**20:7.1f} MiB  "
                f"events delivered={sum(counts):,}",
                flush=True,
            )
            await asyncio.sleep(args.every)
        stop.set()
        sent = await load
        await asyncio.gather(*subs, return_exceptions=True)
    finally:
        if fleet is not None:
            fleet.send_signal(signal.SIGTERM)
            fleet.wait(30)
        server.send_signal(signal.SIGTERM)
        server.wait(30)
    # Heap only: RssFile is LMDB's data file mapped in, which grows with the durable log.
    half = len(samples) // 2
    first = max(r for _, r, _ in samples[:half]) if half else 0
    second = max(r for _, r, _ in samples[half:]) if samples else 0
    return {
        "nodes": args.nodes,
        "subscribers": args.subscribers,
        "commands_per_s": args.rate,
        "commands_sent": sent,
        "events_delivered": sum(counts),
        "duration_s": args.duration,
        "samples_s_anon_file": samples,
        "heap_peak_first_half_mib": round(first / 2**20, 1),
        "heap_peak_second_half_mib": round(second / 2**20, 1),
        "growth_second_vs_first_half_pct": round(100 * (second - first) / first, 1)
        if first
        else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=300.0)
    parser.add_argument("--every", type=float, default=15.0)
    parser.add_argument("--nodes", type=int, default=10_000)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--rate", type=int, default=200, help="commands per second")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps({k: v for k, v in result.items() if k != "samples_s_anon_file"}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
