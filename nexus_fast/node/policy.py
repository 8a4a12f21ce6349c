"""A node's pure decisions, testable without sockets: backoff, heartbeat jitter, what to do
when a stream ends, the de-duplication cache and the simulated usage model."""

from __future__ import annotations

import json
import random
from collections import OrderedDict
from collections.abc import Mapping
from enum import Enum

import grpc

from nexus_fast.node.spec import RESOURCE_KEYS

BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 10.0
HEARTBEAT_JITTER = 0.10
DEFAULT_DEDUP_SIZE = 100_000


def backoff_delay(
    attempt: int,
    *,
    base: float = BACKOFF_BASE_S,
    cap: float = BACKOFF_CAP_S,
    rng: random.Random | None = None,
) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt))."""
    ceiling = min(cap, base * 2.0 ** min(max(attempt, 0), 62))
    return (rng or random).uniform(0.0, ceiling)


def jittered(interval: float, rng: random.Random | None = None) -> float:
    """``interval`` with +-10% jitter, so heartbeats of many nodes drift apart."""
    return interval * (rng or random).uniform(1.0 - HEARTBEAT_JITTER, 1.0 + HEARTBEAT_JITTER)


class DedupCache:
    """Bounded LRU of finished command results, keyed per node and command id.

    A redelivered command finds its stored result here and is answered without running again.
    The value is ``(success, output, error, attempt)``: a failed attempt is run again when
    the core retries it on this node with a higher attempt number.
    """

    __slots__ = ("_data", "capacity", "evictions")

    def __init__(self, capacity: int = DEFAULT_DEDUP_SIZE) -> None:
        if capacity < 1:
            raise ValueError("dedup capacity must be >= 1")
        self.capacity = capacity
        self.evictions = 0
        self._data: OrderedDict[str, tuple[bool, bytes, str, int]] = OrderedDict()

    @staticmethod
    def key(node_id: str, command_id: str) -> str:
        """One flat string key: cheaper than a tuple at 100k entries."""
        return f"{node_id}\x00{command_id}"

    def get(self, key: str) -> tuple[bool, bytes, str, int] | None:
        """Return the stored ``(success, output, error, attempt)`` and mark it recently used."""
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: str, value: tuple[bool, bytes, str, int]) -> None:
        """Store a result, evicting the least recently used entry beyond capacity."""
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)
            self.evictions += 1

    def __contains__(self, key: object) -> bool:
        return key in self._data

    def items(self) -> list[tuple[str, tuple[bool, bytes, str, int]]]:
        """Every ``(key, value)``, least recently used first (for a durable copy)."""
        return list(self._data.items())

    def __len__(self) -> int:
        return len(self._data)


def simulate_usage(
    capacity: Mapping[str, float], base: Mapping[str, float], running: int, agents: int
) -> dict[str, float]:
    """Plausible usage: a per-node base load plus running commands' and agents' share.

    Every value is clamped to ``[0, capacity]``. Each running command takes 5% of cpu and
    memory, each running agent 10% plus one GPU (if any) and 1% of disk.
    """
    share = 0.05 * max(running, 0) + 0.10 * max(agents, 0)
    out: dict[str, float] = {}
    for key in RESOURCE_KEYS:
        cap = max(float(capacity.get(key, 0.0)), 0.0)
        if key == "gpu":
            used = float(max(agents, 0))
        elif key == "disk":
            used = (base.get(key, 0.0) + 0.01 * max(agents, 0)) * cap
        else:
            used = (base.get(key, 0.0) + share) * cap
        out[key] = min(cap, max(0.0, used))
    return out


def agent_id_from_payload(payload: bytes, fallback: str) -> str:
    """Pull the agent id out of a command payload, tolerating non-JSON and odd shapes."""
    try:
        doc = json.loads(payload) if payload else None
    except (ValueError, UnicodeDecodeError):
        text = payload.decode("utf-8", "replace").strip()
        return text[:256] or fallback
    if isinstance(doc, dict):
        for key in ("agent_id", "agentId", "id", "name"):
            value = doc.get(key)
            if isinstance(value, str | int) and not isinstance(value, bool) and str(value):
                return str(value)
    elif isinstance(doc, str | int) and not isinstance(doc, bool) and str(doc):
        return str(doc)
    return fallback


class Action(Enum):
    """What a node does after its Connect stream ends."""

    RECONNECT = "reconnect"  # same epoch, after backoff
    FAILOVER = "failover"  # same epoch, to the next target (UNAVAILABLE: down or no leader)
    REREGISTER = "reregister"  # new epoch via Register, then Connect
    SUPERSEDED = "superseded"  # another session owns this node id: stop, don't fight
    FATAL = "fatal"  # the server rejects this node outright


def classify_stream_end(code: grpc.StatusCode, details: str | None) -> Action:
    """Map a Connect stream's final status to the node's next step (see the proto contract)."""
    if code in (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND):
        return Action.REREGISTER
    if code == grpc.StatusCode.ABORTED and "superseded" in (details or "").lower():
        return Action.SUPERSEDED
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED):
        return Action.FATAL
    return Action.RECONNECT  # OK (clean shutdown), UNAVAILABLE, CANCELLED, INTERNAL, ...


def register_error_is_fatal(code: grpc.StatusCode) -> bool:
    """INVALID_ARGUMENT (bad node data) or UNIMPLEMENTED (not a nexus server) never heal."""
    return code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNIMPLEMENTED)
