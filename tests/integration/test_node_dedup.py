"""Exactly once per node across restarts of the proxy: ``nexus-node --state-dir``.

A fleet is killed (SIGKILL, then SIGTERM) while commands run and results wait to be
reported, and restarted on the same state directory each time. The nodes' own durable
record (``<state-dir>/dedup.jsonl``) shows no attempt started twice and no command
succeeding twice on a node, while every command reaches a final state.
"""

from __future__ import annotations

import collections
import json
import re
import signal
import time
from pathlib import Path

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import ServerProcess, wait_for
from .test_commands import final_count, wait_ready_nodes

NODES = 4
COMMANDS = 300


def journal(state_dir: Path) -> list[dict[str, object]]:
    lines = (state_dir / "dedup.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def test_restarted_node_never_runs_a_command_twice(
    server: ServerProcess, fleet_factory: type, tmp_path: Path
) -> None:
    state = tmp_path / "node-state"
    # 0.3-1.5 s per command: some run when the fleet dies, some wait to be reported.
    args = ("--state-dir", str(state), "--exec-duration", "0.3-1.5", "--id-prefix", "dd-")
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        fleet = fleet_factory.create(server, NODES, *args)
        wait_ready_nodes(control, NODES, 30)
        reply = control.SubmitCommands(
            pb.SubmitCommandsRequest(
                commands=[
                    pb.CommandSpec(kind="echo", timeout_ms=60_000, max_attempts=5)
                    for _ in range(COMMANDS)
                ]
            ),
            timeout=30,
        )
        ids = [r.id for r in reply.results]
        assert len(ids) == COMMANDS and all(ids)
        for sig in (signal.SIGKILL, signal.SIGTERM):
            time.sleep(0.8)  # mid-run: some started, some finished and not yet reported
            fleet.stop(sig)
            fleet = fleet_factory.create(server, NODES, *args)
            wait_for(lambda f=fleet: "state dir" in f.log(), 20, message="fleet restarted")
        wait_for(lambda: final_count(control, ids) == COMMANDS, 90, 0.5, "all commands final")
        fleet.stop()
        states = collections.Counter(
            r.state
            for r in control.WaitCommands(pb.WaitCommandsRequest(ids=ids, timeout_ms=1), timeout=30)
        )
    assert states == {pb.COMMAND_STATE_SUCCEEDED: COMMANDS}, states
    entries = journal(state)
    starts = collections.Counter((e["n"], e["c"], e["a"]) for e in entries if e["s"] == "started")
    twice = [key for key, n in starts.items() if n > 1]
    assert not twice, f"attempts started twice on a node: {twice[:5]}"
    successes = collections.Counter(
        (e["n"], e["c"]) for e in entries if e["s"] == "finished" and e["ok"]
    )
    assert max(successes.values()) == 1
    assert {c for _, c in successes} == set(ids)  # every command succeeded somewhere, once
    # The restarts really hit work in flight: the restarted fleets said how much was cut.
    logs = "".join(f.log() for f in [fleet])
    interrupted = [int(n) for n in re.findall(r"(\d+) interrupted by the last exit", logs)]
    assert interrupted, logs
