"""Clients given several targets fail over between them (nexus_fast/node/targets.py).

Real ``nexus-fast`` processes in embedded mode (no etcd): a "replica" that dies is a
server killed with SIGKILL, and the one that takes over is a server restarted on the same
data directory on other ports that are in the client's target list. A dead target is a
free loopback port nobody listens on (connection refused: ``UNAVAILABLE``).
"""

from __future__ import annotations

import collections
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nexus_fast.benchmark.procs import free_ports
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import HOST, ServerProcess, wait_for
from .test_commands import final_count, wait_ready_nodes

pytestmark = pytest.mark.integration

_SCRIPT = Path(sys.executable).with_name("nexusctl")
NEXUSCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "nexus_fast.ctl"]


def dead_target() -> str:
    """A loopback port with no listener (connection refused)."""
    return f"{HOST}:{free_ports(1)[0]}"


def submit(control: pb_grpc.ControlServiceStub, n: int, **spec: object) -> list[str]:
    reply = control.SubmitCommands(
        pb.SubmitCommandsRequest(
            commands=[pb.CommandSpec(kind="echo", timeout_ms=60_000, **spec) for _ in range(n)]  # type: ignore[arg-type]
        ),
        timeout=30,
    )
    ids = [r.id for r in reply.results]
    assert len(ids) == n and all(ids)
    return ids


def succeeded(control: pb_grpc.ControlServiceStub, ids: list[str]) -> collections.Counter[int]:
    return collections.Counter(
        r.state
        for r in control.WaitCommands(pb.WaitCommandsRequest(ids=ids, timeout_ms=1), timeout=30)
    )


def test_node_skips_a_dead_target(
    server: ServerProcess, fleet_factory: type, tmp_path: Path
) -> None:
    # Node 0 starts on the dead target (i mod 2 = 0) and must move to the good one.
    fleet = fleet_factory.create(f"{dead_target()},{server.grpc_target}", 2, "--ramp", "0")
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        wait_ready_nodes(control, 2, 30)
        ids = submit(control, 20)
        wait_for(lambda: final_count(control, ids) == 20, 30, 0.2, "commands final")
        assert succeeded(control, ids) == {pb.COMMAND_STATE_SUCCEEDED: 20}
    wait_for(lambda: "failovers=" in fleet.log(), 10, message="the fleet counted a failover")
    fleet.stop()


def journal(state_dir: Path) -> list[dict[str, object]]:
    lines = (state_dir / "dedup.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_node_follows_a_killed_server_to_another_target_and_runs_nothing_twice(
    server_factory: type, fleet_factory: type, tmp_path: Path
) -> None:
    first = server_factory.create().start()
    second = server_factory.create(data_dir=first.data_dir)  # same data, other ports
    state = tmp_path / "node-state"
    record = tmp_path / "record.jsonl"
    # One node: the core has nowhere else to retry a command whose result died with the
    # server, so "ran once" holds for the command, not only per node.
    fleet = fleet_factory.create(
        f"{first.grpc_target},{second.grpc_target}",
        1,
        "--ramp",
        "0",
        "--state-dir",
        str(state),
        "--record",
        str(record),
        "--exec-duration",
        "0.5-1.5",  # some run, some wait to be reported when the server dies
        "--id-prefix",
        "fo-",
    )
    with first.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        wait_ready_nodes(control, 1, 30)
        before = submit(control, 40, max_attempts=5)
        wait_for(
            lambda: (state / "dedup.jsonl").exists() and len(journal(state)) >= 10,
            20,
            0.05,
            "commands started on the nodes",
        )
    first.kill()  # SIGKILL: results in flight are lost with it
    second.start()
    with second.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        wait_for(lambda: "failovers=" in fleet.log(), 20, message="the nodes failed over")
        wait_ready_nodes(control, 1, 30)
        wait_for(lambda: final_count(control, before) == 40, 60, 0.25, "old commands final")
        after = submit(control, 20)
        wait_for(lambda: final_count(control, after) == 20, 30, 0.25, "new commands final")
        states = succeeded(control, before + after)
    fleet.stop()
    assert states == {pb.COMMAND_STATE_SUCCEEDED: 60}, states
    entries = journal(state)
    starts = collections.Counter((e["n"], e["c"], e["a"]) for e in entries if e["s"] == "started")
    assert max(starts.values()) == 1, [k for k, n in starts.items() if n > 1][:5]
    runs = collections.Counter(
        json.loads(line)["command_id"] for line in record.read_text().splitlines() if line
    )
    assert set(runs) == set(before + after)
    assert max(runs.values()) == 1, [c for c, n in runs.items() if n > 1][:5]
    # The new server re-delivered what the old one had in flight: answered, not run again.
    final = [line for line in fleet.log().splitlines() if line.startswith("final ")][-1]
    assert int(re.search(r" dup=(\d+)", final).group(1)) > 0, final  # type: ignore[union-attr]


def nexusctl(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NEXUSCTL, *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def test_nexusctl_with_a_dead_first_target(server: ServerProcess, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("NEXUS_TOKEN", "NEXUS_HTTP")}
    env["NEXUSCTL_CONFIG"] = str(tmp_path / "none.toml")
    env["NEXUS_TARGET"] = f"{dead_target()},{server.grpc_target}"
    listed = nexusctl("nodes", "ls", "-o", "json", env=env)
    assert listed.returncode == 0, listed.stderr
    # A submit without a key gets one per invocation: a retry cannot make a second command.
    made = nexusctl(
        "commands", "submit", "--kind", "echo", "--target", dead_target(),
        "--target", server.grpc_target, "-o", "json", env=env,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    command_id = json.loads(made.stdout)["id"]
    assert command_id.startswith("ctl-"), made.stdout
    shown = nexusctl("commands", "get", command_id, "-o", "json", env=env)
    assert shown.returncode == 0 and json.loads(shown.stdout)["id"] == command_id
    # Every target dead: exit 3, bounded by the request timeout, naming the targets.
    env["NEXUS_TARGET"] = f"{dead_target()},{dead_target()}"
    started = time.monotonic()
    dead = nexusctl("nodes", "ls", "--request-timeout", "3", env=env)
    assert dead.returncode == 3, (dead.stdout, dead.stderr)
    assert "UNAVAILABLE" in dead.stderr and "failing over" in dead.stderr, dead.stderr
    assert time.monotonic() - started < 20


def test_bench_spreads_over_targets_and_retries_submits_elsewhere(
    server: ServerProcess, tmp_path: Path
) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [
            sys.executable, "-m", "nexus_fast.benchmark.cli", "dispatch",
            "--target", f"{dead_target()},{server.grpc_target}",
            "--http", str(server.http_port), "--duration", "2", "--nodes", "4",
            "--json", str(out),
        ],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    ours = json.loads(out.read_text())["results"][0]
    extra = ours["extra"]
    assert ours["errors"] == 0 and extra["received_by_nodes"] == extra["submitted"] > 0
    # The first submit met the dead target and went again (same keys) to the good one;
    # the nodes placed on the dead target registered on the good one instead.
    assert extra["submit_retries"] >= 1 and extra["node_register_retries"] >= 1, extra
    assert extra["server_final_states"]["succeeded"] == ours["count"]
    assert "retried on another target" in proc.stdout
