#!/usr/bin/env python3
"""Soak: the real server at half its measured maximum command rate, for N minutes.

Starts ``nexus-fast`` (temporary data dir, free loopback ports), a ``nexus-node`` fleet
and one gRPC WatchEvents subscriber. First measures the maximum rate for a few seconds
(closed loop: several workers each submit a batch and wait for every command of it to be
final), then runs open loop at half of it: every 100 ms one SubmitCommands batch, each
command followed to its final state with WaitCommands. It records every error, each
command's latency (submit to final), and the server's resident heap (RssAnon) every second.

Verdict (``--check``, exit 1 if any fails): 0 errors (RPC errors, commands not
``succeeded``, a subscriber stream ending or seeing a gap), heap RSS growth below 10% (median of
the first window after warm-up vs the last window), p99 stable (the last window's p99 at
most twice the first's, or at most 100 ms more: shared machines are noisy; a window's p99
is the median of its 5-second p99s). The window is a minute, or a third of
the run when that is shorter (20 s windows in CI's 1-minute run).

    .venv/bin/python scripts/soak.py --minutes 10 --json soak.json --check
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from nexus_fast.benchmark.procs import ProcessGroup, spawn_server
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
TICK = 0.1  # seconds between submissions in the open loop
MEASURE_S = 5.0
BATCH = 100  # commands per batch in the max-rate measurement
# p99 is "stable" when the last window's is at most twice the first's, or 100 ms more:
# the CI machines are shared, and a neighbour's burst moves one window's p99 by that much.
P99_SLACK_MS = 100.0


def rss(pid: int) -> int:
    """RssAnon: the heap, what a leak grows. (VmRSS also counts LMDB's data file mapped in,
    which grows with the durable log by design; bench/soak_memory.py splits them too.)"""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def p99(values: list[float]) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def window_p99(samples: list[tuple[float, float]], bucket: float = 5.0) -> float:
    """The median of the p99s of each ``bucket`` seconds: one neighbour's burst on a shared
    machine moves one bucket, not the window's figure."""
    buckets: dict[int, list[float]] = {}
    for t, d in samples:
        buckets.setdefault(int(t // bucket), []).append(d)
    return statistics.median(p99(v) for v in buckets.values()) if buckets else 0.0


class Soak:
    def __init__(self, target: str) -> None:
        self.channel = grpc.aio.insecure_channel(target)
        self.stub = pb_grpc.ControlServiceStub(self.channel)
        self.errors: list[str] = []
        self.latencies: list[tuple[float, float]] = []  # (finished at, seconds)
        self.completed = 0
        self.events = 0
        self.last_index = 0

    async def batch(self, count: int) -> None:
        """Submit ``count`` commands and follow each to its final state."""
        started = time.monotonic()
        try:
            reply = await self.stub.SubmitCommands(
                pb.SubmitCommandsRequest(
                    commands=[pb.CommandSpec(kind="soak", timeout_ms=30_000) for _ in range(count)]
                ),
                timeout=30,
            )
            ids = [r.id for r in reply.results]
            seen = 0
            async for record in self.stub.WaitCommands(
                pb.WaitCommandsRequest(ids=ids, timeout_ms=30_000), timeout=40
            ):
                seen += 1
                now = time.monotonic()
                self.latencies.append((now, now - started))
                if record.state != pb.COMMAND_STATE_SUCCEEDED:
                    self.errors.append(f"{record.id}: {pb.CommandState.Name(record.state)}")
            if seen != len(ids):
                self.errors.append(f"{len(ids) - seen} commands not final in 30 s")
            self.completed += seen
        except grpc.aio.AioRpcError as err:
            self.errors.append(f"{err.code().name}: {err.details()}")

    async def watch(self) -> None:
        """One subscriber to every event: must see contiguous indices, never an error."""
        try:
            async for batch in self.stub.WatchEvents(pb.WatchEventsRequest()):
                for event in batch.events:
                    if self.last_index and event.index != self.last_index + 1:
                        self.errors.append(f"event gap {self.last_index} -> {event.index}")
                    self.last_index = event.index
                    self.events += 1
        except grpc.aio.AioRpcError as err:
            if err.code() != grpc.StatusCode.CANCELLED:
                self.errors.append(f"watch ended: {err.code().name}: {err.details()}")

    async def measure_max(self, workers: int = 8) -> float:
        """Commands per second, closed loop, for MEASURE_S seconds."""
        stop_at = time.monotonic() + MEASURE_S
        before = self.completed

        async def worker() -> None:
            while time.monotonic() < stop_at:
                await self.batch(BATCH)

        started = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(workers)))
        return (self.completed - before) / (time.monotonic() - started)

    async def open_loop(self, rate: float, seconds: float, pid: int) -> list[tuple[float, int]]:
        """Submit ``rate`` commands/s for ``seconds``; returns (t, rss) samples."""
        per_tick = max(1, round(rate * TICK))
        samples: list[tuple[float, int]] = []
        pending: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        next_tick = start
        next_sample = start
        while (now := time.monotonic()) < start + seconds:
            if now >= next_sample:
                samples.append((now - start, rss(pid)))
                next_sample += 1.0
            task = asyncio.create_task(self.batch(per_tick))
            pending.add(task)
            task.add_done_callback(pending.discard)
            next_tick += TICK
            await asyncio.sleep(max(0.0, next_tick - time.monotonic()))
        await asyncio.gather(*pending)
        return samples


async def run(args: argparse.Namespace) -> dict[str, Any]:
    group = ProcessGroup()
    try:
        # A ring that fills within the warm-up: its growth to capacity is not a leak.
        server = spawn_server(group, extra_env={"NEXUS_EVENT_BUFFER_SIZE": str(args.ring)})
        group.start(
            [sys.executable, "-m", "nexus_fast.node", "--target", server.grpc,
             "--nodes", str(args.nodes), "--status-interval", "0", "--exec-duration", "0.01"],
            log_name="fleet",
        )  # fmt: skip
        soak = Soak(server.grpc)
        for _ in range(100):  # until the fleet is ready
            nodes = await soak.stub.ListNodes(
                pb.ListNodesRequest(statuses=[pb.NODE_STATUS_READY]), timeout=5
            )
            if len(nodes.nodes) == args.nodes:
                break
            await asyncio.sleep(0.2)
        watcher = asyncio.create_task(soak.watch())
        max_rate = args.rate * 2 if args.rate else await soak.measure_max()
        rate = args.rate or max_rate / 2
        soak.errors.clear()  # the measurement may overload on purpose; the soak may not
        soak.latencies.clear()
        seconds = args.minutes * 60
        run_started = time.monotonic()
        samples = await soak.open_loop(rate, seconds, server.pid)
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)
        await soak.channel.close()
    finally:
        group.close()
    window = min(60.0, seconds / 3)
    warmup = min(60.0, seconds / 10) if args.warmup is None else args.warmup
    lat = [(t - run_started, d) for t, d in soak.latencies]
    first_lat = [(t, d) for t, d in lat if warmup <= t < warmup + window]
    last_lat = [(t, d) for t, d in lat if t >= seconds - window]
    first_rss = [r for t, r in samples if warmup <= t < warmup + window]
    last_rss = [r for t, r in samples if t >= seconds - window]
    rss_first = statistics.median(first_rss) if first_rss else 0
    rss_last = statistics.median(last_rss) if last_rss else 0
    result = {
        "minutes": args.minutes,
        "nodes": args.nodes,
        "max_rate_per_s": round(max_rate, 1),
        "rate_per_s": round(rate, 1),
        "commands": soak.completed,
        "events_seen": soak.events,
        "errors": len(soak.errors),
        "first_errors": soak.errors[:10],
        "window_s": window,
        "warmup_s": warmup,
        "p99_first_ms": round(1000 * window_p99(first_lat), 2),
        "p99_last_ms": round(1000 * window_p99(last_lat), 2),
        "p50_all_ms": round(1000 * statistics.median([d for _, d in lat]), 2) if lat else None,
        "rss_first_mib": round(rss_first / 2**20, 1),
        "rss_last_mib": round(rss_last / 2**20, 1),
        "rss_growth_pct": round(100 * (rss_last - rss_first) / rss_first, 2) if rss_first else None,
    }
    return result


def verdict(result: dict[str, Any]) -> list[str]:
    """What failed (empty: the soak passed)."""
    failed = []
    if result["errors"]:
        failed.append(f"{result['errors']} errors: {result['first_errors']}")
    growth = result["rss_growth_pct"]
    if growth is None or growth >= 10:
        failed.append(f"RSS grew {growth}% (limit 10%)")
    first, last = result["p99_first_ms"], result["p99_last_ms"]
    if last > max(2 * first, first + P99_SLACK_MS):
        failed.append(f"p99 {result['p99_first_ms']} ms -> {result['p99_last_ms']} ms")
    return failed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--rate", type=float, default=0.0, help="commands/s (default: max/2)")
    parser.add_argument(
        "--ring", type=int, default=8192, help="server event ring size (power of two)"
    )
    parser.add_argument("--warmup", type=float, help="seconds (default: 10%% of the run)")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--check", action="store_true", help="exit 1 unless the soak passed")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    failed = verdict(result)
    result["passed"] = not failed
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    for line in failed:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if failed and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
