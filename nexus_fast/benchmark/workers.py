"""Client worker processes: ``--client-procs K`` splits a scenario's client load over K.

A worker is ``python -m nexus_fast.benchmark.cli _worker ROLE SPEC_JSON`` (a hidden mode).
It talks to the parent over its pipes, one JSON object per line on stdout:

    {"ready": {...}}      set up (nodes registered / subscribers subscribed), waiting for go
    {"progress": n}       every 0.5 s during the window, for the parent's progress line
    {"done": true}        the window just ended (the parent takes its closing snapshot)
    {"result": {...}}     the window is over: counts, serialized histograms, CPU seconds

and reads ``go`` / ``stop`` lines on stdin. End of stdin (the parent exited or died) is a
stop, every role also ends after its ``--duration`` by itself, and the parent's
:class:`~nexus_fast.benchmark.procs.ProcessGroup` terminates workers on exit or Ctrl-C. A
worker that fails writes one line to stderr (its log) and exits 1; the parent turns that
into a :class:`~nexus_fast.benchmark.procs.BenchError` naming the worker and the line.

A result is ``{"counts": {name: int}, "hists": {name: LatencyHistogram.to_dict()},
"cpu": seconds, "elapsed": seconds, "first": perf_counter | None, "last": ..., "extra":
{...}}``; :func:`aggregate` sums counts and CPU and merges histograms (``perf_counter`` is
CLOCK_MONOTONIC on Linux, the same clock in every process, so ``first``/``last`` compare).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from nexus_fast.benchmark.histogram import LatencyHistogram
from nexus_fast.benchmark.procs import BenchError, ProcessGroup

MAX_CLIENT_PROCS = 64
READY_TIMEOUT = 600.0  # registering 10,000 nodes took 14 s on the 2-core VM
RESULT_GRACE = 60.0  # seconds past the window a worker may take to report
PROGRESS_EVERY = 0.5
LINE_LIMIT = 256 * 1024 * 1024  # a result line carries histograms (and an events frame)


def split(total: int, k: int) -> list[tuple[int, int]]:
    """``total`` items over ``k`` workers as ``(offset, count)``; sizes differ by <= 1."""
    base, extra = divmod(total, k)
    out = []
    offset = 0
    for i in range(k):
        n = base + (1 if i < extra else 0)
        out.append((offset, n))
        offset += n
    return out


@dataclass
class Aggregate:
    """Every worker's result, combined."""

    counts: dict[str, int] = field(default_factory=dict)
    hists: dict[str, LatencyHistogram] = field(default_factory=dict)
    cpu: float = 0.0
    cpu_per_proc: list[float] = field(default_factory=list)
    elapsed: float = 0.0  # the longest worker window
    first: float | None = None  # earliest first receive (perf_counter, any worker)
    last: float | None = None  # latest last receive
    extras: list[dict[str, Any]] = field(default_factory=list)


def aggregate(results: Sequence[dict[str, Any]]) -> Aggregate:
    """Sum counts and CPU, merge histograms, span first..last over ``results``."""
    agg = Aggregate()
    for res in results:
        for name, value in res.get("counts", {}).items():
            agg.counts[name] = agg.counts.get(name, 0) + int(value)
        for name, doc in res.get("hists", {}).items():
            agg.hists.setdefault(name, LatencyHistogram()).merge(LatencyHistogram.from_dict(doc))
        cpu = float(res.get("cpu", 0.0))
        agg.cpu += cpu
        agg.cpu_per_proc.append(round(cpu, 3))
        agg.elapsed = max(agg.elapsed, float(res.get("elapsed", 0.0)))
        first, last = res.get("first"), res.get("last")
        if first:
            agg.first = first if agg.first is None else min(agg.first, first)
        if last:
            agg.last = last if agg.last is None else max(agg.last, last)
        agg.extras.append(res.get("extra", {}))
    return agg


# ------------------------------------------------------------------ parent side


class ClientWorkers:
    """K worker processes of one role, started, synchronised and collected by the parent."""

    def __init__(
        self,
        group: ProcessGroup,
        role: str,
        specs: Sequence[dict[str, Any]],
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.group = group
        self.role = role
        self.specs = list(specs)
        self.env = {**os.environ, **(env or {})}  # secrets go here, never into argv
        self.procs: list[subprocess.Popen[bytes]] = []
        self.progress = [0] * len(self.specs)
        self._ready: list[asyncio.Future[dict[str, Any]]] = []
        self._done: list[asyncio.Future[dict[str, Any]]] = []
        self._result: list[asyncio.Future[dict[str, Any]]] = []
        self._readers: list[asyncio.Task[None]] = []
        self._transports: list[asyncio.BaseTransport] = []

    @property
    def sent(self) -> int:
        """Sum of the workers' last progress figures."""
        return sum(self.progress)

    async def start(self) -> None:
        """Start every worker (stdout read on this loop, stderr to its log file)."""
        loop = asyncio.get_running_loop()
        k = len(self.specs)
        for i, spec in enumerate(self.specs):
            argv = [
                sys.executable,
                "-m",
                "nexus_fast.benchmark.cli",
                "_worker",
                self.role,
                json.dumps(spec),
            ]
            proc = self.group.start(
                argv, log_name=f"worker-{self.role}-{i}", env=dict(self.env), pipes=True
            )
            self.procs.append(proc)
            ready: asyncio.Future[dict[str, Any]] = loop.create_future()
            result: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._ready.append(ready)
            self._done.append(loop.create_future())
            self._result.append(result)
            reader = asyncio.StreamReader(limit=LINE_LIMIT)
            assert proc.stdout is not None
            protocol = asyncio.StreamReaderProtocol(reader)
            transport, _ = await loop.connect_read_pipe(_const(protocol), proc.stdout)
            self._transports.append(transport)
            self._readers.append(asyncio.ensure_future(self._read(i, k, proc, reader)))

    async def _read(
        self, i: int, k: int, proc: subprocess.Popen[bytes], reader: asyncio.StreamReader
    ) -> None:
        ready, done, result = self._ready[i], self._done[i], self._result[i]
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                doc = json.loads(line)
                if "progress" in doc:
                    self.progress[i] = int(doc["progress"])
                elif "ready" in doc and not ready.done():
                    ready.set_result(doc["ready"])
                elif "done" in doc and not done.done():
                    done.set_result({})
                elif "result" in doc and not result.done():
                    result.set_result(doc["result"])
                    if not done.done():
                        done.set_result({})
        except (ValueError, OSError) as exc:  # a garbled line: the worker is broken
            error = BenchError(f"client worker {i + 1}/{k} ({self.role}): bad output: {exc}")
            for fut in (ready, done, result):
                if not fut.done():
                    fut.set_exception(error)
                    fut.exception()
            return
        if ready.done() and result.done():
            return
        loop = asyncio.get_running_loop()
        rc = await loop.run_in_executor(None, _wait_rc, proc)
        error = BenchError(
            f"client worker {i + 1}/{k} ({self.role}) exited with {rc}: {self._last_line(proc)}"
        )
        for fut in (ready, done, result):
            if not fut.done():
                fut.set_exception(error)
                fut.exception()  # retrieved: no "never retrieved" warning if unused

    def _last_line(self, proc: subprocess.Popen[bytes]) -> str:
        lines = [x for x in self.group.log_tail(proc).splitlines() if x.strip()]
        return lines[-1].strip() if lines else "no output"

    async def ready(self, timeout: float = READY_TIMEOUT) -> list[dict[str, Any]]:
        """Wait until every worker is set up; the first failure raises."""
        return await self._all(self._ready, timeout, None)

    async def done(self, timeout: float, stop: asyncio.Event | None = None) -> None:
        """Until every worker's window ended; ``stop`` (Ctrl-C) tells them to end it."""
        await self._all(self._done, timeout, stop)

    async def results(
        self, timeout: float, stop: asyncio.Event | None = None
    ) -> list[dict[str, Any]]:
        """Every worker's result; ``stop`` (Ctrl-C) tells the workers to end their window."""
        return await self._all(self._result, timeout, stop)

    async def _all(
        self,
        futs: list[asyncio.Future[dict[str, Any]]],
        timeout: float,
        stop: asyncio.Event | None,
    ) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        pending: set[asyncio.Future[Any]] = set(futs)
        stopper = asyncio.ensure_future(stop.wait()) if stop is not None else None
        try:
            while pending:
                waits = pending | ({stopper} if stopper and not stopper.done() else set())
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BenchError(
                        f"{len(pending)} client worker(s) ({self.role}) did not answer "
                        f"within {timeout:.0f}s"
                    )
                done, _ = await asyncio.wait(
                    waits, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                for fut in done:
                    if fut is stopper:
                        self.send("stop")
                        continue
                    fut.result()  # raises the worker's error
                    pending.discard(fut)
        finally:
            if stopper is not None:
                stopper.cancel()
        return [f.result() for f in futs]

    def send(self, word: str) -> None:
        """Write ``word`` (go, stop) to every worker still running."""
        for proc in self.procs:
            if proc.stdin is not None and proc.poll() is None:
                with contextlib.suppress(OSError, ValueError):
                    proc.stdin.write(word.encode() + b"\n")
                    proc.stdin.flush()

    async def close(self, timeout: float = 10.0) -> None:
        """Close stdin (the workers stop and exit), wait for them, then kill stragglers."""
        for proc in self.procs:
            if proc.stdin is not None:
                with contextlib.suppress(OSError):
                    proc.stdin.close()
        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(None, _wait_rc, p, timeout) for p in self.procs),
            return_exceptions=True,
        )
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)
        for transport in self._transports:
            transport.close()


def _const(protocol: asyncio.StreamReaderProtocol) -> Callable[[], asyncio.StreamReaderProtocol]:
    return lambda: protocol


def _wait_rc(proc: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


# ------------------------------------------------------------------ worker side


class WorkerControl:
    """The worker's end of the pipes: ``go``/``stop`` from stdin, JSON lines to stdout."""

    def __init__(self) -> None:
        self.go = asyncio.Event()
        self.stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Read stdin in the background (end of file = stop)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

        async def commands() -> None:
            try:
                while True:
                    line = (await reader.readline()).strip()
                    if line == b"go":
                        self.go.set()
                    elif line == b"stop" or (not line and reader.at_eof()):
                        self.stop.set()
                        self.go.set()  # whoever waits for go sees the stop at once
                        return
            except (OSError, ValueError):
                self.stop.set()
                self.go.set()

        self._task = asyncio.ensure_future(commands())

    def send(self, **doc: Any) -> None:
        """One JSON line to the parent."""
        sys.stdout.buffer.write(json.dumps(doc).encode() + b"\n")
        sys.stdout.buffer.flush()

    async def window(self, duration: float, done: asyncio.Event | None = None) -> None:
        """Until ``duration`` seconds passed, ``done`` is set or the parent says stop."""
        waits = [asyncio.ensure_future(self.stop.wait())]
        if done is not None:
            waits.append(asyncio.ensure_future(done.wait()))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait(waits, timeout=duration, return_when="FIRST_COMPLETED")
        for w in waits:
            w.cancel()

    def progress_task(self, value: Callable[[], int]) -> asyncio.Task[None]:
        """Report ``value()`` every :data:`PROGRESS_EVERY` seconds until cancelled."""

        async def loop() -> None:
            while True:
                await asyncio.sleep(PROGRESS_EVERY)
                self.send(progress=value())

        return asyncio.ensure_future(loop())
