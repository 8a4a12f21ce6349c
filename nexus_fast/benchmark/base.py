"""The bottom layer of nexus-bench: what clients and baseline servers both need.

It imports nothing else of nexus-bench, so any module may import it without a cycle.
"""

from __future__ import annotations

import asyncio
import signal

MAX_MESSAGE = 64 * 1024 * 1024  # gRPC message cap, both directions, clients and baselines


async def until_signal() -> None:
    """Return on SIGTERM or SIGINT (the baseline servers' lifetime)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
