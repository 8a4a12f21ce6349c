"""Pure-logic tests for nexus-node (no sockets): parsing, backoff, de-dup, usage, status."""

from __future__ import annotations

import asyncio
import json
import random
from pathlib import Path

import grpc
import pytest

from nexus_fast.node import (
    GIB,
    Action,
    DedupCache,
    Fleet,
    NodeContext,
    NodeSim,
    StatusSnapshot,
    agent_id_from_payload,
    backoff_delay,
    build_node_specs,
    classify_stream_end,
    default_channels,
    format_status,
    jittered,
    parse_args,
    parse_capacity,
    parse_cpu,
    parse_exec_duration,
    parse_labels,
    parse_size,
    register_error_is_fatal,
    sim,
    simulate_usage,
    spec,
)
from nexus_fast.pb import fabric_pb2 as pb

# ---------------------------------------------------------------- sizes and capacity


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("32GB", 32 * GIB),
        ("512MB", 512 * 1024**2),
        ("512mb", 512 * 1024**2),
        ("1.5GiB", 1.5 * GIB),
        ("100GB", 100 * GIB),
        ("2T", 2 * 1024**4),
        ("4Ki", 4096),
        ("1024", 1024),
        ("100B", 100),
        (" 8 GB ", 8 * GIB),
        (0, 0),
        (2048, 2048),
    ],
)
def test_parse_size(text: str | int, expected: float) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "abc", "-1GB", "1XB", "GB", "1iB", "1.2.3GB", "nan"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_parse_size_is_the_config_parser() -> None:
    # One implementation: the node spec wraps nexus_fast.units.parse_size (config re-exports it).
    from nexus_fast import config

    for text in ("32GB", "1.5GiB", "4Ki", "1024", "2T", "1e3", "1.5e2KB"):
        assert parse_size(text) == float(config.parse_size(text, exponent=True))
    assert parse_size(1.4) == 1.0
    with pytest.raises(ValueError):
        parse_size("9" * 400)


def test_parse_size_rejects_bool() -> None:
    with pytest.raises(ValueError):
        parse_size(True)


def test_parse_cpu() -> None:
    assert parse_cpu("8") == 8.0
    assert parse_cpu("0.5") == 0.5
    assert parse_cpu("500m") == 0.5
    assert parse_cpu(4) == 4.0
    for bad in ("-1", "x", "m", "inf"):
        with pytest.raises(ValueError):
            parse_cpu(bad)


def test_parse_capacity_full_and_defaults() -> None:
    cap = parse_capacity("cpu=8,memory=32GB,gpu=0,disk=100GB")
    assert cap == {"cpu": 8.0, "memory": 32 * GIB, "gpu": 0.0, "disk": 100 * GIB}
    partial = parse_capacity("gpu=2, memory=512MB")
    assert partial["gpu"] == 2.0
    assert partial["memory"] == 512 * 1024**2
    assert partial["cpu"] == spec.DEFAULT_CAPACITY["cpu"]  # untouched keys keep the default
    assert parse_capacity("") == spec.DEFAULT_CAPACITY


@pytest.mark.parametrize("text", ["cpu", "ram=1GB", "memory=lots", "gpu=-1", "=3"])
def test_parse_capacity_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_capacity(text)


def test_parse_labels() -> None:
    assert parse_labels("zone=a,tier=gpu") == {"zone": "a", "tier": "gpu"}
    assert parse_labels("") == {}
    assert parse_labels("zone=a|b|c") == {"zone": ["a", "b", "c"]}
    assert parse_labels("expr=a=b") == {"expr": "a=b"}
    with pytest.raises(ValueError):
        parse_labels("novalue")


def test_parse_exec_duration() -> None:
    assert parse_exec_duration("0.01") == (0.01, 0.01)
    assert parse_exec_duration("0.01-0.05") == (0.01, 0.05)
    assert parse_exec_duration("0") == (0.0, 0.0)
    for bad in ("", "x", "0.05-0.01", "-1", "0.1-"):
        with pytest.raises(ValueError):
            parse_exec_duration(bad)


# ---------------------------------------------------------------- argument parsing


def test_parse_args_defaults() -> None:
    args = parse_args([])
    assert args.target == "127.0.0.1:50053"
    assert len(args.node_specs) == spec.DEFAULT_NODES
    assert args.node_specs[0].node_id == "node-00000"
    assert args.duration == 0.0
    assert args.status_interval == 5.0
    assert args.deregister_on_exit is False
    assert args.exec_duration == (0.01, 0.01)
    assert args.failure_rate == 0.0
    assert args.channels is None
    assert args.node_specs[0].capacity == spec.DEFAULT_CAPACITY


def test_parse_args_full() -> None:
    args = parse_args(
        [
            "--nodes",
            "1000",
            "--id-prefix",
            "n-",
            "--labels",
            "zone=a,tier=gpu",
            "--capacity",
            "cpu=4,memory=512MB",
            "--channels",
            "3",
            "--duration",
            "10",
            "--exec-duration",
            "0.01-0.05",
            "--failure-rate",
            "0.25",
            "--json-status",
            "--deregister-on-exit",
            "--record",
            "/tmp/x.jsonl",
        ]
    )
    specs = args.node_specs
    assert len(specs) == 1000
    assert specs[0].node_id == "n-00000"
    assert specs[-1].node_id == "n-00999"
    assert all(s.labels == {"zone": "a", "tier": "gpu"} for s in specs)
    assert specs[0].capacity["memory"] == 512 * 1024**2
    assert specs[0].capacity["cpu"] == 4.0
    assert args.channels == 3
    assert args.exec_duration == (0.01, 0.05)
    assert args.failure_rate == 0.25
    assert args.json_status and args.deregister_on_exit


def test_id_width_grows_past_five_digits() -> None:
    specs = build_node_specs([{"count": 100_001}])
    assert specs[0].node_id == "node-000000"
    assert specs[-1].node_id == "node-100000"


@pytest.mark.parametrize(
    "argv",
    [
        ["--failure-rate", "1.5"],
        ["--capacity", "cpu=x"],
        ["--exec-duration", "0.5-0.1"],
        ["--channels", "0"],
        ["--nodes", "-3"],
        ["--duration", "-1"],
        ["--tls-cert", "c.pem"],
        ["--nodes", "0"],
    ],
)
def test_parse_args_rejects(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(argv)


def test_default_channels() -> None:
    assert default_channels(1) == 1
    assert default_channels(250) == 1
    assert default_channels(251) == 2
    assert default_channels(1000) == 4
    assert default_channels(0) == 1


def test_label_cycling_on_command_line() -> None:
    args = parse_args(["--nodes", "4", "--labels", "zone=a|b|c,rack=r{i}"])
    assert [s.labels["zone"] for s in args.node_specs] == ["a", "b", "c", "a"]
    assert [s.labels["rack"] for s in args.node_specs] == ["r0", "r1", "r2", "r3"]


# ---------------------------------------------------------------- spec files

TOML_SPEC = """
[[groups]]
count = 4
labels = { tier = "cpu", zone = ["a", "b", "c"], rack = "r{g}", name = "{id}" }
capacity = { cpu = 16, memory = "64GB" }

[[groups]]
count = 2
id_prefix = "gpu-"
labels = { tier = "gpu", idx = "{i:03d}" }
capacity = { gpu = 8 }
"""


def test_spec_toml(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(TOML_SPEC)
    args = parse_args(["--spec", str(path), "--labels", "pool=sim,tier=any"])
    specs = args.node_specs
    assert [s.node_id for s in specs] == [
        "node-00000",
        "node-00001",
        "node-00002",
        "node-00003",
        "gpu-00000",
        "gpu-00001",
    ]
    assert [s.labels["zone"] for s in specs[:4]] == ["a", "b", "c", "a"]
    assert specs[1].labels == {
        "pool": "sim",
        "tier": "cpu",
        "zone": "b",
        "rack": "r1",
        "name": "node-00001",
    }
    assert specs[0].capacity["cpu"] == 16.0
    assert specs[0].capacity["memory"] == 64 * GIB
    assert specs[0].capacity["gpu"] == 0.0  # from the --capacity default
    assert specs[4].labels == {"pool": "sim", "tier": "gpu", "idx": "004"}
    assert specs[5].capacity["gpu"] == 8.0
    assert [s.index for s in specs] == list(range(6))


def test_spec_json_list_and_object(tmp_path: Path) -> None:
    groups = [{"count": 2, "labels": {"zone": "z{g}"}, "capacity": {"memory": 1024}}]
    for name, doc in (("a.json", groups), ("b.json", {"groups": groups}), ("c.spec", groups)):
        path = tmp_path / name
        path.write_text(json.dumps(doc))
        specs = parse_args(["--spec", str(path)]).node_specs
        assert [s.labels["zone"] for s in specs] == ["z0", "z1"]
        assert specs[0].capacity["memory"] == 1024.0


@pytest.mark.parametrize(
    "doc",
    [
        [],
        {"groups": []},
        [{"labels": {}}],
        [{"count": -1}],
        [{"count": True}],
        [{"count": 1, "colour": "red"}],
        [{"count": 1, "labels": {"a": 3}}],
        [{"count": 1, "labels": {"a": []}}],
        [{"count": 1, "labels": {"a": "{nope}"}}],
        [{"count": 1, "capacity": {"cpu": "lots"}}],
        [{"count": 1, "capacity": {"ram": 1}}],
        "not a list",
    ],
)
def test_spec_rejects(tmp_path: Path, doc: object) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(SystemExit):
        parse_args(["--spec", str(path)])


def test_spec_duplicate_ids_rejected() -> None:
    # "x" + 6 digits (100001 nodes) reaches "x100000" == "x1" + "00000"
    with pytest.raises(ValueError, match="duplicate"):
        build_node_specs([{"count": 100_001, "id_prefix": "x"}, {"count": 1, "id_prefix": "x1"}])


def test_spec_with_nodes_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "fleet.toml"
    path.write_text(TOML_SPEC)
    with pytest.raises(SystemExit):
        parse_args(["--spec", str(path), "--nodes", "3"])


def test_spec_missing_file_and_bad_toml(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--spec", str(tmp_path / "missing.toml")])
    bad = tmp_path / "bad.toml"
    bad.write_text("[[groups]\ncount = ")
    with pytest.raises(SystemExit):
        parse_args(["--spec", str(bad)])


# ---------------------------------------------------------------- backoff and jitter


def test_backoff_bounds() -> None:
    rng = random.Random(1)
    for attempt in range(0, 80):
        ceiling = min(10.0, 0.2 * 2**attempt)
        for _ in range(50):
            delay = backoff_delay(attempt, rng=rng)
            assert 0.0 <= delay <= ceiling
    # full jitter actually spreads: not every sample is at the ceiling
    samples = [backoff_delay(10, rng=rng) for _ in range(200)]
    assert max(samples) <= 10.0
    assert min(samples) < 2.0
    assert backoff_delay(10**6, rng=rng) <= 10.0  # no overflow for huge attempts
    assert backoff_delay(-5, rng=rng) <= 0.2


def test_jitter_bounds() -> None:
    rng = random.Random(2)
    values = [jittered(1.0, rng) for _ in range(1000)]
    assert all(0.9 <= v <= 1.1 for v in values)
    assert max(values) - min(values) > 0.1


# ---------------------------------------------------------------- de-dup cache


def test_dedup_lru_eviction_and_recency() -> None:
    cache = DedupCache(3)
    for i in range(3):
        cache.put(f"k{i}", (True, b"ok", "", 1))
    assert cache.get("k0") == (True, b"ok", "", 1)  # k0 becomes most recent
    cache.put("k3", (False, b"", "boom", 1))
    assert "k1" not in cache  # least recently used went first
    assert "k0" in cache and "k2" in cache and "k3" in cache
    assert len(cache) == 3
    assert cache.evictions == 1
    assert cache.get("k1") is None
    for i in range(100):
        cache.put(f"x{i}", (True, b"", "", 1))
    assert len(cache) == 3


def test_dedup_key_separates_nodes() -> None:
    assert DedupCache.key("n1", "c1") != DedupCache.key("n2", "c1")
    assert DedupCache.key("a", "bc") != DedupCache.key("ab", "c")
    with pytest.raises(ValueError):
        DedupCache(0)


# ---------------------------------------------------------------- usage model


def test_usage_bounded_by_capacity() -> None:
    cap = {"cpu": 8.0, "memory": 32.0 * GIB, "gpu": 2.0, "disk": 100.0 * GIB}
    base = dict.fromkeys(cap, 0.5)
    rng = random.Random(3)
    for running, agents in [(0, 0), (1, 0), (10, 3), (10_000, 500), (0, 100)]:
        usage = simulate_usage(cap, base, running, agents)
        for key, value in usage.items():
            assert 0.0 <= value <= cap[key], (key, value)
    for _ in range(200):
        b = {k: rng.uniform(0, 1) for k in cap}
        usage = simulate_usage(cap, b, rng.randint(0, 100), rng.randint(0, 20))
        assert all(0.0 <= usage[k] <= cap[k] for k in cap)


def test_usage_grows_with_work_and_handles_zero_capacity() -> None:
    cap = {"cpu": 8.0, "memory": 32.0 * GIB, "gpu": 0.0, "disk": 100.0 * GIB}
    base = dict.fromkeys(cap, 0.1)
    idle = simulate_usage(cap, base, 0, 0)
    busy = simulate_usage(cap, base, 4, 1)
    assert busy["cpu"] > idle["cpu"] > 0
    assert busy["memory"] > idle["memory"]
    assert busy["gpu"] == 0.0  # no GPUs: never any GPU usage
    assert simulate_usage({}, base, 5, 5) == dict.fromkeys(spec.RESOURCE_KEYS, 0.0)


# ---------------------------------------------------------------- status lines


def _snap(elapsed: float, **counters: int) -> StatusSnapshot:
    return StatusSnapshot(
        elapsed=elapsed,
        cpu_seconds=elapsed * 0.1,
        nodes=1000,
        connected=998,
        registered=1000,
        counters=sim.Stats(**counters),
    )


def test_status_line_text() -> None:
    prev = _snap(5.0, heartbeats=5000, executed=100)
    snap = _snap(10.0, heartbeats=10_000, executed=600, reconnects=3, errors=2, failed=1)
    line = format_status(snap, prev)
    assert "\n" not in line
    assert "nodes=1000" in line and "connected=998" in line and "registered=1000" in line
    assert "hb/s=1000.0" in line
    assert "cmds=600 (100.0/s)" in line
    assert "reconnects=3" in line and "errors=2" in line and "failed=1" in line
    assert "cpu=10.0%" in line
    assert "superseded" not in line  # zero-valued extras stay out of the text line
    snap.superseded = 2
    assert "superseded=2" in format_status(snap, prev)


def test_status_line_json() -> None:
    prev = _snap(5.0, heartbeats=5000)
    snap = _snap(10.0, heartbeats=10_000, executed=50)
    doc = json.loads(format_status(snap, prev, as_json=True))
    assert doc["nodes"] == 1000
    assert doc["connected"] == 998
    assert doc["heartbeats_per_s"] == 1000.0
    assert doc["commands_per_s"] == 10.0
    assert doc["executed"] == 50
    assert doc["heartbeats"] == 10_000
    assert doc["cpu_percent"] == 10.0
    # since-start rates when there is no previous snapshot; zero elapsed must not divide by 0
    assert json.loads(format_status(_snap(0.0), None, as_json=True))["heartbeats_per_s"] == 0.0


# ---------------------------------------------------------------- stream-end policy


@pytest.mark.parametrize(
    ("code", "details", "action"),
    [
        (grpc.StatusCode.OK, "", Action.RECONNECT),
        (grpc.StatusCode.UNAVAILABLE, "server shutting down", Action.RECONNECT),
        (grpc.StatusCode.CANCELLED, "", Action.RECONNECT),
        (grpc.StatusCode.INTERNAL, "", Action.RECONNECT),
        (grpc.StatusCode.FAILED_PRECONDITION, "stale epoch", Action.REREGISTER),
        (grpc.StatusCode.NOT_FOUND, "unknown node", Action.REREGISTER),
        (grpc.StatusCode.ABORTED, "Superseded by a newer session", Action.SUPERSEDED),
        (grpc.StatusCode.ABORTED, "something else", Action.RECONNECT),
        (grpc.StatusCode.ABORTED, None, Action.RECONNECT),
        (grpc.StatusCode.INVALID_ARGUMENT, "first message", Action.FATAL),
    ],
)
def test_classify_stream_end(code: grpc.StatusCode, details: str | None, action: Action) -> None:
    assert classify_stream_end(code, details) is action


def test_register_fatal_codes() -> None:
    assert register_error_is_fatal(grpc.StatusCode.INVALID_ARGUMENT)
    assert not register_error_is_fatal(grpc.StatusCode.UNAVAILABLE)
    assert not register_error_is_fatal(grpc.StatusCode.DEADLINE_EXCEEDED)


def test_agent_id_from_payload() -> None:
    assert agent_id_from_payload(b'{"agent_id": "a1", "image": "x"}', "c") == "a1"
    assert agent_id_from_payload(b'{"id": 7}', "c") == "7"
    assert agent_id_from_payload(b'"a2"', "c") == "a2"
    assert agent_id_from_payload(b"plain-name", "c") == "plain-name"
    assert agent_id_from_payload(b"", "c") == "c"
    assert agent_id_from_payload(b"[1, 2]", "c") == "c"
    assert agent_id_from_payload(b'{"agent_id": ""}', "c") == "c"
    assert agent_id_from_payload(b"\xff\xfe", "c") != ""


# ---------------------------------------------------------------- command handling (no sockets)


def _node(tmp_path: Path, *extra: str) -> tuple[Fleet, NodeSim]:
    args = parse_args(
        ["--nodes", "1", "--seed", "7", "--record", str(tmp_path / "r.jsonl"), *extra]
    )
    fleet = Fleet(args, args.node_specs)
    fleet._record_fp = (tmp_path / "r.jsonl").open("a")
    return fleet, fleet.nodes[0]


def _cmd(cid: str, attempt: int = 1, kind: str = "run", payload: bytes = b"") -> pb.Command:
    return pb.Command(id=cid, kind=kind, attempt=attempt, payload=payload)


def test_commands_ack_execute_once_and_replay_result(tmp_path: Path) -> None:
    async def scenario() -> None:
        fleet, node = _node(tmp_path, "--exec-duration", "0.01")
        node.handle_control(pb.ControlMessage(commands=[_cmd("c1"), _cmd("c2")]))
        # acks for the whole batch are queued at once and go out in one message
        first = node.build_message(heartbeat=False, all_agents=False)
        assert first is not None
        assert [a.command_id for a in first.acks] == ["c1", "c2"]
        assert not first.results
        # a redelivery while running is acked but not started again
        node.handle_control(pb.ControlMessage(commands=[_cmd("c1", attempt=2)]))
        await asyncio.sleep(0.05)
        msg = node.build_message(heartbeat=False, all_agents=False)
        assert msg is not None
        results = {r.command_id: r for r in msg.results}
        assert set(results) == {"c1", "c2"}
        assert results["c1"].attempt == 2 and results["c1"].success
        assert results["c1"].output == b"ok"
        assert fleet.stats.executed == 2
        # a redelivery after completion gets the stored result, no new execution
        node.handle_control(pb.ControlMessage(commands=[_cmd("c2", attempt=3)]))
        replay = node.build_message(heartbeat=False, all_agents=False)
        assert replay is not None
        assert [(r.command_id, r.attempt, r.success) for r in replay.results] == [("c2", 3, True)]
        assert fleet.stats.executed == 2
        assert fleet.stats.duplicates == 2
        fleet.flush_record()
        rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
        assert sorted((r["command_id"], r["success"]) for r in rows) == [
            ("c1", True),
            ("c2", True),
        ]

    asyncio.run(scenario())


def test_cancel_and_failure_rate(tmp_path: Path) -> None:
    async def scenario() -> None:
        fleet, node = _node(tmp_path, "--exec-duration", "5", "--failure-rate", "1")
        node.handle_control(pb.ControlMessage(commands=[_cmd("long")], cancel_command_ids=["x"]))
        node.handle_control(pb.ControlMessage(cancel_command_ids=["long"]))
        msg = node.build_message(heartbeat=False, all_agents=False)
        assert msg is not None
        [result] = msg.results
        assert (result.command_id, result.success, result.error) == ("long", False, "cancelled")
        assert fleet.stats.cancelled == 1
        assert not node._running
        fleet.ctx.exec_range = (0.0, 0.0)
        node.handle_control(pb.ControlMessage(commands=[_cmd("f")]))
        await asyncio.sleep(0.01)
        msg = node.build_message(heartbeat=False, all_agents=False)
        assert msg is not None
        assert [(r.command_id, r.success) for r in msg.results] == [("f", False)]
        assert msg.results[0].error == "simulated failure"

    asyncio.run(scenario())


def test_agents_reported_and_usage_in_heartbeat(tmp_path: Path) -> None:
    async def scenario() -> None:
        _fleet, node = _node(tmp_path, "--exec-duration", "0")
        start = _cmd("s1", kind="agent.start", payload=b'{"agent_id": "ag-1"}')
        node.handle_control(pb.ControlMessage(commands=[start]))
        await asyncio.sleep(0.01)
        msg = node.build_message(heartbeat=True, all_agents=False)
        assert msg is not None
        assert [(a.agent_id, a.state) for a in msg.agents] == [("ag-1", "running")]
        assert msg.HasField("heartbeat")
        usage = msg.heartbeat.usage
        cap = node.spec.capacity
        assert 0 < usage.cpu <= cap["cpu"] and 0 < usage.memory <= cap["memory"]
        stop = _cmd("s2", kind="agent.stop", payload=b'{"agent_id": "ag-1"}')
        node.handle_control(pb.ControlMessage(commands=[stop]))
        await asyncio.sleep(0.01)
        msg = node.build_message(heartbeat=False, all_agents=False)
        assert msg is not None
        assert [(a.agent_id, a.state) for a in msg.agents] == [("ag-1", "stopped")]
        # a new session re-reports every known agent
        msg = node.build_message(heartbeat=True, all_agents=True)
        assert msg is not None
        assert [(a.agent_id, a.state) for a in msg.agents] == [("ag-1", "stopped")]

    asyncio.run(scenario())


def test_config_drain_and_batch_limit(tmp_path: Path) -> None:
    async def scenario() -> None:
        _fleet, node = _node(tmp_path, "--exec-duration", "10")
        node.handle_control(
            pb.ControlMessage(
                config=pb.NodeConfig(heartbeat_interval_ms=250, max_batch_size=2),
                drain=pb.DrainNotice(draining=True, reason="maintenance"),
                commands=[_cmd(f"c{i}") for i in range(5)],
            )
        )
        assert node.interval_s == 0.25
        assert node.draining and node.drain_reason == "maintenance"
        sizes = []
        while (msg := node.build_message(heartbeat=False, all_agents=False)) is not None:
            sizes.append(len(msg.acks))
        assert sizes == [2, 2, 1]
        node.apply_config(pb.NodeConfig(heartbeat_interval_ms=1))
        assert node.interval_s == sim.MIN_HEARTBEAT_S
        node.apply_config(pb.NodeConfig())  # zero = keep the current value
        assert node.interval_s == sim.MIN_HEARTBEAT_S
        for exe in node._running.values():
            assert exe.handle is not None
            exe.handle.cancel()

    asyncio.run(scenario())


def test_failed_write_requeues_results(tmp_path: Path) -> None:
    async def scenario() -> None:
        _fleet, node = _node(tmp_path, "--exec-duration", "0")
        node.handle_control(pb.ControlMessage(commands=[_cmd("a"), _cmd("b")]))
        await asyncio.sleep(0.01)
        msg = node.build_message(heartbeat=False, all_agents=False)
        assert msg is not None and len(msg.results) == 2
        node._requeue(msg)
        again = node.build_message(heartbeat=False, all_agents=False)
        assert again is not None
        assert [r.command_id for r in again.results] == ["a", "b"]
        assert not again.acks  # acks of a dead stream are dropped; redelivery re-acks

    asyncio.run(scenario())


def test_node_runs_on_a_context_without_a_fleet() -> None:
    """NodeSim needs only its NodeContext: counters, de-dup and records go through it."""
    recorded: list[tuple[str, str, bool]] = []

    def record(node_id: str, command: pb.Command, attempt: int, ok: bool, error: str) -> None:
        recorded.append((node_id, command.id, ok))

    async def scenario() -> None:
        ctx = NodeContext(stub=lambda i, t: None, record=record, exec_range=(0.0, 0.0))
        spec = build_node_specs([{"count": 1}])[0]
        node = NodeSim(ctx, spec, 0)
        node.handle_control(pb.ControlMessage(commands=[_cmd("x1")]))
        await asyncio.sleep(0.01)
        msg = node.build_message(heartbeat=False, all_agents=False)
        assert msg is not None and [r.command_id for r in msg.results] == ["x1"]
        assert ctx.stats.executed == 1 and len(ctx.dedup) == 1
        assert recorded == [(spec.node_id, "x1", True)]

    asyncio.run(scenario())


def test_zero_duration_command_sends_ack_and_result_in_one_message(tmp_path: Path) -> None:
    async def scenario() -> None:
        _fleet, node = _node(tmp_path, "--exec-duration", "0")
        node.handle_control(pb.ControlMessage(commands=[_cmd("z1"), _cmd("z2")]))
        # No loop turn in between: the results are ready with the acks.
        msg = node.build_message(heartbeat=False, all_agents=False)
        assert msg is not None
        assert [a.command_id for a in msg.acks] == ["z1", "z2"]
        assert [(r.command_id, r.success) for r in msg.results] == [("z1", True), ("z2", True)]
        assert node.build_message(heartbeat=False, all_agents=False) is None

    asyncio.run(scenario())


class _WriteRecorder:
    """A Connect call that records writes; ``gate`` (when set) holds each write open."""

    def __init__(self) -> None:
        self.written: list[pb.NodeMessage] = []
        self.gate: asyncio.Event | None = None

    async def write(self, msg: pb.NodeMessage) -> None:
        self.written.append(msg)
        if self.gate is not None:
            await self.gate.wait()


async def _turns(n: int) -> None:
    for _ in range(n):
        await asyncio.sleep(0)


def test_writer_sends_at_once_when_idle_and_batches_while_a_write_is_in_flight(
    tmp_path: Path,
) -> None:
    async def scenario() -> None:
        _fleet, node = _node(tmp_path, "--exec-duration", "0")
        node.epoch = 1
        call = _WriteRecorder()
        writer = asyncio.get_running_loop().create_task(node._writer(call))  # type: ignore[arg-type]
        await _turns(3)
        assert len(call.written) == 1  # the first message (identity + heartbeat)
        # Idle stream: a lone result leaves within a couple of loop turns, not after a hold.
        node.handle_control(pb.ControlMessage(commands=[_cmd("a")]))
        await _turns(3)
        assert len(call.written) == 2
        assert [r.command_id for r in call.written[1].results] == ["a"]
        # A write in flight: what arrives meanwhile waits for it and shares the next message.
        call.gate = asyncio.Event()
        node.handle_control(pb.ControlMessage(commands=[_cmd("b")]))
        await _turns(3)
        assert len(call.written) == 3  # "b" is being written (held open)
        node.handle_control(pb.ControlMessage(commands=[_cmd("c")]))
        node.handle_control(pb.ControlMessage(commands=[_cmd("d")]))
        await _turns(3)
        assert len(call.written) == 3  # nothing overtakes the write in flight
        call.gate.set()
        call.gate = None
        await _turns(3)
        assert len(call.written) == 4
        assert [r.command_id for r in call.written[3].results] == ["c", "d"]
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)

    asyncio.run(scenario())


def test_coalesce_hold_option_holds_before_sending(tmp_path: Path) -> None:
    _fleet, node = _node(tmp_path, "--coalesce-hold", "0.002")
    assert node.ctx.coalesce_hold_s == 0.002
    _fleet, node = _node(tmp_path)
    assert node.ctx.coalesce_hold_s == 0.0
