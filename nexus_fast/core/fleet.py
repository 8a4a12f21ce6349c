"""Keeps the scheduler's node matrix in step with the node registry.

The registry tells its listeners about every change; this one turns them into
incremental updates of the scheduler's feature-major arrays, so a placement
never rebuilds anything.
"""

from __future__ import annotations

import time

from nexus_fast.core.nodes import Session
from nexus_fast.core.scheduler import Scheduler
from nexus_fast.pb import fabric_pb2 as pb


def schedulable(node: pb.Node) -> bool:
    """New work may go to ready, eligible nodes only (not draining, not down)."""
    return node.status == pb.NODE_STATUS_READY and node.eligible


class SchedulerFeed:
    """A NodeListener that mirrors nodes into the scheduler."""

    def __init__(self, scheduler: Scheduler) -> None:
        self._scheduler = scheduler

    def node_updated(self, node: pb.Node) -> None:
        self._scheduler.upsert_node(
            node.id,
            node.labels,
            node.capacity,
            node.usage,
            schedulable(node),
            time.monotonic(),
        )

    def node_usage(self, node: pb.Node) -> None:
        self._scheduler.update_usage(node.id, node.usage, time.monotonic())

    def node_removed(self, node: pb.Node) -> None:
        self._scheduler.remove_node(node.id)

    def session_opened(self, node: pb.Node, session: Session) -> None:
        """Streams do not change what the scheduler knows."""
