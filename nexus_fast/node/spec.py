"""What a simulated fleet looks like: capacity and label parsing, node specs, spec files."""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from nexus_fast.units import parse_size as units_parse_size

RESOURCE_KEYS = ("cpu", "memory", "gpu", "disk")
GIB = 1024**3
DEFAULT_CAPACITY: dict[str, float] = {
    "cpu": 8.0,
    "memory": float(32 * GIB),
    "gpu": 0.0,
    "disk": float(100 * GIB),
}
DEFAULT_NODES = 10


def parse_size(text: str | int | float) -> float:
    """Parse a byte size: ``512MB``, ``32GB``, ``1.5GiB``, ``1e3``, ``100`` (bytes).

    The units are :func:`nexus_fast.units.parse_size`'s (binary, ``B`` and ``i`` optional,
    case ignored) plus scientific notation and plain floats; the result is a float of whole
    bytes, as the capacity vectors hold floats.
    """
    if isinstance(text, float):
        if not math.isfinite(text) or text < 0:
            raise ValueError(f"invalid size {text!r}: must be a finite non-negative number")
        return float(round(text))
    try:
        return float(units_parse_size(text, exponent=True))
    except (TypeError, ValueError):
        raise ValueError(f"invalid size {text!r} (examples: 512MB, 32GB, 1.5TiB, 1024)") from None


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
