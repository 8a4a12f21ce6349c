"""``nexusctl`` against the real server: every subcommand runs as the installed console
script in a subprocess, against one ``nexus-fast`` process and two ``nexus-node`` fleets
(two good nodes, one whose commands always fail), shared by the module.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from nexus_fast.benchmark.procs import free_ports

from .conftest import HOST, Fleet, ServerProcess, wait_for

pytestmark = pytest.mark.integration

# The console script `make install` puts next to the interpreter; `python -m` otherwise.
_SCRIPT = Path(sys.executable).with_name("nexusctl")
NEXUSCTL = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "nexus_fast.ctl"]


class Env:
    """The module's server and fleets, and a runner for nexusctl against them."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.server = ServerProcess(tmp / "data", tmp / "server.log").start()
        self.restarted: ServerProcess | None = None
        self.fleets = [
            Fleet(self.server.grpc_target, 2, tmp / "good.log", "--labels", "tier=ok,zone=a|b"),
            Fleet(
                self.server.grpc_target,
                1,
                tmp / "bad.log",
                "--id-prefix",
                "bad-",
                "--labels",
                "tier=bad",
                "--failure-rate",
                "1",
            ),
        ]
        self.env = dict(os.environ)
        for name in ("NEXUS_TOKEN", "NEXUS_HTTP"):
            self.env.pop(name, None)
        self.env["NEXUS_TARGET"] = self.server.grpc_target
        self.env["NEXUSCTL_CONFIG"] = str(tmp / "nexusctl.toml")

    def run(self, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*NEXUSCTL, *args],
            input=stdin,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )

    def ok(self, *args: str, stdin: str | None = None) -> str:
        result = self.run(*args, stdin=stdin)
        assert result.returncode == 0, (args, result.stdout, result.stderr)
        assert result.stderr == "", result.stderr
        return result.stdout

    def json(self, *args: str, stdin: str | None = None) -> Any:
        return json.loads(self.ok(*args, "-o", "json", stdin=stdin))

    def events(self, *args: str) -> list[dict[str, Any]]:
        return [
            json.loads(line) for line in self.ok("events", "tail", "-o", "json", *args).splitlines()
        ]

    def close(self) -> None:
        for fleet in self.fleets:
            if fleet.proc.poll() is None:
                fleet.proc.kill()
                fleet.proc.wait()
        for server in (self.server, self.restarted):
            if server is not None:
                server.kill()


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    env = Env(tmp_path_factory.mktemp("nexusctl"))
    try:
        wait_for(
            lambda: (
                sorted(n["id"] for n in env.json("nodes", "ls", "--status", "ready"))
                == ["bad-00000", "node-00000", "node-00001"]
            ),
            timeout=30,
            interval=0.3,
            message="three ready nodes",
        )
        yield env
    finally:
        env.close()


def by_id(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["id"]: item for item in items}


def test_status_gprc_and_http(env: Env) -> None:
    doc = env.json("status", "--http", str(env.server.http_port))
    assert doc["grpc_health"] == "SERVING"
    assert doc["leader"] == "single"
    assert doc["state"] == "ready" and doc["status"] == "healthy"
    assert set(doc["implementation"]) >= {"queue", "ring", "scoring"}
    table = env.ok("status", "--http", str(env.server.http_port))
    rows = dict(line.split(None, 1) for line in table.splitlines())
    assert rows["GRPC-HEALTH"].strip() == "SERVING" and rows["LEADER"].strip() == "single"
    assert "queue=" in rows["IMPLEMENTATION"]
    # Without --http: gRPC health only.
    assert "state" not in env.json("status")


def test_contexts_reach_the_server(env: Env) -> None:
    env.ok(
        "config",
        "set-context",
        "here",
        "--target",
        env.server.grpc_target,
        "--http",
        env.server.http_base,
    )
    env.ok("config", "set-context", "nowhere", "--target", f"{HOST}:1")
    env.ok("config", "use-context", "here")
    saved = env.env.pop("NEXUS_TARGET")
    try:
        assert env.json("status")["state"] == "ready"  # http comes from the context
        dead = env.run("--context", "nowhere", "nodes", "ls")
        assert dead.returncode == 3 and f"{HOST}:1" in dead.stderr
    finally:
        env.env["NEXUS_TARGET"] = saved


def test_nodes_ls_get_filters_and_formats(env: Env) -> None:
    nodes = by_id(env.json("nodes", "ls"))
    assert nodes["node-00000"]["status"] == "NODE_STATUS_READY"
    assert nodes["node-00000"]["labels"] == {"tier": "ok", "zone": "a"}
    assert isinstance(nodes["node-00000"]["last_heartbeat_ms"], int)
    assert [n["id"] for n in env.json("nodes", "ls", "--label", "zone=b")] == ["node-00001"]
    assert [n["id"] for n in env.json("nodes", "ls", "--label", "tier=bad")] == ["bad-00000"]
    assert len(env.json("nodes", "ls", "--limit", "2")) == 2
    table = env.ok("nodes", "ls").splitlines()
    assert table[0].split()[:2] == ["ID", "STATUS"]
    assert sorted(line.split()[0] for line in table[1:]) == [
        "bad-00000",
        "node-00000",
        "node-00001",
    ]
    assert "ADDRESS" in env.ok("nodes", "ls", "-o", "wide").splitlines()[0]
    got = yaml.safe_load(env.ok("nodes", "get", "node-00001", "-o", "yaml"))
    assert got["id"] == "node-00001" and got["connected"] is True
    missing = env.run("nodes", "get", "node-nope")
    assert missing.returncode == 3
    assert missing.stderr.strip().splitlines() == [
        f"Error: {env.server.grpc_target}: NOT_FOUND: node 'node-nope' not found"
    ]


def test_submit_wait_succeeds_and_the_records_read_back(env: Env) -> None:
    payload = env.tmp / "payload.json"
    payload.write_bytes(b'{"job": 1}')
    record = env.json(
        "commands", "submit", "--kind", "echo", "--payload", f"@{payload}",
        "--target-node", "node-00000", "--priority", "2", "--timeout", "20s",
        "--max-attempts", "2", "--wait",
    )  # fmt: skip
    assert record["state"] == "COMMAND_STATE_SUCCEEDED" and record["node_id"] == "node-00000"
    assert base64.b64decode(record["spec"]["payload"]) == b'{"job": 1}'
    assert record["spec"]["priority"] == 2 and record["spec"]["timeout_ms"] == 20000
    assert record["spec"]["max_attempts"] == 2
    cid = record["id"]
    # The payload from stdin, placed by label; the table shows the final state.
    table = env.ok(
        "commands", "submit", "--kind", "echo", "--payload", "-", "--label", "zone=b", "--wait",
        stdin="from stdin",
    )  # fmt: skip
    header, row = table.splitlines()
    assert header.split()[:4] == ["ID", "KIND", "STATE", "NODE"]
    assert row.split()[1:4] == ["echo", "succeeded", "node-00001"]
    assert env.json("commands", "get", cid)["state"] == "COMMAND_STATE_SUCCEEDED"
    listed = by_id(env.json("commands", "ls", "--state", "succeeded", "--node", "node-00000"))
    assert cid in listed and all(r["node_id"] == "node-00000" for r in listed.values())
    assert env.ok("commands", "wait", cid).splitlines()[1].split()[2] == "succeeded"
    # An idempotency key: the second submit is the first command.
    first = env.json("commands", "submit", "--kind", "echo", "--idempotency-key", "ctl-k1")
    again = env.json("commands", "submit", "--kind", "echo", "--idempotency-key", "ctl-k1")
    assert first["id"] == again["id"] == "ctl-k1" and again["duplicate"] is True


def test_failing_command_exits_1(env: Env) -> None:
    result = env.run(
        "commands", "submit", "--kind", "echo", "--target-node", "bad-00000",
        "--max-attempts", "1", "--wait", "-o", "json",
    )  # fmt: skip
    assert result.returncode == 1, (result.stdout, result.stderr)
    record = json.loads(result.stdout)
    assert record["state"] == "COMMAND_STATE_FAILED" and record["reason"] == "simulated failure"
    assert result.stderr.strip() == f"Error: {record['id']}: FAILED: simulated failure"
    waited = env.run("commands", "wait", record["id"])
    assert waited.returncode == 1 and "FAILED" in waited.stderr


def test_cancel_pending_command(env: Env) -> None:
    submitted = env.json("commands", "submit", "--kind", "echo", "--label", "zone=nowhere")
    assert submitted["state"] == "COMMAND_STATE_PENDING"
    cid = submitted["id"]
    cancelled = env.json("commands", "cancel", cid)
    assert cancelled["state"] == "COMMAND_STATE_CANCELLED"
    waited = env.run("commands", "wait", cid, "--timeout", "10s")
    assert waited.returncode == 1 and f"{cid}: CANCELLED" in waited.stderr
    again = env.run("commands", "cancel", cid)
    assert again.returncode == 3
    assert f"{env.server.grpc_target}: FAILED_PRECONDITION:" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_wait_timeout_exits_1(env: Env) -> None:
    cid = env.json("commands", "submit", "--kind", "echo", "--label", "zone=never")["id"]
    result = env.run("commands", "wait", cid, "--timeout", "0.3s", "-o", "json")
    assert result.returncode == 1
    assert f"{cid}: still PENDING (not final when the wait ended)" in result.stderr
    assert json.loads(result.stdout)["state"] == "COMMAND_STATE_PENDING"  # the current record
    env.ok("commands", "cancel", cid)


def test_agents_deploy_ls_get_stop(env: Env) -> None:
    deployed = env.json(
        "agents", "deploy", "--name", "web", "--replicas", "2", "--cpu", "500m",
        "--memory", "1GB", "--label", "tier=ok", "--spec", '{"image": "x"}',
    )  # fmt: skip
    assert sorted(a["id"] for a in deployed) == ["web-0", "web-1"]
    assert deployed[0]["spec"]["request"]["cpu"] == 0.5

    def states() -> set[str]:
        return {a["state"] for a in env.json("agents", "ls", "--name", "web")}

    wait_for(
        lambda: states() == {"AGENT_STATE_RUNNING"}, timeout=20, interval=0.3, message="running"
    )
    got = env.json("agents", "get", "web-0")
    assert got["state"] == "AGENT_STATE_RUNNING" and got["node_id"].startswith("node-")
    table = env.ok("agents", "ls", "--state", "running").splitlines()
    assert {line.split()[0] for line in table[1:]} >= {"web-0", "web-1"}
    stopped = env.json("agents", "stop", "web")
    assert all(a["stop_requested"] for a in stopped)
    wait_for(
        lambda: states() == {"AGENT_STATE_STOPPED"}, timeout=20, interval=0.3, message="stopped"
    )


def test_events_tail_after_topic_key(env: Env) -> None:
    cid = env.json("commands", "submit", "--kind", "echo", "--target-node", "node-00001", "--wait")[
        "id"
    ]
    mine = env.events("--after", "0", "--key", cid)
    assert [e["type"] for e in mine] == [
        "command.placed",
        "command.dispatched",
        "command.acked",
        "command.succeeded",
    ]
    indexes = [e["index"] for e in mine]
    assert indexes == sorted(indexes) and len(set(indexes)) == 4
    assert mine[-1]["payload"]["state"] == "COMMAND_STATE_SUCCEEDED"
    later = env.events("--after", str(indexes[1]), "--key", cid)
    assert [e["index"] for e in later] == indexes[2:]
    nodes = env.events("--after", "0", "--topic", "node")
    assert nodes and {e["topic"] for e in nodes} == {"node"}
    assert "node.registered" in {e["type"] for e in nodes}
    table = env.ok("events", "tail", "--after", str(indexes[2]), "--key", cid).splitlines()
    assert table[0].split() == ["INDEX", "TIME", "TOPIC", "TYPE", "KEY"]
    assert table[1].split()[0] == str(indexes[3]) and table[1].split()[3:] == [
        "command.succeeded",
        cid,
    ]


def test_nodes_drain_eligibility_rm(env: Env) -> None:
    drained = env.json("nodes", "drain", "node-00001", "--reason", "maintenance")
    assert drained["draining"] is True and drained["drain_reason"] == "maintenance"
    assert drained["status"] == "NODE_STATUS_DRAINING"
    pending = env.json("commands", "submit", "--kind", "echo", "--label", "zone=b")
    assert pending["state"] == "COMMAND_STATE_PENDING"
    lifted = env.json("nodes", "drain", "node-00001", "--disable")
    assert lifted["draining"] is False and lifted["status"] == "NODE_STATUS_READY"
    waited = env.run("commands", "wait", pending["id"], "--timeout", "20s")
    assert waited.returncode == 0, waited.stderr  # placed once the drain was lifted

    assert env.json("nodes", "eligibility", "node-00000", "--disable")["eligible"] is False
    refused = env.json("commands", "submit", "--kind", "echo", "--label", "zone=a")
    assert refused["state"] == "COMMAND_STATE_PENDING"
    assert env.json("nodes", "eligibility", "node-00000", "--enable")["eligible"] is True
    assert env.run("commands", "wait", refused["id"], "--timeout", "20s").returncode == 0

    assert env.ok("nodes", "rm", "bad-00000").strip() == "node/bad-00000 removed"
    removed = [e["type"] for e in env.events("--after", "0", "--key", "bad-00000")]
    assert "node.removed" in removed


def test_dead_target_exits_3_with_one_line(env: Env) -> None:
    (port,) = free_ports(1)
    target = f"{HOST}:{port}"
    for args in (
        ("nodes", "ls"),
        ("commands", "submit", "--kind", "echo", "--wait"),
        ("agents", "ls"),
        ("events", "tail", "--after", "0"),
        ("status",),
    ):
        result = env.run("--target", target, *args)
        assert result.returncode == 3, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: {target}: UNAVAILABLE:"), lines
        assert result.stdout == ""


def test_events_follow_resumes_across_a_restart_without_gap_or_duplicate(env: Env) -> None:
    # Last in the module: it restarts the server.
    start = env.events("--after", "0")[-1]["index"]
    out = (env.tmp / "follow.out").open("w")
    err = (env.tmp / "follow.err").open("w")
    tail = subprocess.Popen(
        [*NEXUSCTL, "events", "tail", "--follow", "--after", str(start), "-o", "json"],
        stdout=out,
        stderr=err,
        env=env.env,
    )
    try:

        def printed() -> list[dict[str, Any]]:
            text = (env.tmp / "follow.out").read_text()
            return [json.loads(line) for line in text.splitlines() if line.endswith("}")]

        before = env.json("commands", "submit", "--kind", "echo", "--label", "tier=ok", "--wait")
        wait_for(
            lambda: before["id"] in {e["key"] for e in printed()}, timeout=20, message="before"
        )

        assert env.server.stop() == 0
        env.restarted = ServerProcess(
            env.tmp / "data", env.tmp / "server-2.log", same_ports_as=env.server
        ).start()
        after = env.json(
            "commands", "submit", "--kind", "echo", "--label", "tier=ok", "--wait",
            "--request-timeout", "30",
        )  # fmt: skip
        wait_for(
            lambda: any(
                e["key"] == after["id"] and e["type"] == "command.succeeded" for e in printed()
            ),
            timeout=30,
            message="the command submitted after the restart",
        )
    finally:
        tail.send_signal(signal.SIGINT)
        tail.wait(10)
        out.close()
        err.close()
    seen = [e["index"] for e in printed()]
    assert seen == sorted(set(seen)), "duplicate or out of order"
    # Everything the server has in that range, read afresh, is exactly what was printed.
    stored = [e["index"] for e in env.events("--after", str(start)) if e["index"] <= seen[-1]]
    assert seen == stored
    assert "reconnecting" in (env.tmp / "follow.err").read_text()


def test_completion_script_from_the_console_script(env: Env) -> None:
    script = env.ok("completion", "bash")
    assert "_NEXUSCTL_COMPLETE=bash_complete" in script
    if shutil.which("bash"):
        checked = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
        assert checked.returncode == 0, checked.stderr
