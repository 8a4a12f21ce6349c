"""nexusctl output: proto3 JSON with numeric 64-bit ints, tables, event lines, error lines."""

from __future__ import annotations

import base64
import json

import grpc
import grpc.aio
import yaml

from nexus_fast.ctl import render
from nexus_fast.ctl.client import _resumable, describe
from nexus_fast.pb import fabric_pb2 as pb


def node(**kw: object) -> pb.Node:
    base: dict[str, object] = {
        "id": "n1",
        "status": pb.NODE_STATUS_READY,
        "eligible": True,
        "labels": {"zone": "a", "tier": "gpu"},
        "session_epoch": 2**40,
        "last_heartbeat_ms": 1_700_000_000_000,
        "capacity": pb.Resources(cpu=8, memory=32 * 1024**3),
    }
    base.update(kw)
    return pb.Node(**base)  # type: ignore[arg-type]


def test_to_dict_keeps_every_field_and_makes_64_bit_ints_numbers() -> None:
    doc = render.to_dict(node())
    assert doc["session_epoch"] == 2**40 and isinstance(doc["session_epoch"], int)
    assert doc["last_heartbeat_ms"] == 1_700_000_000_000
    assert doc["status"] == "NODE_STATUS_READY"
    assert doc["labels"] == {"zone": "a", "tier": "gpu"}
    assert doc["draining"] is False  # defaults are printed, not dropped
    assert doc["capacity"]["cpu"] == 8.0


def test_to_dict_repeated_and_nested_ints() -> None:
    batch = pb.EventBatch(
        events=[pb.Event(index=5, time_ms=7), pb.Event(index=6)], bookmark_index=9
    )
    doc = render.to_dict(batch)
    assert [e["index"] for e in doc["events"]] == [5, 6]
    assert doc["events"][0]["time_ms"] == 7 and doc["bookmark_index"] == 9


def test_event_payload_decoded_by_topic() -> None:
    record = pb.CommandRecord(id="c1", state=pb.COMMAND_STATE_FAILED, node_id="n1")
    event = pb.Event(index=3, topic="command", type="command.failed", key="c1")
    event.payload = record.SerializeToString()
    doc = render.event_to_dict(event)
    assert doc["payload"]["state"] == "COMMAND_STATE_FAILED"
    system = pb.Event(index=4, topic="system", type="system.start", payload=b'{"a": 1}')
    assert render.event_to_dict(system)["payload"] == {"a": 1}
    junk = pb.Event(index=5, topic="node", payload=b"\xff\xff\xff")
    assert render.event_to_dict(junk)["payload"] == base64.b64encode(b"\xff\xff\xff").decode()
    assert render.event_to_dict(pb.Event(index=6, topic="agent"))["payload"] is None


def test_event_lines_per_format() -> None:
    event = pb.Event(index=12, time_ms=1_700_000_000_123, topic="node", type="node.down", key="n1")
    event.payload = node(status=pb.NODE_STATUS_DOWN).SerializeToString()
    line = render.event_line(event, "table")
    assert line.split() == ["12", "2023-11-14T22:13:20.123Z", "node", "node.down", "n1"]
    assert render.event_line(event, "wide").endswith("down")
    assert json.loads(render.event_line(event, "json"))["index"] == 12
    assert yaml.safe_load(render.event_line(event, "yaml").removeprefix("---\n"))["key"] == "n1"


def test_table_and_wide() -> None:
    out = render.render(
        [node(), node(id="n2", eligible=False)], render.NODE_COLUMNS, "table", many=True
    )
    lines = out.splitlines()
    assert lines[0].split() == [
        "ID",
        "STATUS",
        "ELIGIBLE",
        "DRAINING",
        "CONNECTED",
        "HEARTBEAT",
        "LABELS",
    ]
    assert lines[1].split()[:3] == ["n1", "ready", "yes"]
    assert lines[2].split()[:3] == ["n2", "ready", "no"]
    assert "tier=gpu,zone=a" in lines[1]
    wide = render.render([node()], render.NODE_COLUMNS, "wide", many=True)
    assert "MEMORY" in wide and "0.0Gi/32.0Gi" in wide and "0/8" in wide
    assert render.render([], render.NODE_COLUMNS, "table", many=True) == "No resources found."


def test_json_and_yaml_one_or_many() -> None:
    one = json.loads(render.render([node()], render.NODE_COLUMNS, "json", many=False))
    assert one["id"] == "n1"
    many = json.loads(render.render([node()], render.NODE_COLUMNS, "json", many=True))
    assert [n["id"] for n in many] == ["n1"]
    assert (
        yaml.safe_load(render.render([node()], render.NODE_COLUMNS, "yaml", many=False))[
            "session_epoch"
        ]
        == 2**40
    )


def test_cells() -> None:
    assert render.age(0) == "-"
    assert render.age(1_000, now_ms=66_000) == "1m"
    assert render.age(0 + 1, now_ms=3 * 86_400_000) == "2d"
    assert render.text(b"a\nb") == "a\\nb"
    assert render.text(b"x" * 100, limit=10) == "x" * 9 + "…"
    assert render.cores(0.5) == "0.5" and render.cores(8.0) == "8"
    record = pb.CommandRecord(
        id="c", spec=pb.CommandSpec(kind="k", max_attempts=3), attempt=1, state=5
    )
    row = render.table([record], render.COMMAND_COLUMNS, wide=False).splitlines()[1].split()
    assert row[:5] == ["c", "k", "succeeded", "-", "1/3"]


def test_describe_is_one_line_with_target_status_and_trailers() -> None:
    err = grpc.aio.AioRpcError(
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.aio.Metadata(),
        grpc.aio.Metadata(("nexus-oldest-index", "40"), ("other", "x")),
        details="after_index 3 is older\nthan retention",
    )
    line = describe("h:1", err)
    assert (
        line == "h:1: OUT_OF_RANGE: after_index 3 is older than retention (nexus-oldest-index=40)"
    )


def _error(code: grpc.StatusCode, *trailers: tuple[str, str]) -> grpc.aio.AioRpcError:
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailers), "x")


def test_follow_resumes_only_where_resuming_loses_nothing() -> None:
    assert _resumable(_error(grpc.StatusCode.UNAVAILABLE))
    assert _resumable(_error(grpc.StatusCode.RESOURCE_EXHAUSTED, ("nexus-resume-after-index", "7")))
    assert not _resumable(_error(grpc.StatusCode.RESOURCE_EXHAUSTED, ("retry-after-ms", "5")))
    assert not _resumable(_error(grpc.StatusCode.OUT_OF_RANGE, ("nexus-oldest-index", "9")))
    assert not _resumable(_error(grpc.StatusCode.PERMISSION_DENIED))
