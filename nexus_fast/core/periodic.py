"""Background jobs that run a tick every few seconds on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from nexus_fast import errors


class Periodic:
    """Runs ``tick`` every ``interval`` seconds until stopped.

    A failing tick is logged and the job goes on: one bad tick must not silently end
    liveness checks, retention or retries for the life of the process.
    """

    def __init__(self, name: str, tick: Callable[[], Awaitable[object]], log: logging.Logger):
        self.name = name
        self._tick = tick
        self._log = log
        self._task: asyncio.Task[None] | None = None

    def start(self, interval: float) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(interval), name=self.name)

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except (errors.Unavailable, errors.ResourceExhausted) as exc:
                # A busy or closed store (or a lost leadership): typed, one line.
                self._log.warning("%s tick failed: %s", self.name, exc)
            except Exception:
                self._log.exception("%s tick failed", self.name)
