"""nexus-node: the reference node proxy for nexus_fast.

One process simulates a fleet of N nodes against a nexus_fast server. Each simulated node
registers over gRPC, holds one ``NodeService.Connect`` stream, heartbeats at the
server-advised interval, acks and "executes" commands (sleeping a simulated duration),
reports agents, and reconnects / re-registers on its own when the stream breaks.

Layout: pure helpers (parsing, backoff, de-dup cache, usage model, status formatting) at
the top so they can be unit tested without sockets; then ``NodeSim`` (one per node) and
``Fleet`` (channels, status, shutdown); then ``run_fleet`` / ``main``.

Run ``nexus-node --help`` for the CLI and the ``--spec`` file format.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import math
import os
import random
import re
import signal
import socket
import sys
import time
import tomllib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import IO, Any

import grpc
import grpc.aio

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

log = logging.getLogger("nexus_fast.node_proxy")

# ---------------------------------------------------------------- constants

RESOURCE_KEYS = ("cpu", "memory", "gpu", "disk")
GIB = 1024**3
DEFAULT_CAPACITY: dict[str, float] = {
    "cpu": 8.0,
    "memory": float(32 * GIB),
    "gpu": 0.0,
    "disk": float(100 * GIB),
}
NODES_PER_CHANNEL = 250
DEFAULT_NODES = 10
BACKOFF_BASE_S = 0.2
BACKOFF_CAP_S = 10.0
DEFAULT_HEARTBEAT_S = 5.0  # used until the server advises an interval
MIN_HEARTBEAT_S = 0.05  # guards against a zero/absurd server value turning into a busy loop
HEARTBEAT_JITTER = 0.10
COALESCE_S = 0.002  # acks/results produced within this window share one NodeMessage
OUTBOX_LIMIT = 4096  # per node: pending acks+results before we stop reading commands
MAX_RUNNING = 4096  # per node: concurrent simulated executions before we stop reading
DEFAULT_MAX_BATCH = 1000  # items of one kind per NodeMessage unless the server says otherwise
REGISTER_CONCURRENCY = 64  # in-flight Register RPCs per process, so restarts don't stampede
DEREGISTER_CONCURRENCY = 128
RPC_TIMEOUT_S = 10.0
DEREGISTER_TIMEOUT_S = 5.0
STOPPED_AGENTS_KEPT = 256  # per node: stopped agents remembered (and re-reported on reconnect)
AGENT_KINDS = frozenset({"agent.start", "agent.stop"})
LOG_SUPPRESS_S = 5.0  # identical warnings are logged at most once per this window
RECORD_FLUSH_S = 0.2
DEFAULT_DEDUP_SIZE = 100_000

try:
    from importlib.metadata import PackageNotFoundError, version

    try:
        VERSION = version("nexus_fast")
    except PackageNotFoundError:
        VERSION = "dev"
except ImportError:  # pragma: no cover
    VERSION = "dev"

# ---------------------------------------------------------------- parsing

_SIZE_RE = re.compile(r"^([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([kmgtpe]?)(i?)(b?)$", re.I)
_SIZE_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}


def parse_size(text: str | int | float) -> float:
    """Parse a byte size: ``512MB``, ``32GB``, ``1.5GiB``, ``100`` (bytes).

    Units are binary (1KB = 1KiB = 1024 bytes); the trailing ``B`` and the ``i`` are
    optional and case is ignored.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid size {text!r}")
    if isinstance(text, int | float):
        value = float(text)
    else:
        m = _SIZE_RE.match(text.strip())
        if not m or (m.group(3) and not m.group(2)):
            raise ValueError(f"invalid size {text!r} (examples: 512MB, 32GB, 1.5TiB, 1024)")
        value = float(m.group(1)) * 1024 ** _SIZE_POWERS[m.group(2).lower()]
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid size {text!r}: must be a finite non-negative number")
    return float(round(value))


def parse_cpu(text: str | int | float) -> float:
    """Parse a CPU amount in cores: ``8``, ``0.5`` or millicores ``500m``."""
    if isinstance(text, bool):
        raise ValueError(f"invalid cpu {text!r}")
    try:
        if isinstance(text, str) and text.strip().lower().endswith("m"):
            value = float(text.strip()[:-1]) / 1000.0
        else:
            value = float(text)
    except ValueError:
        raise ValueError(f"invalid cpu {text!r} (examples: 8, 0.5, 500m)") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid cpu {text!r}: must be a finite non-negative number")
    return value


def _parse_count(text: str | int | float) -> float:
    if isinstance(text, bool):
        raise ValueError(f"invalid gpu count {text!r}")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"invalid gpu count {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"invalid gpu count {text!r}: must be a finite non-negative number")
    return value


_RESOURCE_PARSERS = {
    "cpu": parse_cpu,
    "memory": parse_size,
    "gpu": _parse_count,
    "disk": parse_size,
}


def parse_resource(key: str, value: str | int | float) -> float:
    """Parse one capacity value for ``key`` (cpu, memory, gpu or disk)."""
    parser = _RESOURCE_PARSERS.get(key)
    if parser is None:
        raise ValueError(f"unknown resource {key!r} (expected one of {', '.join(RESOURCE_KEYS)})")
    return parser(value)


def merge_capacity(
    base: Mapping[str, float], overrides: Mapping[str, str | int | float]
) -> dict[str, float]:
    """Return ``base`` with the parsed ``overrides`` applied (keys validated)."""
    out = dict(base)
    for key, raw in overrides.items():
        out[key.strip()] = parse_resource(key.strip(), raw)
    return out


def parse_capacity(text: str, base: Mapping[str, float] = DEFAULT_CAPACITY) -> dict[str, float]:
    """Parse ``cpu=8,memory=32GB,gpu=0,disk=100GB``; keys not given keep ``base`` values."""
    return merge_capacity(base, _parse_pairs(text, what="capacity"))


def _parse_pairs(text: str, *, what: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"invalid {what} entry {item!r} (expected key=value)")
        out[key] = value.strip()
    return out


def parse_labels(text: str) -> dict[str, str | list[str]]:
    """Parse ``zone=a,tier=gpu``. A value ``a|b|c`` cycles across nodes (see --help)."""
    out: dict[str, str | list[str]] = {}
    for key, value in _parse_pairs(text, what="label").items():
        out[key] = value.split("|") if "|" in value else value
    return out


def parse_exec_duration(text: str) -> tuple[float, float]:
    """Parse ``0.01`` or a range ``0.01-0.05`` (seconds) into ``(low, high)``."""
    lo_text, sep, hi_text = text.strip().partition("-")
    try:
        lo = float(lo_text)
        hi = float(hi_text) if sep else lo
    except ValueError:
        raise ValueError(f"invalid duration {text!r} (examples: 0.01, 0.01-0.05)") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < 0 or hi < lo:
        raise ValueError(f"invalid duration {text!r}: need 0 <= low <= high")
    return lo, hi


# ---------------------------------------------------------------- node specs


@dataclass(frozen=True, slots=True)
class NodeSpec:
    """Static description of one simulated node."""

    node_id: str
    index: int
    labels: dict[str, str]
    capacity: dict[str, float]


_GROUP_KEYS = {"count", "labels", "capacity", "id_prefix"}


def build_node_specs(
    groups: Sequence[Mapping[str, Any]],
    *,
    id_prefix: str = "node-",
    base_labels: Mapping[str, Any] | None = None,
    base_capacity: Mapping[str, float] = DEFAULT_CAPACITY,
) -> list[NodeSpec]:
    """Expand node groups into per-node specs.

    Each group: ``count`` (required), optional ``labels``, ``capacity`` and ``id_prefix``.
    Group labels/capacity override ``base_labels``/``base_capacity``. A label value may be a
    template (``{i}`` fleet index, ``{g}`` index in the group, ``{id}`` node id) or a list
    that cycles by index in the group. Ids are ``prefix`` + a zero-padded counter per prefix.
    """
    parsed: list[tuple[int, str, dict[str, Any], dict[str, float]]] = []
    totals: dict[str, int] = {}
    for n, group in enumerate(groups, 1):
        where = f"group {n}"
        if not isinstance(group, Mapping):
            raise ValueError(f"{where}: expected a table/object, got {type(group).__name__}")
        unknown = set(group) - _GROUP_KEYS
        if unknown:
            raise ValueError(
                f"{where}: unknown key(s) {sorted(unknown)}; allowed {sorted(_GROUP_KEYS)}"
            )
        count = group.get("count")
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise ValueError(f"{where}: 'count' must be a non-negative integer")
        prefix = group.get("id_prefix", id_prefix)
        if not isinstance(prefix, str):
            raise ValueError(f"{where}: 'id_prefix' must be a string")
        labels = dict(base_labels or {})
        group_labels = group.get("labels", {})
        cap_over = group.get("capacity", {})
        if not isinstance(group_labels, Mapping) or not isinstance(cap_over, Mapping):
            raise ValueError(f"{where}: 'labels' and 'capacity' must be tables/objects")
        labels.update(group_labels)
        for key, value in labels.items():
            ok = isinstance(value, str) or (
                isinstance(value, list) and value and all(isinstance(v, str) for v in value)
            )
            if not ok:
                raise ValueError(
                    f"{where}: label {key!r} must be a string or non-empty string list"
                )
        try:
            capacity = merge_capacity(base_capacity, cap_over)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        parsed.append((count, prefix, labels, capacity))
        totals[prefix] = totals.get(prefix, 0) + count

    specs: list[NodeSpec] = []
    counters = dict.fromkeys(totals, 0)
    seen: set[str] = set()
    for n, (count, prefix, labels, capacity) in enumerate(parsed, 1):
        width = max(5, len(str(max(totals[prefix] - 1, 0))))
        for g in range(count):
            node_id = f"{prefix}{counters[prefix]:0{width}d}"
            counters[prefix] += 1
            if node_id in seen:
                raise ValueError(f"group {n}: duplicate node id {node_id!r}")
            seen.add(node_id)
            index = len(specs)
            values = {"i": index, "g": g, "id": node_id}
            node_labels: dict[str, str] = {}
            for key, value in labels.items():
                raw = value[g % len(value)] if isinstance(value, list) else value
                try:
                    node_labels[key] = raw.format_map(values)
                except (KeyError, ValueError, IndexError, AttributeError) as exc:
                    raise ValueError(
                        f"group {n}: bad label template {key}={raw!r}: {exc}"
                    ) from None
            specs.append(NodeSpec(node_id, index, node_labels, capacity))
    return specs


def load_spec_groups(path: str) -> list[dict[str, Any]]:
    """Read node groups from a TOML (``[[groups]]``) or JSON (list or ``{"groups": []}``) file."""
    with open(path, "rb") as fp:
        data = fp.read()
    doc: Any
    if path.lower().endswith(".json"):
        doc = json.loads(data)
    elif path.lower().endswith(".toml"):
        doc = tomllib.loads(data.decode())
    else:  # unknown extension: JSON first (it is stricter), then TOML
        try:
            doc = json.loads(data)
        except ValueError:
            doc = tomllib.loads(data.decode())
    groups = doc.get("groups") if isinstance(doc, dict) else doc
    if not isinstance(groups, list) or not groups:
        raise ValueError("spec must contain a non-empty list of groups ('groups')")
    return groups


# ---------------------------------------------------------------- small pure helpers


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
    """

    __slots__ = ("_data", "capacity", "evictions")

    def __init__(self, capacity: int = DEFAULT_DEDUP_SIZE) -> None:
        if capacity < 1:
            raise ValueError("dedup capacity must be >= 1")
        self.capacity = capacity
        self.evictions = 0
        self._data: OrderedDict[str, tuple[bool, bytes, str]] = OrderedDict()

    @staticmethod
    def key(node_id: str, command_id: str) -> str:
        """One flat string key: cheaper than a tuple at 100k entries."""
        return f"{node_id}\x00{command_id}"

    def get(self, key: str) -> tuple[bool, bytes, str] | None:
        """Return the stored ``(success, output, error)`` and mark it recently used."""
        value = self._data.get(key)
        if value is not None:
            self._data.move_to_end(key)
        return value

    def put(self, key: str, value: tuple[bool, bytes, str]) -> None:
        """Store a result, evicting the least recently used entry beyond capacity."""
        self._data[key] = value
        self._data.move_to_end(key)
        while len(self._data) > self.capacity:
            self._data.popitem(last=False)
            self.evictions += 1

    def __contains__(self, key: object) -> bool:
        return key in self._data

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


# ---------------------------------------------------------------- status


@dataclass(slots=True)
class Stats:
    """Monotonic fleet-wide counters."""

    registers: int = 0
    reregisters: int = 0
    reconnects: int = 0
    heartbeats: int = 0
    messages: int = 0
    acks: int = 0
    results: int = 0
    executed: int = 0
    failed: int = 0
    cancelled: int = 0
    duplicates: int = 0
    errors: int = 0


@dataclass(slots=True)
class StatusSnapshot:
    """Point-in-time view used to render a status line (rates come from two snapshots)."""

    elapsed: float
    cpu_seconds: float
    nodes: int
    connected: int
    registered: int
    draining: int = 0
    superseded: int = 0
    fatal: int = 0
    counters: Stats = field(default_factory=Stats)


def _rate(now: float, before: float, dt: float) -> float:
    return (now - before) / dt if dt > 0 else 0.0


def format_status(
    snap: StatusSnapshot, prev: StatusSnapshot | None = None, *, as_json: bool = False
) -> str:
    """Render one status line; rates are per second since ``prev`` (or since start)."""
    c = snap.counters
    p = prev.counters if prev else Stats()
    dt = snap.elapsed - (prev.elapsed if prev else 0.0)
    cpu_pct = 100.0 * _rate(snap.cpu_seconds, prev.cpu_seconds if prev else 0.0, dt)
    hb_rate = _rate(c.heartbeats, p.heartbeats, dt)
    cmd_rate = _rate(c.executed, p.executed, dt)
    if as_json:
        doc: dict[str, Any] = {
            "t": round(snap.elapsed, 3),
            "nodes": snap.nodes,
            "connected": snap.connected,
            "registered": snap.registered,
            "draining": snap.draining,
            "superseded": snap.superseded,
            "fatal": snap.fatal,
            "heartbeats_per_s": round(hb_rate, 1),
            "commands_per_s": round(cmd_rate, 1),
            "cpu_percent": round(cpu_pct, 1),
        }
        doc.update(dataclasses.asdict(c))
        return json.dumps(doc, separators=(",", ":"))
    line = (
        f"t={snap.elapsed:.1f}s nodes={snap.nodes} connected={snap.connected} "
        f"registered={snap.registered} hb/s={hb_rate:.1f} reconnects={c.reconnects} "
        f"cmds={c.executed} ({cmd_rate:.1f}/s) failed={c.failed} dup={c.duplicates} "
        f"cancelled={c.cancelled} errors={c.errors} cpu={cpu_pct:.1f}%"
    )
    extras = [
        f"{name}={value}"
        for name, value in (
            ("draining", snap.draining),
            ("superseded", snap.superseded),
            ("fatal", snap.fatal),
        )
        if value
    ]
    return " ".join([line, *extras])


# ---------------------------------------------------------------- node simulation


class _Execution:
    """One running simulated command."""

    __slots__ = ("attempt", "command", "handle")

    def __init__(self, command: pb.Command) -> None:
        self.command = command
        self.attempt = command.attempt
        self.handle: asyncio.TimerHandle | None = None


_GRPC_ENDED = (grpc.aio.AioRpcError, asyncio.InvalidStateError, grpc.aio.UsageError)


class NodeSim:
    """One simulated node: Register, one Connect stream, heartbeats, commands, agents.

    Outbound traffic (acks, results, agent states, heartbeats) is buffered on the node, not
    on the stream, so results produced while disconnected are delivered after reconnecting.
    Exactly one writer task per stream drains it.
    """

    def __init__(self, fleet: Fleet, spec: NodeSpec, channel_index: int) -> None:
        self.fleet = fleet
        self.spec = spec
        self.node_id = spec.node_id
        self.channel_index = channel_index
        self.epoch: int | None = None
        self.state = "starting"
        self.interval_s = DEFAULT_HEARTBEAT_S
        self.max_batch = DEFAULT_MAX_BATCH
        self.draining = False
        self.drain_reason = ""
        self.agents: dict[str, str] = {}
        self._dirty_agents: set[str] = set()
        self._acks: list[pb.CommandAck] = []
        self._results: list[pb.CommandResult] = []
        self._running: dict[str, _Execution] = {}
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._space.set()
        self._hb_due = False
        self._hb_handle: asyncio.TimerHandle | None = None
        self._failures = 0  # consecutive sessions that never got accepted; drives backoff
        self._reregisters = 0  # consecutive re-registrations without an accepted session
        self._sessions = 0
        rng = fleet.rng
        self._base = {key: rng.uniform(0.05, 0.30) for key in RESOURCE_KEYS}

    # ---- lifecycle

    async def run(self, start_fraction: float) -> None:
        """Node main loop; returns when stopped, superseded or rejected."""
        try:
            await self._main(start_fraction)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.state = "failed"
            self.fleet.stats.errors += 1
            log.exception("node %s: unexpected error; node stopped", self.node_id)
        finally:
            self._cancel_heartbeat()
            for exe in self._running.values():
                if exe.handle is not None:
                    exe.handle.cancel()
            self._running.clear()

    async def _main(self, start_fraction: float) -> None:
        fleet = self.fleet
        first = True
        while not fleet.stopping:
            if self.epoch is None and not await self._register():
                return
            if first:
                first = False
                ramp = fleet.ramp_s if fleet.ramp_s is not None else self.interval_s
                if ramp > 0 and start_fraction > 0:
                    self.state = "waiting"  # stagger: spread first heartbeats over one interval
                    await asyncio.sleep(start_fraction * ramp)
            if self._sessions:
                fleet.stats.reconnects += 1
            self._sessions += 1
            action = await self._session()
            if fleet.stopping:
                return
            if action is Action.SUPERSEDED:
                self.state = "superseded"
                fleet.report(
                    "superseded",
                    f"node {self.node_id}: superseded by another session; node stopped",
                    error=False,
                )
                return
            if action is Action.FATAL:
                self.state = "failed"
                return
            if action is Action.REREGISTER:
                self.epoch = None
                fleet.stats.reregisters += 1
                self._failures = 0  # the server answered: it is up, so re-register promptly
                delay = backoff_delay(self._reregisters, rng=fleet.rng)
                self._reregisters += 1  # but never loop Register/Connect hot
            else:
                delay = backoff_delay(self._failures, rng=fleet.rng)
                self._failures += 1
            self.state = "backoff"
            await asyncio.sleep(delay)

    async def _register(self) -> bool:
        """Register with retries; False if the node must stop (fatal error or shutdown)."""
        fleet = self.fleet
        request = pb.RegisterRequest(
            node_id=self.node_id,
            address=f"sim://{fleet.hostname}/{self.node_id}",
            labels=self.spec.labels,
            capacity=pb.Resources(**self.spec.capacity),
            version=f"nexus-node/{VERSION}",
        )
        attempt = 0
        while not fleet.stopping:
            self.state = "registering"
            try:
                async with fleet.register_slots:
                    response = await fleet.stub(self).Register(request, timeout=RPC_TIMEOUT_S)
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if register_error_is_fatal(code):
                    self.state = "failed"
                    fleet.report(
                        f"register-fatal-{code.name}",
                        f"node {self.node_id}: Register rejected ({code.name}: {exc.details()}); "
                        "node stopped",
                        level=logging.ERROR,
                    )
                    return False
                fleet.report(
                    f"register-{code.name}",
                    f"node {self.node_id}: Register failed ({code.name}: {exc.details()}); "
                    "retrying",
                )
            else:
                self.epoch = response.session_epoch
                if response.HasField("config"):
                    self.apply_config(response.config)
                self.state = "registered"
                fleet.stats.registers += 1
                return True
            self.state = "backoff"
            await asyncio.sleep(backoff_delay(attempt, rng=fleet.rng))
            attempt += 1
        return False

    async def _session(self) -> Action:
        """Run one Connect stream until it ends; return what to do next."""
        fleet = self.fleet
        self.state = "connecting"
        call = fleet.stub(self).Connect()
        reader = asyncio.create_task(self._reader(call))
        writer = asyncio.create_task(self._writer(call))
        try:
            await asyncio.wait((reader, writer), return_when=asyncio.FIRST_COMPLETED)
            for task in (reader, writer):
                exc = task.exception() if task.done() and not task.cancelled() else None
                if exc is not None and not isinstance(exc, _GRPC_ENDED):
                    log.error("node %s: stream task failed: %r", self.node_id, exc, exc_info=exc)
                    call.cancel()  # a local bug: end the call so its status resolves
            code = await call.code()
            details = await call.details()
        finally:
            self._cancel_heartbeat()
            call.cancel()
            reader.cancel()
            writer.cancel()
            await asyncio.gather(reader, writer, return_exceptions=True)
        if fleet.stopping:
            return Action.RECONNECT
        action = classify_stream_end(code, details)
        if code == grpc.StatusCode.OK:
            fleet.report(
                "stream-ok",
                f"node {self.node_id}: stream closed by server; reconnecting",
                level=logging.INFO,
                error=False,
            )
        elif action is Action.FATAL:
            fleet.report(
                f"connect-fatal-{code.name}",
                f"node {self.node_id}: Connect rejected ({code.name}: {details}); node stopped",
                level=logging.ERROR,
            )
        elif action is not Action.SUPERSEDED:
            fleet.report(
                f"stream-{code.name}",
                f"node {self.node_id}: stream ended ({code.name}: {details}); {action.value}",
            )
        return action

    # ---- inbound

    async def _reader(self, call: grpc.aio.StreamStreamCall) -> None:
        while True:
            msg = await call.read()
            if not isinstance(msg, pb.ControlMessage):
                return  # grpc.aio.EOF: the server completed the stream
            if self.state != "connected":
                self.state = "connected"
                self._failures = self._reregisters = 0  # the server accepted this session
            self.handle_control(msg)
            if self._over_capacity():
                await self._wait_capacity()  # stop reading: gRPC flow control pushes back

    def handle_control(self, msg: pb.ControlMessage) -> None:
        """Apply one ControlMessage: config, drain, commands, then cancellations."""
        if msg.HasField("config"):
            self.apply_config(msg.config)
        if msg.HasField("drain") and (
            msg.drain.draining != self.draining or msg.drain.reason != self.drain_reason
        ):
            self.draining = msg.drain.draining
            self.drain_reason = msg.drain.reason
            self.fleet.report(
                "drain",
                f"node {self.node_id}: drain {'requested' if self.draining else 'lifted'}"
                + (f" ({self.drain_reason})" if self.drain_reason else ""),
                level=logging.INFO,
                error=False,
            )
        for command in msg.commands:
            self._on_command(command)
        for command_id in msg.cancel_command_ids:
            self._on_cancel(command_id)
        if msg.commands or msg.cancel_command_ids:
            self._wake.set()

    def apply_config(self, config: pb.NodeConfig) -> None:
        """Adopt server-advised settings; a shorter interval takes effect right away."""
        if config.heartbeat_interval_ms > 0:
            interval = max(MIN_HEARTBEAT_S, config.heartbeat_interval_ms / 1000.0)
            if interval < self.interval_s and self._hb_handle is not None:
                self._schedule_heartbeat(jittered(interval, self.fleet.rng))
            self.interval_s = interval
        if config.max_batch_size > 0:
            self.max_batch = config.max_batch_size

    def _on_command(self, command: pb.Command) -> None:
        fleet = self.fleet
        self._acks.append(pb.CommandAck(command_id=command.id, attempt=command.attempt))
        running = self._running.get(command.id)
        if running is not None:  # redelivered while running: the result will carry this attempt
            running.attempt = max(running.attempt, command.attempt)
            fleet.stats.duplicates += 1
            return
        stored = fleet.dedup.get(DedupCache.key(self.node_id, command.id))
        if stored is not None:  # already executed: answer from the record, never run twice
            fleet.stats.duplicates += 1
            success, output, error = stored
            self._results.append(
                pb.CommandResult(
                    command_id=command.id,
                    attempt=command.attempt,
                    success=success,
                    output=output,
                    error=error,
                )
            )
            return
        exe = _Execution(command)
        self._running[command.id] = exe
        if command.deadline_ms and command.deadline_ms < time.time() * 1000.0:
            self._complete(exe, False, b"", "deadline exceeded")
            return
        loop = asyncio.get_running_loop()
        # Launching or stopping an agent returns at once; the agent then runs on its own.
        delay = 0.0 if command.kind in AGENT_KINDS else fleet.exec_duration()
        exe.handle = loop.call_later(delay, self._finish_execution, exe)

    def _on_cancel(self, command_id: str) -> None:
        exe = self._running.get(command_id)
        if exe is None:
            return  # unknown or already finished: its result stands
        if exe.handle is not None:
            exe.handle.cancel()
        self._complete(exe, False, b"", "cancelled")

    def _finish_execution(self, exe: _Execution) -> None:
        fleet = self.fleet
        if fleet.failure_rate and fleet.rng.random() < fleet.failure_rate:
            self._complete(exe, False, b"", "simulated failure")
            return
        kind = exe.command.kind
        if kind in AGENT_KINDS:
            agent_id = agent_id_from_payload(exe.command.payload, exe.command.id)
            self._set_agent(agent_id, "running" if kind == "agent.start" else "stopped")
        self._complete(exe, True, b"ok", "")

    def _complete(self, exe: _Execution, success: bool, output: bytes, error: str) -> None:
        fleet = self.fleet
        command = exe.command
        self._running.pop(command.id, None)
        fleet.dedup.put(DedupCache.key(self.node_id, command.id), (success, output, error))
        self._results.append(
            pb.CommandResult(
                command_id=command.id,
                attempt=exe.attempt,
                success=success,
                output=output,
                error=error,
            )
        )
        stats = fleet.stats
        stats.executed += 1
        if not success:
            stats.failed += 1
            if error == "cancelled":
                stats.cancelled += 1
        fleet.record(self.node_id, command, exe.attempt, success, error)
        self._wake.set()
        if not self._over_capacity():
            self._space.set()

    def _set_agent(self, agent_id: str, state: str) -> None:
        self.agents.pop(agent_id, None)
        self.agents[agent_id] = state  # re-insert: dict order = recency, oldest stopped go first
        self._dirty_agents.add(agent_id)
        stopped = [a for a, s in self.agents.items() if s == "stopped"]
        for old in stopped[: max(0, len(stopped) - STOPPED_AGENTS_KEPT)]:
            del self.agents[old]
            self._dirty_agents.discard(old)

    # ---- outbound

    def pending(self) -> int:
        """Acks and results waiting to be written."""
        return len(self._acks) + len(self._results)

    def _over_capacity(self) -> bool:
        return self.pending() >= OUTBOX_LIMIT or len(self._running) >= MAX_RUNNING

    async def _wait_capacity(self) -> None:
        while self._over_capacity():
            self._space.clear()
            await self._space.wait()

    def running_agents(self) -> int:
        """Number of agents currently in state ``running``."""
        return sum(1 for state in self.agents.values() if state == "running")

    def heartbeat(self) -> pb.Heartbeat:
        """Build a heartbeat with slowly drifting simulated usage."""
        rng = self.fleet.rng
        for key, value in self._base.items():  # small random walk keeps the numbers alive
            self._base[key] = min(0.5, max(0.02, value + rng.uniform(-0.01, 0.01)))
        usage = simulate_usage(
            self.spec.capacity, self._base, len(self._running), self.running_agents()
        )
        return pb.Heartbeat(usage=pb.Resources(**usage), sent_ms=int(time.time() * 1000))

    def build_message(self, *, heartbeat: bool, all_agents: bool) -> pb.NodeMessage | None:
        """Take up to ``max_batch`` acks and results (plus agents/heartbeat) into one message."""
        n = self.max_batch
        acks, self._acks = self._acks[:n], self._acks[n:]
        results, self._results = self._results[:n], self._results[n:]
        agent_ids: Iterable[str] = self.agents if all_agents else self._dirty_agents
        agents = [
            pb.AgentStatus(agent_id=a, state=self.agents[a]) for a in agent_ids if a in self.agents
        ]
        self._dirty_agents.clear()
        if not (heartbeat or acks or results or agents):
            return None
        msg = pb.NodeMessage(acks=acks, results=results, agents=agents)
        if heartbeat:
            msg.heartbeat.CopyFrom(self.heartbeat())
            self._hb_due = False
        if self._acks or self._results:
            self._wake.set()  # more than one batch waiting
        if not self._over_capacity():
            self._space.set()
        return msg

    def _requeue(self, msg: pb.NodeMessage) -> None:
        """Put back what a failed write carried; acks are dropped (redelivery re-acks)."""
        self._results[:0] = list(msg.results)
        self._dirty_agents.update(a.agent_id for a in msg.agents)

    async def _writer(self, call: grpc.aio.StreamStreamCall) -> None:
        """The only writer of this stream: first message, then heartbeats and batches."""
        assert self.epoch is not None
        self._wake.clear()  # anything still pending goes out in the first message
        first = self.build_message(heartbeat=True, all_agents=True)
        assert first is not None
        first.node_id = self.node_id
        first.session_epoch = self.epoch
        await self._write(call, first)
        while True:
            await self._wake.wait()
            self._wake.clear()
            if not self._hb_due and 0 < self.pending() < self.max_batch:
                await asyncio.sleep(COALESCE_S)  # let a burst of results join this message
            msg = self.build_message(heartbeat=self._hb_due, all_agents=False)
            if msg is not None:
                await self._write(call, msg)

    async def _write(self, call: grpc.aio.StreamStreamCall, msg: pb.NodeMessage) -> None:
        try:
            await call.write(msg)
        except BaseException:
            self._requeue(msg)
            raise
        stats = self.fleet.stats
        stats.messages += 1
        stats.acks += len(msg.acks)
        stats.results += len(msg.results)
        if msg.HasField("heartbeat"):
            stats.heartbeats += 1
            self._schedule_heartbeat(jittered(self.interval_s, self.fleet.rng))

    def _schedule_heartbeat(self, delay: float) -> None:
        self._cancel_heartbeat()
        self._hb_handle = asyncio.get_running_loop().call_later(delay, self._heartbeat_due)

    def _heartbeat_due(self) -> None:
        self._hb_handle = None
        self._hb_due = True
        self._wake.set()

    def _cancel_heartbeat(self) -> None:
        if self._hb_handle is not None:
            self._hb_handle.cancel()
            self._hb_handle = None
        self._hb_due = False


# ---------------------------------------------------------------- fleet


class Fleet:
    """Owns the channels, the nodes, counters, the record file and the status line."""

    def __init__(self, args: argparse.Namespace, specs: Sequence[NodeSpec]) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.stats = Stats()
        self.dedup = DedupCache(args.dedup_size)
        self.stopping = False
        self.hostname = socket.gethostname()
        self.ramp_s: float | None = args.ramp
        self.failure_rate: float = args.failure_rate
        self._exec_lo, self._exec_hi = args.exec_duration
        self.register_slots = asyncio.Semaphore(REGISTER_CONCURRENCY)
        self.channel_count = args.channels or default_channels(len(specs))
        self.channels: list[grpc.aio.Channel] = []
        self._stubs: list[Any] = []
        self.nodes = [NodeSim(self, spec, i % self.channel_count) for i, spec in enumerate(specs)]
        self._record_fp: IO[str] | None = None
        self._record_flush: asyncio.TimerHandle | None = None
        self._last_log: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._t0 = time.monotonic()
        self._cpu0 = time.process_time()

    # ---- helpers used by nodes

    def stub(self, node: NodeSim) -> Any:
        """The NodeService stub of the channel this node is pinned to."""
        return self._stubs[node.channel_index]

    def exec_duration(self) -> float:
        """One simulated execution time, uniform within ``--exec-duration``."""
        if self._exec_lo == self._exec_hi:
            return self._exec_lo
        return self.rng.uniform(self._exec_lo, self._exec_hi)

    def report(
        self, kind: str, message: str, *, level: int = logging.WARNING, error: bool = True
    ) -> None:
        """Count and log a problem; one message per kind per window, not one per node."""
        if error:
            self.stats.errors += 1
        now = time.monotonic()
        last = self._last_log.get(kind)
        if last is None or now - last >= LOG_SUPPRESS_S:
            suppressed = self._suppressed.pop(kind, 0)
            suffix = (
                f" (+{suppressed} similar in the last {LOG_SUPPRESS_S:.0f}s)" if suppressed else ""
            )
            log.log(level, "%s%s", message, suffix)
            self._last_log[kind] = now
        else:
            self._suppressed[kind] = self._suppressed.get(kind, 0) + 1
            log.debug("%s", message)

    def record(
        self, node_id: str, command: pb.Command, attempt: int, success: bool, error: str
    ) -> None:
        """Append one JSON line per executed command to ``--record`` (flushed every 200ms)."""
        if self._record_fp is None:
            return
        line = {
            "node_id": node_id,
            "command_id": command.id,
            "attempt": attempt,
            "success": success,
            "kind": command.kind,
            "ts_ms": int(time.time() * 1000),
        }
        if error:
            line["error"] = error
        self._record_fp.write(json.dumps(line, separators=(",", ":")) + "\n")
        if self._record_flush is None:
            loop = asyncio.get_running_loop()
            self._record_flush = loop.call_later(RECORD_FLUSH_S, self.flush_record)

    def flush_record(self) -> None:
        """Flush the record file (timer callback and at exit)."""
        self._record_flush = None
        if self._record_fp is not None:
            self._record_fp.flush()

    # ---- status

    def snapshot(self) -> StatusSnapshot:
        """Current counters and node-state gauges."""
        connected = registered = draining = superseded = fatal = 0
        for node in self.nodes:
            state = node.state
            if state == "connected":
                connected += 1
            if state == "superseded":
                superseded += 1
            elif state == "failed":
                fatal += 1
            elif node.epoch is not None:
                registered += 1
            if node.draining:
                draining += 1
        c = self.stats
        return StatusSnapshot(
            elapsed=time.monotonic() - self._t0,
            cpu_seconds=time.process_time() - self._cpu0,
            nodes=len(self.nodes),
            connected=connected,
            registered=registered,
            draining=draining,
            superseded=superseded,
            fatal=fatal,
            counters=dataclasses.replace(c),
        )

    def _print(self, line: str) -> None:
        print(line, flush=True)

    async def _status_loop(self, interval: float) -> None:
        prev = self.snapshot()
        while True:
            await asyncio.sleep(interval)
            snap = self.snapshot()
            self._print(format_status(snap, prev, as_json=self.args.json_status))
            prev = snap

    # ---- run

    def _open_channels(self) -> None:
        args = self.args
        options: list[tuple[str, Any]] = [
            ("grpc.use_local_subchannel_pool", 1),  # K channels = K TCP connections, not 1 shared
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
            ("grpc.enable_retries", 0),  # we retry ourselves, with our own backoff
        ]
        if args.keepalive > 0:
            options += [
                ("grpc.keepalive_time_ms", int(args.keepalive * 1000)),
                ("grpc.keepalive_timeout_ms", 10_000),
            ]
        if args.tls_server_name:
            options.append(("grpc.ssl_target_name_override", args.tls_server_name))
        creds = None
        if args.tls_ca or args.tls_cert or args.tls_key:
            creds = grpc.ssl_channel_credentials(
                root_certificates=_read_optional(args.tls_ca),
                private_key=_read_optional(args.tls_key),
                certificate_chain=_read_optional(args.tls_cert),
            )
        for _ in range(self.channel_count):
            if creds is not None:
                channel = grpc.aio.secure_channel(args.target, creds, options=options)
            else:
                channel = grpc.aio.insecure_channel(args.target, options=options)
            self.channels.append(channel)
            self._stubs.append(pb_grpc.NodeServiceStub(channel))

    async def run(self, stop: asyncio.Event) -> int:
        """Run until ``stop`` is set, ``--duration`` elapses or every node has stopped."""
        args = self.args
        loop = asyncio.get_running_loop()
        if args.record:
            self._record_fp = open(args.record, "a", encoding="utf-8")  # noqa: SIM115
        self._open_channels()
        log.info(
            "nexus-node %s: %d nodes -> %s over %d channel(s)",
            VERSION,
            len(self.nodes),
            args.target,
            self.channel_count,
        )
        n = max(len(self.nodes), 1)
        node_tasks = [
            loop.create_task(node.run(i / n), name=f"node:{node.node_id}")
            for i, node in enumerate(self.nodes)
        ]
        aux: list[asyncio.Task[Any]] = []
        if args.status_interval > 0:
            aux.append(loop.create_task(self._status_loop(args.status_interval)))
        stop_wait = loop.create_task(stop.wait())
        nodes_done = loop.create_task(asyncio.wait(node_tasks)) if node_tasks else None
        aux.append(stop_wait)
        waiters: set[asyncio.Future[Any]] = {stop_wait}
        if nodes_done is not None:
            aux.append(nodes_done)
            waiters.add(nodes_done)
        exit_code = 0
        try:
            await asyncio.wait(
                waiters, timeout=args.duration or None, return_when=asyncio.FIRST_COMPLETED
            )
            if nodes_done is not None and nodes_done.done() and not stop.is_set():
                snap = self.snapshot()
                log.error(
                    "all nodes stopped on their own (%d rejected, %d superseded); exiting",
                    snap.fatal,
                    snap.superseded,
                )
                exit_code = 1
        finally:
            await self._shutdown(node_tasks, aux)
        snap = self.snapshot()
        self._print("final " + format_status(snap, None, as_json=args.json_status))
        return exit_code

    async def _shutdown(
        self, node_tasks: list[asyncio.Task[None]], aux: list[asyncio.Task[Any]]
    ) -> None:
        """Stop heartbeats (cancel streams), optionally Deregister, close channels."""
        self.stopping = True
        for task in [*node_tasks, *aux]:
            task.cancel()
        await asyncio.gather(*node_tasks, *aux, return_exceptions=True)
        if self.args.deregister_on_exit:
            await self._deregister_all()
        if self._record_flush is not None:
            self._record_flush.cancel()
        self.flush_record()
        if self._record_fp is not None:
            self._record_fp.close()
            self._record_fp = None
        await asyncio.gather(*(ch.close(None) for ch in self.channels), return_exceptions=True)

    async def _deregister_all(self) -> None:
        slots = asyncio.Semaphore(DEREGISTER_CONCURRENCY)
        todo = [
            n for n in self.nodes if n.epoch is not None and n.state not in ("failed", "superseded")
        ]

        async def one(node: NodeSim) -> bool:
            async with slots:
                try:
                    await self.stub(node).Deregister(
                        pb.DeregisterRequest(node_id=node.node_id, session_epoch=node.epoch),
                        timeout=DEREGISTER_TIMEOUT_S,
                    )
                except grpc.aio.AioRpcError as exc:
                    self.report(
                        f"deregister-{exc.code().name}",
                        f"node {node.node_id}: Deregister failed ({exc.code().name}: {exc.details()})",
                    )
                    return False
                return True

        results = await asyncio.gather(*(one(node) for node in todo))
        log.info("deregistered %d/%d nodes", sum(results), len(todo))


def _read_optional(path: str | None) -> bytes | None:
    if not path:
        return None
    with open(path, "rb") as fp:
        return fp.read()


def default_channels(nodes: int) -> int:
    """One channel per 250 nodes, at least one."""
    return max(1, math.ceil(nodes / NODES_PER_CHANNEL))


# ---------------------------------------------------------------- CLI

_EPILOG = """\
spec file (--spec): TOML or JSON, a list of node groups. Each group has
  count      number of nodes (required)
  labels     table of label -> value. A value may be a template using {i}
             (index in the fleet), {g} (index in the group) or {id} (node id),
             or a list that cycles by index in the group.
  capacity   table like --capacity; missing keys come from --capacity
  id_prefix  overrides --id-prefix; ids count from 00000 per prefix
--labels/--capacity apply to every group as defaults; --nodes is not allowed with --spec.

  # fleet.toml
  [[groups]]
  count = 800
  labels = { tier = "cpu", zone = ["a", "b", "c"], rack = "r{g}" }
  capacity = { cpu = 16, memory = "64GB" }

  [[groups]]
  count = 200
  id_prefix = "gpu-"
  labels = { tier = "gpu", zone = "a" }
  capacity = { cpu = 32, memory = "256GB", gpu = 8 }

JSON: the same groups as a list, or {"groups": [...]}.
On the command line a label value a|b|c cycles the same way: --labels zone=a|b|c.
Sizes are binary: 1GB = 1GiB = 2^30 bytes; cpu accepts millicores (500m).

Each node: Register (backoff with full jitter 0.2s..10s), then one Connect stream
(heartbeats at the server-advised interval +-10%), ack/execute/report commands,
de-duplicated by command id. SIGINT/SIGTERM stops cleanly; a second one exits at once.
"""


def _arg_type(fn: Any, name: str) -> Any:
    def convert(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert


def _non_negative(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a non-negative number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be a positive integer, got {text!r}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be within 0..1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The nexus-node argument parser."""
    p = argparse.ArgumentParser(
        prog="nexus-node",
        description="Reference node proxy: simulate a fleet of nodes against a nexus_fast server.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    nonneg = _arg_type(_non_negative, "seconds")
    posint = _arg_type(_positive_int, "count")
    g = p.add_argument_group("fleet")
    g.add_argument(
        "--nodes",
        type=_arg_type(lambda t: int(_non_negative(t)), "count"),
        help=f"number of nodes to simulate (default {DEFAULT_NODES})",
    )
    g.add_argument("--id-prefix", default="node-", help="node id prefix (default %(default)s)")
    g.add_argument(
        "--labels",
        type=_arg_type(parse_labels, "labels"),
        default={},
        help="labels for every node, e.g. zone=a,tier=gpu (a|b|c cycles)",
    )
    g.add_argument(
        "--capacity",
        type=_arg_type(parse_capacity, "capacity"),
        default=dict(DEFAULT_CAPACITY),
        help="capacity, e.g. cpu=8,memory=32GB,gpu=0,disk=100GB (the default)",
    )
    g.add_argument("--spec", metavar="FILE", help="TOML/JSON node groups (see below)")
    g.add_argument("--seed", type=int, default=None, help="random seed (reproducible jitter)")
    c = p.add_argument_group("connection")
    c.add_argument("--target", default="127.0.0.1:50053", help="server address (%(default)s)")
    c.add_argument(
        "--channels",
        type=posint,
        default=None,
        help=f"gRPC channels (default: one per {NODES_PER_CHANNEL} nodes)",
    )
    c.add_argument(
        "--ramp",
        type=nonneg,
        default=None,
        metavar="SECONDS",
        help="spread node start-up over this long (default: one heartbeat interval)",
    )
    c.add_argument(
        "--keepalive",
        type=nonneg,
        default=0.0,
        metavar="SECONDS",
        help="HTTP/2 keepalive ping interval; 0 = off (default; the server must "
        "permit pings this frequent)",
    )
    c.add_argument("--tls-ca", metavar="FILE", help="PEM root certificates (enables TLS)")
    c.add_argument("--tls-cert", metavar="FILE", help="PEM client certificate chain (mTLS)")
    c.add_argument("--tls-key", metavar="FILE", help="PEM client private key (mTLS)")
    c.add_argument("--tls-server-name", metavar="NAME", help="override the TLS server name")
    r = p.add_argument_group("run")
    r.add_argument(
        "--duration",
        type=nonneg,
        default=0.0,
        help="exit after this many seconds; 0 = until SIGINT/SIGTERM (default)",
    )
    r.add_argument(
        "--status-interval",
        type=nonneg,
        default=5.0,
        help="seconds between status lines; 0 = only the final one (default 5)",
    )
    r.add_argument("--json-status", action="store_true", help="status lines as JSON")
    r.add_argument(
        "--deregister-on-exit",
        action="store_true",
        help="Deregister nodes on exit (default: leave them to time out)",
    )
    r.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"]
    )
    x = p.add_argument_group("commands")
    x.add_argument(
        "--exec-duration",
        type=_arg_type(parse_exec_duration, "duration"),
        default=(0.01, 0.01),
        metavar="SECONDS",
        help='simulated run time, e.g. 0.01 or a range "0.01-0.05" (default 0.01)',
    )
    x.add_argument(
        "--failure-rate",
        type=_arg_type(_probability, "rate"),
        default=0.0,
        metavar="P",
        help="probability a command fails (default 0)",
    )
    x.add_argument(
        "--record",
        metavar="FILE",
        help="append a JSON line per executed command (node_id, command_id, attempt, success)",
    )
    x.add_argument(
        "--dedup-size",
        type=posint,
        default=DEFAULT_DEDUP_SIZE,
        metavar="N",
        help="finished command ids remembered for de-duplication, per process "
        "(default %(default)s)",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the CLI; the expanded fleet is in ``args.node_specs``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.spec and args.nodes is not None:
        parser.error("--nodes cannot be combined with --spec (counts come from the spec)")
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    try:
        if args.spec:
            groups: list[Any] = load_spec_groups(args.spec)
        else:
            groups = [{"count": DEFAULT_NODES if args.nodes is None else args.nodes}]
        args.node_specs = build_node_specs(
            groups, id_prefix=args.id_prefix, base_labels=args.labels, base_capacity=args.capacity
        )
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        parser.error(f"--spec {args.spec}: {exc}" if args.spec else str(exc))
    if not args.node_specs:
        parser.error("no nodes to simulate")
    return args


async def run_fleet(
    args: argparse.Namespace | Sequence[str], *, stop_event: asyncio.Event | None = None
) -> int:
    """Run a fleet until SIGINT/SIGTERM, ``--duration`` or ``stop_event``; return an exit code."""
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    specs = getattr(args, "node_specs", None)
    if specs is None:
        raise ValueError("args must come from parse_args()")
    loop = asyncio.get_running_loop()
    stop = stop_event or asyncio.Event()
    fleet = Fleet(args, specs)
    signals_seen = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("%s: stopping (again to exit immediately)", sig.name)
            stop.set()
        else:
            log.warning("%s again: exiting immediately", sig.name)
            fleet.flush_record()
            os._exit(130)

    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread / not supported: rely on stop_event
    try:
        return await fleet.run(stop)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``nexus-node``)."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s nexus-node: %(message)s",
        stream=sys.stderr,
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(run_fleet(args))
    return uvloop.run(run_fleet(args))


if __name__ == "__main__":
    sys.exit(main())
