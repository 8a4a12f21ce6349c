"""Time travel: the fabric's state right after event N, rebuilt by folding the event log.

Every state change is an event written in the same transaction as the change, and each
``node``, ``command`` and ``agent`` event carries the whole entity after the change
(docs/events.md). Folding the log from its first event therefore rebuilds the state as
it was after any event still kept: the last event of each entity is its record then;
``node.removed``, ``node.deregistered`` and ``node.expired`` delete the node.

What the log does not hold, and so a snapshot shows differently from the live API at
that moment:

* node ``usage`` and ``last_heartbeat_ms`` are as of the node's last event (heartbeats
  change memory only, never the store);
* a command payload above 1 KiB is left out of its events
  (``codec.protowire.EVENT_PAYLOAD_LIMIT``); :attr:`Snapshot.slim_payloads` names those
  commands and the caller may fill the payload in from the stored record (a spec never
  changes);
* finished commands dropped after ``commands.final_retention`` leave no event, so they
  still show, in their final state.

A log pruned by retention cannot be folded: :class:`EventLogPruned` names the oldest kept
index.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from nexus_fast.pb import fabric_pb2 as pb

NODE_GONE: Final = frozenset({"node.removed", "node.deregistered", "node.expired"})
"""Node event types after which the node is no longer in the registry."""


class ReplayError(Exception):
    """The state asked for cannot be rebuilt; the message says why."""


class EventLogPruned(ReplayError):
    """Events before ``oldest`` were pruned: the fold has no starting point."""

    def __init__(self, oldest: int) -> None:
        self.oldest = oldest
        super().__init__(
            f"the event log was pruned: the oldest event kept is {oldest}, and a replay needs "
            f"every event from 1 (raise events.retention_count / retention_age to keep them)"
        )


@dataclass
class Snapshot:
    """The fabric right after event :attr:`index` (read-only once built)."""

    index: int = 0
    time_ms: int = 0
    nodes: dict[str, pb.Node] = field(default_factory=dict)
    commands: dict[str, pb.CommandRecord] = field(default_factory=dict)
    agents: dict[str, pb.Agent] = field(default_factory=dict)
    slim_payloads: set[str] = field(default_factory=set)
    """Commands whose events left the payload out (above 1 KiB)."""

    def apply(self, index: int, body: bytes) -> pb.Event:
        """Fold one stored event (``index``, serialized ``pb.Event``) into the state."""
        event = pb.Event.FromString(body)
        topic, key = event.topic, event.key
        if topic == "node":
            if event.type in NODE_GONE:
                self.nodes.pop(key, None)
            else:
                self.nodes[key] = pb.Node.FromString(event.payload)
        elif topic == "command":
            record = pb.CommandRecord.FromString(event.payload)
            self.commands[key] = record
            if record.spec.payload:
                self.slim_payloads.discard(key)
            else:
                self.slim_payloads.add(key)
        elif topic == "agent":
            self.agents[key] = pb.Agent.FromString(event.payload)
        self.index = index
        self.time_ms = event.time_ms
        return event


def fold(
    events: Iterable[tuple[int, bytes]],
    until_index: int | None = None,
    until_time_ms: int | None = None,
) -> Snapshot:
    """The state after event ``until_index``, or after the last event in index order
    whose time is <= ``until_time_ms`` (the fold stops at the first later one).

    ``events`` are ``(index, body)`` pairs in index order, from the oldest kept. Raises
    :class:`EventLogPruned` when the oldest is not 1, and :class:`ReplayError` when
    ``until_index`` is past the newest event.
    """
    snapshot = Snapshot()
    expected = 1
    for index, body in events:
        if index != expected:
            if expected == 1:
                raise EventLogPruned(index)
            raise ReplayError(f"the event log has a gap: event {expected} is missing")
        if until_index is not None and index > until_index:
            break
        if until_time_ms is not None and pb.Event.FromString(body).time_ms > until_time_ms:
            break
        snapshot.apply(index, body)
        expected += 1
    if until_index is not None and snapshot.index < until_index:
        raise ReplayError(
            f"event {until_index} does not exist: the log ends at {snapshot.index}"
            if snapshot.index or expected > 1
            else f"event {until_index} does not exist: the log is empty"
        )
    return snapshot
