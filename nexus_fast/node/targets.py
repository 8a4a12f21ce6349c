"""Several server addresses for one client, and moving between them when one fails.

With replicas (docs/cluster.md) any replica accepts node streams and operator calls, but
a replica can be dead or restarting, and while no leader is elected calls answer
``UNAVAILABLE``, possibly naming the leader in the trailing metadata ``nexus-leader``.
``nexus-node``, ``nexusctl`` and ``nexus-bench`` all take a list of targets
(``h1:p1,h2:p2`` or the flag repeated) and use one :class:`TargetList` per connection:

- ``current``: where to connect now;
- ``next(leader)``: after a failure, the leader named by the server when there is one,
  else the next target round robin, with the delay to wait first: full jitter, growing
  exponentially with each full round of failures and capped, so a client never loops hot
  and many clients do not move in step;
- ``ok()``: the current target answered; the backoff starts over.

Only ``UNAVAILABLE`` (the server is down, restarting, unreachable or has no leader) moves
a client on: every other status is the server's answer and is the same everywhere.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any, Final

import grpc

__all__ = [
    "LEADER_METADATA",
    "MAX_TARGETS",
    "TargetList",
    "fails_over",
    "leader_hint",
    "parse_targets",
    "spread_order",
]

LEADER_METADATA: Final = "nexus-leader"  # trailing metadata: the leader's host:port
MAX_TARGETS: Final = 64  # given plus learned from leader hints
BACKOFF_BASE_S: Final = 0.2
BACKOFF_CAP_S: Final = 10.0


def _check(target: str) -> str:
    host, sep, port = target.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]  # [::1]:50053
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"target must be HOST:PORT, got {target!r}")
    if any(c.isspace() for c in host):
        raise ValueError(f"target must be HOST:PORT, got {target!r}")
    return target


def parse_targets(values: str | Iterable[str]) -> list[str]:
    """``"h1:p1,h2:p2"`` or several such strings -> the targets in order, without repeats.

    Raises ``ValueError`` naming the bad entry (empty list, no port, port out of range).
    """
    if isinstance(values, str):
        values = [values]
    out: list[str] = []
    for value in values:
        for part in value.split(","):
            part = part.strip()
            if not part:
                continue
            if _check(part) not in out:
                out.append(part)
    if not out:
        raise ValueError("no target given (expected HOST:PORT[,HOST:PORT...])")
    if len(out) > MAX_TARGETS:
        raise ValueError(f"at most {MAX_TARGETS} targets, got {len(out)}")
    return out


def spread_order(targets: Sequence[str], i: int) -> list[str]:
    """The order in which client ``i`` of many tries ``targets``: it starts on target
    ``i mod n``, and the clients that start on the same target go on to different ones
    (the others rotated by ``i div n``), so those of a dead target spread over the rest
    instead of all landing on its neighbour."""
    n = len(targets)
    if n < 2:
        return list(targets)
    first = i % n
    others = [targets[(first + 1 + k) % n] for k in range(n - 1)]
    shift = (i // n) % (n - 1)
    return [targets[first], *others[shift:], *others[:shift]]


def fails_over(code: grpc.StatusCode | None) -> bool:
    """True when a call or stream that ended with ``code`` should try another target."""
    return bool(code == grpc.StatusCode.UNAVAILABLE)


def leader_hint(metadata: Any) -> str | None:
    """The ``nexus-leader`` value of trailing metadata (pairs or ``grpc.aio.Metadata``),
    when it is a valid ``host:port``; else None."""
    if not metadata:
        return None
    for key, value in metadata:
        if key == LEADER_METADATA:
            text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
            try:
                return _check(text.strip())
            except ValueError:
                return None
    return None


class TargetList:
    """The targets of one connection: the current one, where to go after a failure."""

    __slots__ = ("_base", "_cap", "_index", "_rng", "failovers", "failures", "targets")

    def __init__(
        self,
        targets: Sequence[str],
        *,
        start: int = 0,
        base: float = BACKOFF_BASE_S,
        cap: float = BACKOFF_CAP_S,
        rng: random.Random | None = None,
    ) -> None:
        if not targets:
            raise ValueError("a TargetList needs at least one target")
        self.targets = list(targets)
        self._index = start % len(self.targets)
        self._base = base
        self._cap = cap
        self._rng = rng or random.Random()
        self.failures = 0  # consecutive failures since the last ok()
        self.failovers = 0  # moves to another target, ever

    @property
    def current(self) -> str:
        """The target to use now."""
        return self.targets[self._index]

    def ok(self) -> None:
        """The current target answered: the next failure starts a fresh backoff."""
        self.failures = 0

    def delay(self) -> float:
        """The wait before the next attempt, for ``failures`` so far: full jitter over
        ``base * 2**rounds`` (rounds = completed passes over every target), capped."""
        rounds = max(self.failures - 1, 0) // len(self.targets)
        ceiling = min(self._cap, self._base * 2.0 ** min(rounds, 62))
        return self._rng.uniform(0.0, ceiling)

    def next(self, leader: str | None = None) -> float:
        """Count a failure of the current target and move on; return the delay to wait.

        ``leader`` (from :func:`leader_hint`) is preferred when it is another target; one
        not in the list is added (up to :data:`MAX_TARGETS`). Otherwise round robin. With
        one target this is plain exponential backoff on that target.
        """
        self.failures += 1
        before = self._index
        if leader and leader != self.current:
            if leader not in self.targets and len(self.targets) < MAX_TARGETS:
                self.targets.append(leader)
            if leader in self.targets:
                self._index = self.targets.index(leader)
        if self._index == before:
            self._index = (self._index + 1) % len(self.targets)
        if self._index != before:
            self.failovers += 1
        return self.delay()

    def __repr__(self) -> str:
        return f"TargetList({self.targets!r}, current={self.current!r}, failures={self.failures})"
