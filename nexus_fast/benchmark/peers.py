"""What users pick instead, measured in the same run: Ray and Celery (``--peers``).

The same no-op workload as ours: a task that returns its argument, one (or ``--concurrency``)
in flight for a round trip, or many submitted then collected for throughput.

* **Ray**: ``ray.init(num_cpus=2)``, a remote function (``ray.get(f.remote(i))``) and an
  actor method (``ray.get(actor.call.remote(i))``); throughput submits every task, then
  gets them all.
* **Celery** with a Redis broker and result backend: the harness starts Debian's
  ``redis-server`` on a free 127.0.0.1 port (no persistence) and one ``celery worker
  --pool solo``, and stops both by pid; round trip ``noop.delay(i).get()``, throughput
  ``delay`` every task, then ``get`` them all.

Each peer's client runs in its own process (``python -m nexus_fast.benchmark.peers``) so
its imports and threads never touch the harness's event loop; it prints one JSON document
with its histograms. The peers are an optional extra: ``pip install '.[peers]'``
(ray, celery[redis], redis); :func:`missing` says what is not installed.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import json
import os
import shutil
import sys
import threading
import time
from collections.abc import Sequence
from typing import Any, Final

from nexus_fast.benchmark.histogram import LatencyHistogram
from nexus_fast.benchmark.procs import HOST, BenchError, ProcessGroup, free_ports, wait_port
from nexus_fast.benchmark.report import Measurement, Ratio, ratio

PEERS: Final = ("ray", "celery")
WORKLOADS: Final = ("roundtrip", "throughput")
REDIS_URL_ENV: Final = "NEXUS_BENCH_REDIS_URL"
INSTALL_HINT: Final = "pip install '.[peers]' (from the source tree; ray, celery[redis], redis)"
PEER_TIMEOUT: Final = 300.0  # one peer's whole measurement, start-up included
_MODULES: Final = {"ray": ("ray",), "celery": ("celery", "redis")}


def parse_peers(text: str) -> list[str]:
    """``"ray,celery"`` -> ``["ray", "celery"]``; argparse turns ValueError into exit 2."""
    peers = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if not peers or unknown:
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated subset of {','.join(PEERS)}, got {text!r}"
        )
    return list(dict.fromkeys(peers))


def missing(peers: Sequence[str]) -> str | None:
    """Why ``peers`` cannot run here (one clear line), or None when they can."""
    absent = [m for p in peers for m in _MODULES[p] if importlib.util.find_spec(m) is None]
    if absent:
        return (
            f"--peers {','.join(peers)} needs the optional peers extra, not installed "
            f"(missing: {', '.join(absent)}): {INSTALL_HINT}"
        )
    if "celery" in peers and shutil.which("redis-server") is None:
        return (
            "--peers celery needs Redis as broker and result backend: "
            "apt-get install redis-server (Debian), then run again"
        )
    return None


# ---------------------------------------------------------------- harness side


async def measure(
    group: ProcessGroup, peer: str, workload: str, *, count: int, concurrency: int, warmup: int
) -> list[Measurement]:
    """Run one peer's client process (and for Celery its Redis and worker) to the end."""
    env = dict(os.environ)
    started: list[int] = []
    try:
        if peer == "celery":
            env[REDIS_URL_ENV] = _start_celery(group, env, started)
        argv = [
            sys.executable,
            "-m",
            "nexus_fast.benchmark.peers",
            peer,
            workload,
            "--count",
            str(count),
            "--concurrency",
            str(concurrency),
            "--warmup",
            str(warmup),
        ]
        proc = group.start(argv, log_name=f"peer-{peer}-{workload}", env=env, pipes=True)
        loop = asyncio.get_running_loop()
        try:
            out, _ = await loop.run_in_executor(None, lambda: proc.communicate(None, PEER_TIMEOUT))
        except Exception:
            group.stop(proc.pid)
            raise
        if proc.returncode != 0:
            raise BenchError(
                f"{peer} {workload} exited with {proc.returncode}:\n{group.log_tail(proc)}"
            )
        doc = json.loads(out.decode().strip().splitlines()[-1])
    finally:
        for pid in reversed(started):
            group.stop(pid)
    return [_measurement(peer, workload, row) for row in doc["results"]]


async def throughput_ratios(ctx: Any, ours: Measurement) -> None:
    """``dispatch --peers``: each peer's tasks/s in this run, and our commands/s over it."""
    args = ctx.args
    for peer in args.peers or ():
        if ctx.stopping():
            return
        print(f"nexus-bench: measuring {peer} ...", file=sys.stderr)
        rows = await measure(
            ctx.group, peer, "throughput", count=args.peer_count or 20_000, concurrency=1, warmup=20
        )
        ctx.report.baseline += rows
        for row in rows:
            task = "actor" not in row.name
            target = ">= 5" if peer == "ray" and task else (">= 10" if peer == "celery" else "")
            ctx.report.ratios.append(
                Ratio(
                    f"commands/s / {row.name.split(':')[0]}/s",
                    ratio(ours.throughput, row.throughput),
                    f"{ours.throughput:,.0f} cmd/s / {row.throughput:,.0f} {row.unit}",
                    target,
                )
            )


def _start_celery(group: ProcessGroup, env: dict[str, str], started: list[int]) -> str:
    """redis-server on a free loopback port, then one solo Celery worker; the broker URL."""
    redis = shutil.which("redis-server")
    if redis is None:
        raise BenchError(missing(["celery"]) or "redis-server not found")
    (port,) = free_ports(1)
    argv = [redis, "--bind", HOST, "--port", str(port), "--save", "", "--appendonly", "no"]
    proc = group.start(argv, log_name="redis", env=env)
    started.append(proc.pid)
    wait_port(HOST, port, proc, 15.0)
    url = f"redis://{HOST}:{port}/0"
    worker = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "nexus_fast.benchmark.celery_app",
        "worker",
        "--pool",
        "solo",
        "--loglevel",
        "WARNING",
        "--without-gossip",
        "--without-mingle",
        "--without-heartbeat",
    ]
    started.append(
        group.start(worker, log_name="celery-worker", env={**env, REDIS_URL_ENV: url}).pid
    )
    return url


def _measurement(peer: str, workload: str, row: dict[str, Any]) -> Measurement:
    m = Measurement(
        name=row["name"],
        throughput=row["throughput"],
        unit=row["unit"],
        count=row["count"],
        duration_s=round(row["duration_s"], 3),
        errors=row.get("errors", 0),
        extra={"peer": peer, "workload": workload, **row.get("extra", {})},
    )
    if row.get("hist"):
        m.add_latency("round trip", LatencyHistogram.from_dict(row["hist"]))
    return m


# ---------------------------------------------------------------- client side (child)


def _row(
    name: str, unit: str, count: int, elapsed: float, hist: LatencyHistogram | None, **extra: Any
) -> dict[str, Any]:
    return {
        "name": name,
        "unit": unit,
        "count": count,
        "duration_s": elapsed,
        "throughput": count / max(elapsed, 1e-9),
        "hist": hist.to_dict() if hist is not None else None,
        "extra": extra,
    }


def _closed_loop_threads(call: Any, count: int, concurrency: int) -> tuple[LatencyHistogram, float]:
    """``call(i)`` (blocking) ``count`` times from ``concurrency`` threads; (latencies, wall)."""
    hist = LatencyHistogram()
    lock = threading.Lock()
    next_i = [0]

    def worker() -> None:
        while True:
            with lock:
                i = next_i[0]
                if i >= count:
                    return
                next_i[0] += 1
            t0 = time.perf_counter()
            call(i)
            dt = time.perf_counter() - t0
            with lock:
                hist.record(dt)

    t0 = time.perf_counter()
    if concurrency == 1:
        worker()
    else:
        threads = [threading.Thread(target=worker) for _ in range(concurrency)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return hist, time.perf_counter() - t0


def _ray_closed_loop(ray: Any, submit: Any, count: int, concurrency: int) -> tuple[Any, float]:
    """``concurrency`` refs in flight, each replaced when it completes (``ray.wait``)."""
    if concurrency == 1:
        return _closed_loop_threads(lambda i: ray.get(submit(i)), count, 1)
    hist = LatencyHistogram()
    pending: dict[Any, float] = {}
    issued = 0
    t0 = time.perf_counter()
    while issued < min(concurrency, count):
        pending[submit(issued)] = time.perf_counter()
        issued += 1
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            ray.get(ref)
            hist.record(time.perf_counter() - pending.pop(ref))
            if issued < count:
                pending[submit(issued)] = time.perf_counter()
                issued += 1
    return hist, time.perf_counter() - t0


def run_ray(workload: str, count: int, concurrency: int, warmup: int) -> list[dict[str, Any]]:
    """Ray tasks and actor calls (``ray.init(num_cpus=2)``, the machine's 2 cores)."""
    ray: Any = importlib.import_module("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:

        def noop(i: int) -> int:
            return i

        class Echo:
            def call(self, i: int) -> int:
                return i

        task = ray.remote(noop)
        actor = ray.remote(Echo).remote()
        version = str(ray.__version__)
        ray.get([task.remote(i) for i in range(warmup)])  # workers started, code shipped
        ray.get([actor.call.remote(i) for i in range(warmup)])
        if workload == "roundtrip":
            rows = []
            for name, submit in (
                ("Ray task: ray.get(f.remote(i))", task.remote),
                ("Ray actor: ray.get(a.call.remote(i))", actor.call.remote),
            ):
                hist, wall = _ray_closed_loop(ray, submit, count, concurrency)
                rows.append(
                    _row(
                        name,
                        "round trips/s",
                        count,
                        wall,
                        hist,
                        version=version,
                        concurrency=concurrency,
                    )
                )
            return rows
        rows = []
        for name, submit in (
            ("Ray tasks: submit all, then ray.get", task.remote),
            ("Ray actor calls: submit all, then ray.get", actor.call.remote),
        ):
            t0 = time.perf_counter()
            ray.get([submit(i) for i in range(count)])
            rows.append(
                _row(name, "tasks/s", count, time.perf_counter() - t0, None, version=version)
            )
        return rows
    finally:
        ray.shutdown()


def run_celery(workload: str, count: int, concurrency: int, warmup: int) -> list[dict[str, Any]]:
    """Celery + Redis (broker and result backend), one solo worker started by the harness."""
    app_module: Any = importlib.import_module("nexus_fast.benchmark.celery_app")
    celery: Any = importlib.import_module("celery")
    noop = app_module.noop
    for i in range(max(1, warmup)):  # the first waits for the worker to come up
        noop.delay(i).get(timeout=60)
    version = str(celery.__version__)
    if workload == "roundtrip":
        hist, wall = _closed_loop_threads(
            lambda i: noop.delay(i).get(timeout=30), count, concurrency
        )
        name = "Celery + Redis: noop.delay(i).get()"
        return [
            _row(name, "round trips/s", count, wall, hist, version=version, concurrency=concurrency)
        ]
    t0 = time.perf_counter()
    results = [noop.delay(i) for i in range(count)]
    for result in results:
        result.get(timeout=120)
    name = "Celery + Redis solo worker: delay all, then get"
    return [_row(name, "tasks/s", count, time.perf_counter() - t0, None, version=version)]


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nexus_fast.benchmark.peers PEER WORKLOAD``: one JSON line on stdout."""
    p = argparse.ArgumentParser(prog="nexus_fast.benchmark.peers")
    p.add_argument("peer", choices=PEERS)
    p.add_argument("workload", choices=WORKLOADS)
    p.add_argument("--count", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--warmup", type=int, default=20)
    args = p.parse_args(argv)
    why = missing([args.peer])
    if why:
        print(why, file=sys.stderr)
        return 2
    run = run_ray if args.peer == "ray" else run_celery
    rows = run(args.workload, max(1, args.count), max(1, args.concurrency), max(0, args.warmup))
    sys.stdout.write(json.dumps({"results": rows}) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
