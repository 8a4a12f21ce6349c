"""JSON views of records and events (HTTP API, dashboard, WebSocket event payloads).

Proto field names, every field present (also false, zero and empty ones), bytes as
base64, integers as JSON numbers, and enums by one style everywhere: the lower-case name
without its prefix (node ``"ready"``, command ``"succeeded"``, agent ``"running"``), see
docs/events.md. Written by hand: ``json_format.MessageToDict`` costs ~50 us per record,
these ~5 us.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from typing import Any, Final

import orjson
from google.protobuf.message import DecodeError

from nexus_fast.logs import get_logger
from nexus_fast.pb import fabric_pb2 as pb

log = get_logger("codec")

# "succeeded", "running", ...: one enum style with the node statuses below.
COMMAND_STATE_NAMES: Final = {
    v.number: v.name.removeprefix("COMMAND_STATE_").lower()
    for v in pb.CommandState.DESCRIPTOR.values
}
AGENT_STATE_NAMES: Final = {
    v.number: v.name.removeprefix("AGENT_STATE_").lower() for v in pb.AgentState.DESCRIPTOR.values
}
# "ready", "draining", ...: the names the API takes and shows (core.nodes.STATUS_NAMES).
NODE_STATUS_NAMES: Final = {
    v.number: v.name.removeprefix("NODE_STATUS_").lower()
    for v in pb.NodeStatus.DESCRIPTOR.values
    if v.number
}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _resources(r: pb.Resources) -> dict[str, float]:
    return {"cpu": r.cpu, "memory": r.memory, "gpu": r.gpu, "disk": r.disk}


def _placement(p: pb.Placement) -> dict[str, Any]:
    return {
        "label_selector": dict(p.label_selector),
        "request": _resources(p.request),
        "spread_key": p.spread_key,
    }


def node_to_dict(node: pb.Node) -> dict[str, object]:
    """JSON-able view of a node (HTTP API, dashboard, events)."""
    return {
        "id": node.id,
        "address": node.address,
        "labels": dict(node.labels),
        "capacity": _resources(node.capacity),
        "usage": _resources(node.usage),
        "status": NODE_STATUS_NAMES.get(node.status, "unknown"),
        "eligible": node.eligible,
        "draining": node.draining,
        "drain_reason": node.drain_reason,
        "session_epoch": node.session_epoch,
        "last_heartbeat_ms": node.last_heartbeat_ms,
        "registered_ms": node.registered_ms,
        "status_changed_ms": node.status_changed_ms,
        "connected": node.connected,
        "version": node.version,
    }


def command_to_dict(rec: pb.CommandRecord) -> dict[str, Any]:
    """JSON-able CommandRecord."""
    spec = rec.spec
    return {
        "id": rec.id,
        "spec": {
            "idempotency_key": spec.idempotency_key,
            "kind": spec.kind,
            "payload": _b64(spec.payload),
            "target_node": spec.target_node,
            "placement": _placement(spec.placement),
            "priority": spec.priority,
            "timeout_ms": spec.timeout_ms,
            "max_attempts": spec.max_attempts,
        },
        "state": COMMAND_STATE_NAMES.get(rec.state, str(rec.state)),
        "node_id": rec.node_id,
        "attempt": rec.attempt,
        "reason": rec.reason,
        "output": _b64(rec.output),
        "created_ms": rec.created_ms,
        "updated_ms": rec.updated_ms,
        "dispatched_ms": rec.dispatched_ms,
        "finished_ms": rec.finished_ms,
        "tried_nodes": list(rec.tried_nodes),
        "agent_id": rec.agent_id,
    }


def submit_result_to_dict(result: pb.SubmitResult) -> dict[str, Any]:
    """JSON-able SubmitResult (the WebSocket ``submitted`` reply), every field present."""
    return {
        "id": result.id,
        "state": COMMAND_STATE_NAMES.get(result.state, str(result.state)),
        "node_id": result.node_id,
        "reason": result.reason,
        "duplicate": result.duplicate,
    }


def agent_to_dict(agent: pb.Agent) -> dict[str, Any]:
    """JSON-able Agent, in the same style as :func:`command_to_dict`."""
    spec = agent.spec
    return {
        "id": agent.id,
        "name": agent.name,
        "replica": agent.replica,
        "spec": {
            "name": spec.name,
            "spec": _b64(spec.spec),
            "request": _resources(spec.request),
            "placement": _placement(spec.placement),
            "replicas": spec.replicas,
        },
        "state": AGENT_STATE_NAMES.get(agent.state, str(agent.state)),
        "node_id": agent.node_id,
        "message": agent.message,
        "created_ms": agent.created_ms,
        "updated_ms": agent.updated_ms,
        "placements": agent.placements,
        "stop_requested": agent.stop_requested,
    }


def payload_json(topic: str, payload: bytes) -> object:
    """The entity in an event payload as a JSON-able value, by topic."""
    try:
        if topic == "node":
            return node_to_dict(pb.Node.FromString(payload))
        if topic == "command":
            return command_to_dict(pb.CommandRecord.FromString(payload))
        if topic == "agent":
            return agent_to_dict(pb.Agent.FromString(payload))
        if topic == "system":
            return orjson.loads(payload) if payload else None
    except (DecodeError, orjson.JSONDecodeError):
        log.warning("undecodable event payload", extra={"topic": topic})
    # Unknown topic or a corrupt payload: pass the bytes through rather than drop the event.
    return _b64(payload) if payload else None


def system_payload(data: Mapping[str, object]) -> bytes:
    """The payload of a ``system`` event: ``data`` as UTF-8 JSON."""
    return orjson.dumps(dict(data))


def agent_start_payload(agent: pb.Agent) -> bytes:
    """The payload of an ``agent.start`` command, as the node reads it."""
    return orjson.dumps(
        {
            "agent_id": agent.id,
            "name": agent.name,
            "replica": agent.replica,
            "spec": agent.spec.spec.decode("utf-8", "replace"),
        }
    )


def agent_stop_payload(agent: pb.Agent) -> bytes:
    """The payload of an ``agent.stop`` command, as the node reads it."""
    return orjson.dumps({"agent_id": agent.id, "name": agent.name})
