"""Load drivers: closed loop (N workers back to back) and fixed rate (open loop).

In fixed-rate mode operation ``i`` is *intended* to start at ``start + i / rate``; the
driver launches every operation that is due (late ones at once, in a burst) and hands the
intended time to the operation, which measures its latency from there. A server that
stalls therefore shows the stall in the latencies of every operation that should have
been sent meanwhile, instead of silently sending fewer (no coordinated omission).
"""

from __future__ import annotations

import asyncio
import math
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TextIO

Operation = Callable[[float], Awaitable[None]]

HARD_MAX_DURATION = 600.0  # seconds: no run lasts longer, whatever the flags say
HARD_MAX_OPS = 100_000_000
DRAIN_TIMEOUT = 10.0  # seconds to let in-flight operations finish after the window


class FixedRateSchedule:
    """Intended start times of a fixed-rate run: ``start + i / rate``."""

    __slots__ = ("rate", "start")

    def __init__(self, rate: float, start: float) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number, got {rate!r}")
        self.rate = rate
        self.start = start

    def intended(self, i: int) -> float:
        """When operation ``i`` (0-based) should start."""
        return self.start + i / self.rate

    def due(self, now: float) -> int:
        """How many operations should have started by ``now`` (operations 0..due-1)."""
        if now < self.start:
            return 0
        # The epsilon keeps float rounding from making op i due a hair after intended(i).
        return int((now - self.start) * self.rate + 1e-9) + 1


@dataclass
class DriveResult:
    """What a drive did."""

    started: int
    errors: int
    elapsed: float  # seconds from the first start to the end of the window
    last_error: str = ""


async def drive(
    op: Operation,
    *,
    duration: float,
    concurrency: int = 1,
    rate: float | None = None,
    max_ops: int | None = None,
    max_inflight: int = 10_000,
    stop: asyncio.Event | None = None,
) -> DriveResult:
    """Run ``op`` closed-loop (``concurrency`` workers) or at a fixed ``rate`` per second.

    Ends after ``duration`` seconds, ``max_ops`` operations or when ``stop`` is set,
    whichever comes first, then waits up to :data:`DRAIN_TIMEOUT` for in-flight ones.
    ``op`` gets the intended start time (``time.perf_counter()`` scale); an exception it
    raises counts as an error.
    """
    duration = min(duration, HARD_MAX_DURATION)
    limit = min(max_ops or HARD_MAX_OPS, HARD_MAX_OPS)
    stop = stop or asyncio.Event()
    state = DriveResult(0, 0, 0.0)
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def run_one(intended: float) -> None:
        try:
            await op(intended)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            state.errors += 1
            state.last_error = f"{type(exc).__name__}: {exc}"[:300]

    def more() -> bool:
        return not stop.is_set() and state.started < limit and time.perf_counter() < deadline

    if rate is None:

        async def worker() -> None:
            while more():
                state.started += 1
                await run_one(time.perf_counter())

        workers = [asyncio.ensure_future(worker()) for _ in range(max(1, concurrency))]
        await _wait_window(workers, deadline, stop)
        state.elapsed = time.perf_counter() - t0
        await _drain(workers)
        return state

    schedule = FixedRateSchedule(rate, t0)
    inflight: set[asyncio.Future[None]] = set()
    slots = asyncio.Semaphore(max_inflight)
    while more():
        due = min(schedule.due(time.perf_counter()), limit)
        while state.started < due:
            await slots.acquire()  # a full pipe delays sends; latency still counts from plan
            fut = asyncio.ensure_future(run_one(schedule.intended(state.started)))
            fut.add_done_callback(_release(inflight, slots))
            inflight.add(fut)
            state.started += 1
        delay = schedule.intended(state.started) - time.perf_counter()
        if delay > 0:
            try:
                await asyncio.wait_for(
                    stop.wait(), min(delay, max(0.0, deadline - time.perf_counter()))
                )
            except TimeoutError:
                pass
    state.elapsed = time.perf_counter() - t0
    await _drain(list(inflight))
    return state


def _release(
    inflight: set[asyncio.Future[None]], slots: asyncio.Semaphore
) -> Callable[[asyncio.Future[None]], None]:
    def done(fut: asyncio.Future[None]) -> None:
        inflight.discard(fut)
        slots.release()

    return done


async def _wait_window(
    tasks: Sequence[asyncio.Future[None]], deadline: float, stop: asyncio.Event
) -> None:
    """Until every worker finished (count reached), ``stop`` is set or the deadline."""
    stopper: asyncio.Future[None] = asyncio.ensure_future(_wait_set(stop))
    pending: set[asyncio.Future[None]] = set(tasks)
    try:
        while pending and not stop.is_set():
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                return
            _done, rest = await asyncio.wait(
                pending | {stopper}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
            )
            rest.discard(stopper)
            pending = rest
    finally:
        stopper.cancel()


async def _wait_set(event: asyncio.Event) -> None:
    await event.wait()


async def _drain(tasks: Sequence[asyncio.Future[None]]) -> None:
    if not tasks:
        return
    _done, pending = await asyncio.wait(tasks, timeout=DRAIN_TIMEOUT)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)


class Progress:
    """A live progress line: rewritten with ``\\r`` on a TTY, one line per period otherwise."""

    def __init__(
        self,
        render: Callable[[float], str],
        *,
        interval: float | None = None,
        stream: TextIO | None = None,
    ) -> None:
        self.render = render
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = interval if interval is not None else (0.5 if self.tty else 2.0)
        self._task: asyncio.Task[None] | None = None
        self._t0 = 0.0
        self._width = 0

    def start(self) -> None:
        """Begin printing (call from the loop)."""
        self._t0 = time.perf_counter()
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self._emit()

    def _emit(self) -> None:
        line = self.render(time.perf_counter() - self._t0)
        if self.tty:
            pad = max(0, self._width - len(line))
            self.stream.write("\r" + line + " " * pad)
            self._width = len(line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    async def stop(self) -> None:
        """Stop printing; on a TTY end the line."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.tty and self._width:
            self.stream.write("\n")
            self.stream.flush()
