"""Per-principal limits: request and byte rates, and caps on held resources.

A client may make the server hold only a bounded amount (issue 9, "Limits"):

* :class:`RateLimiter` is a token bucket per principal, kept as one number (GCRA, the
  "theoretical arrival time"): a check is O(1), allocation-free once the principal is known,
  and answers ``0.0`` (allowed) or the seconds to wait. Over any window of ``t`` seconds a
  principal is allowed at most ``burst + rate * t`` units (plus a thousandth of a unit
  of float slack).
* :class:`SlotLimiter` caps concurrently held things (gRPC streams, WebSocket connections)
  per principal AND in total, with per-principal caps strictly below the total, so one
  client holding its every slot leaves room for the others. A :class:`Slot` is released
  exactly once however it ends (``release()`` is idempotent, it is a context manager, and a
  slot dropped without release is reclaimed by the garbage collector with a warning).
* :class:`KeyedSlotLimiter` caps long-lived named things (registered nodes): the same key
  counts once however often it is acquired, and ``release(key)`` is idempotent.
* :class:`PrincipalLimits` bundles them as configured by ``[security.limits]``
  (:class:`LimitsConfig`).

Memory is bounded: rate state is kept for at most ``max_principals`` principals (least
recently seen evicted first), and a principal whose bucket has refilled is forgotten as
soon as it is the oldest entry, which loses nothing (a full bucket is the default). Slot
counters exist only for principals holding something. Everything here is meant for the
event loop thread: no locks.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from types import TracebackType
from typing import Any, Final

from nexus_fast.errors import ResourceExhausted
from nexus_fast.logs import get_logger
from nexus_fast.units import parse_size

log = get_logger("security.limits")

Clock = Callable[[], float]
"""Monotonic seconds; ``time.monotonic`` in production, a fake in tests."""

_MB: Final = 1 << 20
_EVICT_PER_CHECK: Final = 2  # idle entries dropped per check: amortised O(1), memory still shrinks


class RateLimited(ResourceExhausted):
    """A principal spent its request or byte budget; ``retry_after`` is in seconds.

    Maps to ``RESOURCE_EXHAUSTED`` with ``retry-after-ms``, HTTP 429, WebSocket close 4029.
    """

    def __init__(self, what: str, principal: str, retry_after: float) -> None:
        super().__init__(f"{what} rate limit exceeded for {principal!r}", retry_after)
        self.what = what
        self.principal = principal


class LimitExceeded(ResourceExhausted):
    """A cap on held resources (streams, connections, nodes) is reached.

    ``scope`` is ``"principal"`` when this principal holds its own cap, ``"total"`` when the
    server-wide cap is reached. Maps like :class:`RateLimited`.
    """

    def __init__(
        self, what: str, principal: str, limit: int, scope: str, retry_after: float = 1.0
    ) -> None:
        where = f"for {principal!r}" if scope == "principal" else "server-wide"
        super().__init__(f"too many {what} {where} (limit {limit})", retry_after)
        self.what = what
        self.principal = principal
        self.limit = limit
        self.scope = scope


def retry_after_ms(seconds: float) -> int:
    """``retry-after-ms`` value for a wait of ``seconds``: rounded up, at least 1 ms."""
    if math.isinf(seconds):
        return 2**31 - 1
    return max(1, math.ceil(seconds * 1000.0))


# --------------------------------------------------------------------------- config


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """``[security.limits]``: per-principal budgets and caps (0 rate = unlimited).

    ``requests_per_second``/``burst`` bound calls (one unit per RPC, stream message that
    mutates, WebSocket op or HTTP request); ``bytes_per_second``/``byte_burst`` bound bytes
    a principal asks the server to store. ``byte_burst`` should be at least
    ``server.max_message_size`` or one maximal message is never accepted. ``max_*`` cap
    what one principal holds at once; each must be below its ``total_*`` server-wide cap.
    ``max_principals`` bounds the rate state kept in memory.
    """

    enabled: bool = True
    requests_per_second: float = 1000.0
    burst: int = 2000
    bytes_per_second: int = 64 * _MB
    byte_burst: int = 128 * _MB
    max_streams: int = 64
    max_ws_connections: int = 64
    max_nodes: int = 10000
    total_streams: int = 10000
    total_ws_connections: int = 10000
    total_nodes: int = 100000
    max_principals: int = 100000

    def __post_init__(self) -> None:
        def need(ok: bool, key: str, expected: str) -> None:
            if not ok:
                value = getattr(self, key)
                raise ValueError(f"security.limits.{key} = {value!r}: expected {expected}")

        # bool is an int subclass: reject it where a number is meant.
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "enabled":
                need(isinstance(value, bool), f.name, "a boolean")
            elif f.name == "requests_per_second":
                need(
                    isinstance(value, int | float)
                    and not isinstance(value, bool)
                    and math.isfinite(value)
                    and value >= 0,
                    f.name,
                    "a finite number >= 0 (0 = unlimited)",
                )
            else:
                need(
                    isinstance(value, int) and not isinstance(value, bool) and value >= 0,
                    f.name,
                    "an integer >= 0",
                )
        need(self.requests_per_second == 0 or self.burst >= 1, "burst", "an integer >= 1")
        need(self.bytes_per_second == 0 or self.byte_burst >= 1, "byte_burst", "an integer >= 1")
        need(self.max_principals >= 1, "max_principals", "an integer >= 1")
        for per, total in (
            ("max_streams", "total_streams"),
            ("max_ws_connections", "total_ws_connections"),
            ("max_nodes", "total_nodes"),
        ):
            need(getattr(self, per) >= 1, per, "an integer >= 1")
            # Strictly below: one principal at its cap must leave room for everyone else.
            need(
                getattr(self, total) > getattr(self, per),
                total,
                f"an integer > security.limits.{per} ({getattr(self, per)})",
            )

    @classmethod
    def from_mapping(cls, table: Mapping[str, Any]) -> LimitsConfig:
        """Build from a parsed ``[security.limits]`` TOML table.

        Byte amounts accept sizes (``"64MB"``). Unknown keys and bad values raise
        ``ValueError`` naming the key.
        """
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(table) - known)
        if unknown:
            raise ValueError(f"unknown key security.limits.{unknown[0]}")
        values = dict(table)
        for key in ("bytes_per_second", "byte_burst"):
            if key in values and isinstance(values[key], str):
                try:
                    values[key] = parse_size(values[key])
                except (TypeError, ValueError) as exc:
                    raise ValueError(f"security.limits.{key}: {exc}") from None
        return cls(**values)


# --------------------------------------------------------------------------- rates


class RateLimiter:
    """Token bucket per principal: ``rate`` units per second, at most ``burst`` at once.

    State is the GCRA "theoretical arrival time" (TAT): the instant the bucket would be
    full again. A check of ``cost`` moves it ``cost / rate`` later when ``TAT + cost/rate -
    now <= burst/rate``, else refuses with that excess as the wait. A cost above ``burst``
    can never fit: its wait is ``inf`` (callers should answer it as too large, not retry).
    ``rate == 0`` disables the limiter.
    """

    __slots__ = (
        "_clock",
        "_emission",
        "_max_keys",
        "_slack",
        "_tat",
        "_tolerance",
        "burst",
        "rate",
    )

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: Clock = time.monotonic,
        max_keys: int = 100000,
    ) -> None:
        self._clock = clock
        # principal -> TAT; order = least recently checked first.
        self._tat: OrderedDict[str, float] = OrderedDict()
        self.reconfigure(rate, burst, max_keys)

    def reconfigure(self, rate: float, burst: float, max_keys: int) -> None:
        """New rate, burst and key bound (hot reload).

        Each principal keeps the units it owes, now repaid at the new rate.
        """
        if rate < 0 or not math.isfinite(rate):
            raise ValueError("rate must be a finite number >= 0")
        if rate > 0 and burst <= 0:
            raise ValueError("burst must be > 0")
        if max_keys < 1:
            raise ValueError("max_keys must be >= 1")
        old_rate = getattr(self, "rate", 0.0)
        if not rate:
            self._tat.clear()
        elif old_rate and rate != old_rate:
            now = self._clock()
            scale = old_rate / rate
            for principal, tat in self._tat.items():
                if tat > now:
                    self._tat[principal] = now + (tat - now) * scale
        self.rate = float(rate)
        self.burst = float(burst)
        self._max_keys = max_keys
        self._emission = 1.0 / rate if rate else 0.0  # seconds one unit occupies
        self._tolerance = burst / rate if rate else 0.0  # seconds of credit = the burst
        # Float sums of 1/rate drift by ulps (~1e-10 s at monotonic ~1e6 s); without slack an
        # exact burst could be refused by 1e-13 s. A thousandth of a unit is the price.
        self._slack = self._emission * 1e-3 + 1e-9 if rate else 0.0

    def check(self, principal: str, cost: float = 1.0) -> float:
        """Spend ``cost`` units of ``principal``'s budget: ``0.0`` if allowed, else seconds to wait.

        A refused check spends nothing. A negative cost is a caller bug (it would refill).
        """
        if cost < 0:
            raise ValueError("cost must be >= 0")
        if not self.rate:
            return 0.0
        now = self._clock()
        tat_map = self._tat
        tat = tat_map.get(principal)
        if tat is None:
            self._evict(now)
            tat = now
        elif tat < now:
            tat = now  # refilled past full: credit never exceeds the burst
        new_tat = tat + cost * self._emission
        excess = new_tat - now - self._tolerance
        if excess > self._slack:
            if cost > self.burst:
                return math.inf
            if principal in tat_map:
                tat_map.move_to_end(principal)
            return excess
        tat_map[principal] = new_tat
        tat_map.move_to_end(principal)
        return 0.0

    def available(self, principal: str) -> float:
        """Units ``principal`` could spend now (``burst`` when unknown); does not spend."""
        if not self.rate:
            return math.inf
        tat = self._tat.get(principal)
        now = self._clock()
        if tat is None or tat <= now:
            return self.burst
        return max(0.0, (self._tolerance - (tat - now)) * self.rate)

    def forget(self, principal: str) -> None:
        """Drop ``principal``'s state (its bucket becomes full)."""
        self._tat.pop(principal, None)

    def __len__(self) -> int:
        """Principals with state held (bounded by ``max_keys``)."""
        return len(self._tat)

    def _evict(self, now: float) -> None:
        """Before adding a key: drop refilled oldest entries, and the LRU one when at the cap."""
        tat_map = self._tat
        for _ in range(_EVICT_PER_CHECK):
            if not tat_map:
                return
            oldest = next(iter(tat_map))
            if tat_map[oldest] > now:
                break
            del tat_map[oldest]  # full again: forgetting it changes nothing
        if len(tat_map) >= self._max_keys:
            # Lossy: that principal gets a full bucket next time. Only many distinct
            # principals can cause it, and it only ever errs towards allowing.
            tat_map.popitem(last=False)


# --------------------------------------------------------------------------- slots


class Slot:
    """One held unit of a :class:`SlotLimiter`; release it exactly once (idempotent).

    Use as a context manager or call :meth:`release` from the connection's cleanup. A slot
    garbage-collected while held is released then, and logged as a leak.
    """

    __slots__ = ("_limiter", "principal")

    def __init__(self, limiter: SlotLimiter, principal: str) -> None:
        self._limiter: SlotLimiter | None = limiter
        self.principal = principal

    @property
    def held(self) -> bool:
        """True until released."""
        return self._limiter is not None

    def release(self) -> None:
        """Give the slot back; later calls do nothing."""
        limiter, self._limiter = self._limiter, None
        if limiter is not None:
            limiter._release(self.principal)

    def __enter__(self) -> Slot:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __del__(self) -> None:
        limiter = getattr(self, "_limiter", None)
        if limiter is not None:
            log.warning("%s slot of %r was never released; reclaimed", limiter.what, self.principal)
            self.release()


class _Caps:
    """What both slot limiters are configured with: a name, a per-principal and a total cap."""

    __slots__ = ("per_principal", "total", "what")

    def __init__(self, what: str, per_principal: int, total: int) -> None:
        self.what = what
        self.reconfigure(per_principal, total)

    def reconfigure(self, per_principal: int, total: int) -> None:
        """New caps; whoever holds more than them keeps it, but acquires nothing more."""
        if per_principal < 1 or total <= per_principal:
            raise ValueError("need 1 <= per_principal < total")
        self.per_principal = per_principal
        self.total = total


class SlotLimiter(_Caps):
    """At most ``per_principal`` slots per principal and ``total`` overall (``total > per``)."""

    __slots__ = ("_counts", "_held")

    def __init__(self, what: str, per_principal: int, total: int) -> None:
        super().__init__(what, per_principal, total)
        self._counts: dict[str, int] = {}  # only principals holding >= 1 slot
        self._held = 0

    def acquire(self, principal: str) -> Slot:
        """Take a slot for ``principal`` or raise :class:`LimitExceeded`."""
        n = self._counts.get(principal, 0)
        if n >= self.per_principal:
            raise LimitExceeded(self.what, principal, self.per_principal, "principal")
        if self._held >= self.total:
            raise LimitExceeded(self.what, principal, self.total, "total")
        self._counts[principal] = n + 1
        self._held += 1
        return Slot(self, principal)

    def held(self, principal: str | None = None) -> int:
        """Slots held by ``principal``, or by everyone when ``None``."""
        if principal is None:
            return self._held
        return self._counts.get(principal, 0)

    def _release(self, principal: str) -> None:
        n = self._counts.get(principal, 0)
        if n <= 0:  # cannot happen through Slot; never let the counters go negative
            return
        if n == 1:
            del self._counts[principal]
        else:
            self._counts[principal] = n - 1
        self._held -= 1


class KeyedSlotLimiter(_Caps):
    """Caps named, long-lived things (registered nodes) per principal and in total.

    ``acquire(principal, key)`` is idempotent for a key the principal already holds; a key
    held by another principal moves to the new one if it has room (a node re-registered by
    a different identity). ``release(key)`` is idempotent.
    """

    __slots__ = ("_counts", "_owner")

    def __init__(self, what: str, per_principal: int, total: int) -> None:
        super().__init__(what, per_principal, total)
        self._owner: dict[str, str] = {}  # key -> principal
        self._counts: dict[str, int] = {}  # principal -> keys held (>= 1)

    def acquire(self, principal: str, key: str) -> None:
        """Record ``key`` as held by ``principal`` or raise :class:`LimitExceeded`."""
        owner = self._owner.get(key)
        if owner == principal:
            return
        if self._counts.get(principal, 0) >= self.per_principal:
            raise LimitExceeded(self.what, principal, self.per_principal, "principal")
        if owner is None and len(self._owner) >= self.total:
            raise LimitExceeded(self.what, principal, self.total, "total")
        if owner is not None:
            self._dec(owner)
        self._owner[key] = principal
        self._counts[principal] = self._counts.get(principal, 0) + 1

    def release(self, key: str) -> None:
        """Forget ``key``; nothing happens when it is not held."""
        owner = self._owner.pop(key, None)
        if owner is not None:
            self._dec(owner)

    def owner(self, key: str) -> str | None:
        """The principal holding ``key``, if any."""
        return self._owner.get(key)

    def held(self, principal: str | None = None) -> int:
        """Keys held by ``principal``, or by everyone when ``None``."""
        if principal is None:
            return len(self._owner)
        return self._counts.get(principal, 0)

    def _dec(self, principal: str) -> None:
        n = self._counts[principal]
        if n == 1:
            del self._counts[principal]
        else:
            self._counts[principal] = n - 1


# --------------------------------------------------------------------------- bundle


class PrincipalLimits:
    """Every limit of ``[security.limits]`` for the API adapters; one instance per server.

    ``check_request`` / ``check_bytes`` raise :class:`RateLimited`; ``stream`` /
    ``ws_connection`` return a :class:`Slot`; ``register_node`` / ``deregister_node`` track
    nodes. With ``enabled = false`` rates are unlimited and caps use the totals only.
    """

    __slots__ = ("bytes", "config", "nodes", "requests", "streams", "ws_connections")

    def __init__(self, config: LimitsConfig, clock: Clock = time.monotonic) -> None:
        self.config = config
        self.requests = RateLimiter(0.0, 1, clock, config.max_principals)
        self.bytes = RateLimiter(0.0, 1, clock, config.max_principals)
        self.streams = SlotLimiter("streams", 1, 2)
        self.ws_connections = SlotLimiter("WebSocket connections", 1, 2)
        self.nodes = KeyedSlotLimiter("registered nodes", 1, 2)
        self.reconfigure(config)

    def reconfigure(self, config: LimitsConfig) -> None:
        """Apply ``config`` to every limiter, keeping what principals hold (hot reload)."""
        self.config = config
        on = config.enabled
        rps = config.requests_per_second if on else 0.0
        self.requests.reconfigure(rps, config.burst, config.max_principals)
        bps = config.bytes_per_second if on else 0.0
        self.bytes.reconfigure(bps, config.byte_burst, config.max_principals)

        def per(cap: int, total: int) -> int:
            return cap if on else total - 1

        self.streams.reconfigure(
            per(config.max_streams, config.total_streams), config.total_streams
        )
        self.ws_connections.reconfigure(
            per(config.max_ws_connections, config.total_ws_connections),
            config.total_ws_connections,
        )
        self.nodes.reconfigure(per(config.max_nodes, config.total_nodes), config.total_nodes)

    def check_request(self, principal: str, cost: float = 1.0) -> None:
        """Spend request budget or raise :class:`RateLimited`."""
        wait = self.requests.check(principal, cost)
        if wait:
            raise RateLimited("request", principal, wait)

    def check_bytes(self, principal: str, size: int) -> None:
        """Spend ``size`` bytes of write budget or raise :class:`RateLimited`.

        A write larger than ``byte_burst`` can never fit: :class:`LimitExceeded`.
        """
        wait = self.bytes.check(principal, float(size))
        if wait:
            if wait == math.inf:
                # Waiting never helps; a finite hint keeps int(retry_after * 1000) safe.
                raise LimitExceeded(
                    f"bytes in one write ({size})",
                    principal,
                    int(self.bytes.burst),
                    "principal",
                    retry_after=60.0,
                )
            raise RateLimited("write bytes", principal, wait)

    def stream(self, principal: str) -> Slot:
        """Hold one stream slot (release it when the stream ends)."""
        return self.streams.acquire(principal)

    def ws_connection(self, principal: str) -> Slot:
        """Hold one WebSocket connection slot (release it on close)."""
        return self.ws_connections.acquire(principal)

    def register_node(self, principal: str, node_id: str) -> None:
        """Count ``node_id`` against ``principal`` (idempotent) or raise :class:`LimitExceeded`."""
        self.nodes.acquire(principal, node_id)

    def deregister_node(self, node_id: str) -> None:
        """Stop counting ``node_id`` (idempotent)."""
        self.nodes.release(node_id)


class NodeSlotRelease:
    """Registry listener that stops counting a node once it is gone.

    Appended to ``NodeRegistry.listeners``: a node that is deregistered, removed by an
    operator or expired after ``node_down_retention`` frees its principal's node slot, so
    a slot is never held for a node that no longer exists.
    """

    __slots__ = ("_limits",)

    def __init__(self, limits: PrincipalLimits) -> None:
        self._limits = limits

    def node_updated(self, node: Any) -> None:
        """Not needed: slots follow registration, not status."""

    def node_usage(self, node: Any) -> None:
        """Not needed (hot path: does nothing)."""

    def node_removed(self, node: Any) -> None:
        """Release the slot of ``node.id`` (idempotent)."""
        self._limits.deregister_node(node.id)

    def session_opened(self, node: Any, session: Any) -> None:
        """Not needed: streams hold their own slots."""
