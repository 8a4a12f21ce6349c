"""The Celery app of ``nexus-bench --peers celery``: one no-op task, Redis broker and backend.

Imported only by the processes the harness starts for that peer (the solo worker and
the client in :mod:`nexus_fast.benchmark.peers`), which set ``NEXUS_BENCH_REDIS_URL`` to
the ``redis-server`` the harness started. Needs the optional extra ``.[peers]``.
"""

from __future__ import annotations

import importlib
import os
from typing import Any

_celery: Any = importlib.import_module("celery")

_url = os.environ.get("NEXUS_BENCH_REDIS_URL", "redis://127.0.0.1:6379/0")
app: Any = _celery.Celery("nexus_bench", broker=_url, backend=_url)
app.conf.update(
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_prefetch_multiplier=64,  # a throughput run keeps the solo worker fed
    result_expires=600,
)


def _noop(i: int) -> int:
    return i


noop: Any = app.task(name="nexus_bench.noop")(_noop)
