"""How nexusctl prints things: tables (tabulate), wide tables, JSON and YAML.

JSON and YAML are the proto3 JSON mapping of the records (field names as in the proto,
enum names like ``NODE_STATUS_READY``, ``bytes`` in base64) with one change for shell
users: 64-bit integers are numbers, not strings. A list prints as a JSON array.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message
from tabulate import tabulate

from nexus_fast.pb import fabric_pb2 as pb

FORMATS = ("table", "wide", "json", "yaml")
_INT64 = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)


def to_dict(message: Message) -> dict[str, Any]:
    """A message as proto3 JSON (every field, proto names), 64-bit integers as numbers."""
    doc = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    _ints(message.DESCRIPTOR, doc)
    return doc


def _ints(descriptor: Any, doc: dict[str, Any]) -> None:
    for key, value in doc.items():
        field = descriptor.fields_by_name.get(key)
        if field is None:
            continue
        if field.message_type is not None:
            sub = field.message_type
            if sub.GetOptions().map_entry:
                value_field = sub.fields_by_name["value"]
                if value_field.message_type is not None:
                    for item in value.values():
                        _ints(value_field.message_type, item)
                elif value_field.cpp_type in _INT64:
                    doc[key] = {k: int(v) for k, v in value.items()}
            elif isinstance(value, list):
                for item in value:
                    _ints(sub, item)
            elif isinstance(value, dict):
                _ints(sub, value)
        elif field.cpp_type in _INT64:
            doc[key] = [int(v) for v in value] if isinstance(value, list) else int(value)


def event_to_dict(event: pb.Event) -> dict[str, Any]:
    """An event with its payload decoded by topic (the entity after the change)."""
    doc = to_dict(event)
    doc["payload"] = decode_payload(event.topic, event.payload)
    return doc


_PAYLOAD_TYPES: dict[str, type[Message]] = {
    "node": pb.Node,
    "command": pb.CommandRecord,
    "agent": pb.Agent,
}


def decode_payload(topic: str, payload: bytes) -> Any:
    """The entity in an event's payload; base64 of the bytes when it does not decode."""
    if not payload:
        return None
    try:
        kind = _PAYLOAD_TYPES.get(topic)
        if kind is not None:
            return to_dict(kind.FromString(payload))
        if topic == "system":
            return json.loads(payload)
    except (DecodeError, ValueError):
        pass
    return base64.b64encode(payload).decode("ascii")


def dump_json(doc: Any) -> str:
    """Pretty JSON for a record or a list of records."""
    return json.dumps(doc, indent=2, ensure_ascii=False)


def dump_yaml(doc: Any) -> str:
    """Block-style YAML, keys in proto order."""
    return yaml.safe_dump(doc, sort_keys=False, allow_unicode=True).rstrip("\n")


# ---------------------------------------------------------------- table cells


def enum_name(value: int, enum: Any, prefix: str) -> str:
    """``NODE_STATUS_READY`` -> ``ready``."""
    try:
        name: str = enum.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower()


def age(ms: int, now_ms: int | None = None) -> str:
    """Compact age of a unix-ms time: ``5s``, ``3m``, ``2h``, ``4d``; ``-`` for 0."""
    if not ms:
        return "-"
    seconds = max(0, ((now_ms if now_ms is not None else time.time_ns() // 1_000_000) - ms)) // 1000
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def pairs(mapping: Mapping[str, str]) -> str:
    """``{a: 1, b: 2}`` -> ``a=1,b=2`` (sorted); ``-`` when empty."""
    return ",".join(f"{k}={v}" for k, v in sorted(mapping.items())) or "-"


def yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def text(data: bytes, limit: int = 40) -> str:
    """Bytes as text for a table cell (UTF-8, one line, cut at ``limit``)."""
    if not data:
        return "-"
    out = data.decode("utf-8", errors="replace").replace("\n", "\\n")
    return out if len(out) <= limit else out[: limit - 1] + "…"


def gib(n: float) -> str:
    return f"{n / 1024**3:.1f}Gi"


def cores(n: float) -> str:
    return f"{n:.2f}".rstrip("0").rstrip(".")


@dataclass(frozen=True, slots=True)
class Column:
    """One table column: a header, how to get the cell, and whether only ``-o wide`` has it."""

    header: str
    cell: Callable[[Any], str]
    wide: bool = False


def node_status(n: pb.Node) -> str:
    return enum_name(n.status, pb.NodeStatus, "NODE_STATUS_")


NODE_COLUMNS = (
    Column("ID", lambda n: n.id),
    Column("STATUS", node_status),
    Column("ELIGIBLE", lambda n: yes_no(n.eligible)),
    Column("DRAINING", lambda n: yes_no(n.draining)),
    Column("CONNECTED", lambda n: yes_no(n.connected)),
    Column("HEARTBEAT", lambda n: age(n.last_heartbeat_ms)),
    Column("LABELS", lambda n: pairs(n.labels)),
    Column("ADDRESS", lambda n: n.address or "-", wide=True),
    Column("CPU", lambda n: f"{cores(n.usage.cpu)}/{cores(n.capacity.cpu)}", wide=True),
    Column("MEMORY", lambda n: f"{gib(n.usage.memory)}/{gib(n.capacity.memory)}", wide=True),
    Column("GPU", lambda n: f"{cores(n.usage.gpu)}/{cores(n.capacity.gpu)}", wide=True),
    Column("EPOCH", lambda n: str(n.session_epoch), wide=True),
    Column("VERSION", lambda n: n.version or "-", wide=True),
    Column("DRAIN-REASON", lambda n: n.drain_reason or "-", wide=True),
)


def command_state(c: pb.CommandRecord) -> str:
    return enum_name(c.state, pb.CommandState, "COMMAND_STATE_")


def _where(spec: pb.CommandSpec) -> str:
    if spec.target_node:
        return f"node={spec.target_node}"
    return pairs(spec.placement.label_selector)


COMMAND_COLUMNS = (
    Column("ID", lambda c: c.id),
    Column("KIND", lambda c: c.spec.kind),
    Column("STATE", command_state),
    Column("NODE", lambda c: c.node_id or "-"),
    Column("ATTEMPT", lambda c: f"{c.attempt}/{c.spec.max_attempts or '-'}"),
    Column("AGE", lambda c: age(c.created_ms)),
    Column("REASON", lambda c: c.reason or "-"),
    Column("WHERE", lambda c: _where(c.spec), wide=True),
    Column("PRIORITY", lambda c: str(c.spec.priority), wide=True),
    Column("TRIED", lambda c: ",".join(c.tried_nodes) or "-", wide=True),
    Column("AGENT", lambda c: c.agent_id or "-", wide=True),
    Column("OUTPUT", lambda c: text(c.output), wide=True),
)

SUBMIT_COLUMNS = (
    Column("ID", lambda r: r.id),
    Column("STATE", lambda r: enum_name(r.state, pb.CommandState, "COMMAND_STATE_")),
    Column("NODE", lambda r: r.node_id or "-"),
    Column("DUPLICATE", lambda r: yes_no(r.duplicate)),
    Column("REASON", lambda r: r.reason or "-"),
)


def agent_state(a: pb.Agent) -> str:
    return enum_name(a.state, pb.AgentState, "AGENT_STATE_")


AGENT_COLUMNS = (
    Column("ID", lambda a: a.id),
    Column("NAME", lambda a: a.name),
    Column("STATE", agent_state),
    Column("NODE", lambda a: a.node_id or "-"),
    Column("PLACEMENTS", lambda a: str(a.placements)),
    Column("AGE", lambda a: age(a.created_ms)),
    Column("MESSAGE", lambda a: a.message or "-"),
    Column("CPU", lambda a: cores(a.spec.request.cpu), wide=True),
    Column("MEMORY", lambda a: gib(a.spec.request.memory), wide=True),
    Column("GPU", lambda a: cores(a.spec.request.gpu), wide=True),
    Column("STOPPING", lambda a: yes_no(a.stop_requested), wide=True),
    Column("SELECTOR", lambda a: pairs(a.spec.placement.label_selector), wide=True),
)


def table(rows: Iterable[Any], columns: Sequence[Column], wide: bool) -> str:
    """A plain, kubectl-like table (tabulate's ``plain`` format, upper-case headers)."""
    cols = [c for c in columns if wide or not c.wide]
    body = [[c.cell(row) for c in cols] for row in rows]
    if not body:
        return "No resources found."
    return tabulate(body, headers=[c.header for c in cols], tablefmt="plain", disable_numparse=True)


def render(messages: Sequence[Message], columns: Sequence[Column], fmt: str, *, many: bool) -> str:
    """Records in ``fmt``; ``many`` prints a list (``ls``) even for one record."""
    if fmt in ("table", "wide"):
        return table(messages, columns, fmt == "wide")
    docs: Any = [to_dict(m) for m in messages]
    if not many:
        docs = docs[0] if docs else None
    return dump_json(docs) if fmt == "json" else dump_yaml(docs)


def render_doc(doc: Any, fmt: str) -> str:
    """A plain JSON-able document in ``json``/``yaml`` (tables are the caller's business)."""
    return dump_json(doc) if fmt == "json" else dump_yaml(doc)


# ---------------------------------------------------------------- events, one line each


def _event_summary(doc: dict[str, Any]) -> str:
    payload = doc.get("payload")
    if not isinstance(payload, dict):
        return "-" if payload is None else str(payload)[:60]
    for key in ("status", "state"):
        if key in payload:
            value = str(payload[key])
            for prefix in ("NODE_STATUS_", "COMMAND_STATE_", "AGENT_STATE_"):
                value = value.removeprefix(prefix)
            extra = payload.get("node_id") or ""
            return value.lower() + (f" node={extra}" if extra else "")
    return json.dumps(payload, separators=(",", ":"))[:60]


EVENT_HEADER = f"{'INDEX':>8}  {'TIME':<23}  {'TOPIC':<7}  {'TYPE':<24}  KEY"


def event_line(event: pb.Event, fmt: str) -> str:
    """One event as a line: a fixed-width row (table/wide), JSON Lines, or a YAML document.

    A stream cannot be laid out as one table (widths are unknown until it ends), so the
    table formats use fixed columns, like ``kubectl get -w``.
    """
    if fmt == "json":
        return json.dumps(event_to_dict(event), separators=(",", ":"), ensure_ascii=False)
    if fmt == "yaml":
        return "---\n" + dump_yaml(event_to_dict(event))
    when = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(event.time_ms / 1000))
    when += f".{event.time_ms % 1000:03d}Z"
    line = f"{event.index:>8}  {when:<23}  {event.topic:<7}  {event.type:<24}  {event.key or '-'}"
    if fmt == "wide":
        line += "  " + _event_summary(event_to_dict(event))
    return line
