"""A client worker process (``nexus-bench _worker ROLE SPEC_JSON``): role -> scenario code.

Kept apart from :mod:`nexus_fast.benchmark.workers` (the parent side and the pipe
protocol, which the scenarios import) so that no import cycle joins the two.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from nexus_fast.benchmark.scenarios import dispatch, events, heartbeat
from nexus_fast.benchmark.workers import WorkerControl

Role = Callable[[dict[str, Any], WorkerControl], Awaitable[dict[str, Any]]]

ROLES: dict[str, Role] = {
    "dispatch-nodes": dispatch.worker_nodes,
    "heartbeat-ours": heartbeat.worker_ours,
    "heartbeat-baseline": heartbeat.worker_baseline,
    "events-subscribers": events.worker_subscribers,
}


async def _amain(role: str, spec: dict[str, Any]) -> None:
    ctl = WorkerControl()
    await ctl.start()
    result = await ROLES[role](spec, ctl)
    ctl.send(result=result)


def main(argv: Sequence[str]) -> int:
    """``nexus-bench _worker ROLE SPEC_JSON`` (started by :class:`ClientWorkers` only)."""
    if len(argv) != 2 or argv[0] not in ROLES:
        print("nexus-bench _worker: internal mode, started by nexus-bench", file=sys.stderr)
        return 2
    import uvloop

    try:
        uvloop.run(_amain(argv[0], json.loads(argv[1])))
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if os.environ.get("NEXUS_BENCH_DEBUG"):
            raise
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        print(f"nexus-bench worker {argv[0]}: {type(exc).__name__}: {detail}", file=sys.stderr)
        return 1
    return 0
