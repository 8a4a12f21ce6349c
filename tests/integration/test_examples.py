"""Every example in examples/ runs against a real server and does what its README says."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nexus_fast.config import load_config
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc
from tests.integration.conftest import HOST, REPO, ServerProcess, http_get, wait_for
from tests.integration.test_prometheus import Prometheus, _tool

EXAMPLES = REPO / "examples"


def test_basic_setup(server: ServerProcess) -> None:
    result = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "basic" / "basic_setup.py"),
            "--target",
            server.grpc_target,
            "--nodes",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr + server.log()
    assert "3 nodes ready: basic-00000, basic-00001, basic-00002" in result.stdout
    assert "COMMAND_STATE_SUCCEEDED on basic-00000" in result.stdout  # zone=a is basic-00000
    # The nodes it started are gone again: they stop heartbeating, the server sees them.
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        wait_for(
            lambda: (
                not any(
                    n.connected for n in control.ListNodes(pb.ListNodesRequest(), timeout=5).nodes
                )
            ),
            30,
            message="the example's nodes disconnected",
        )


def test_advanced_config_is_valid_and_serves(server_factory: type) -> None:
    config = load_config(EXAMPLES / "advanced.toml", env={})
    assert config.scheduler.weight_most_allocated == 1.0
    assert config.scheduler.weight_least_allocated == 0.0
    assert config.database.max_map_size == 256 << 30
    assert config.commands.final_retention == 72 * 3600
    assert config.events.subscriber_buffer == 50_000
    # The real server starts on it (listeners and data dir overridden for the test).
    server = server_factory.create(config=EXAMPLES / "advanced.toml").start()
    status, body, _ = http_get(server.http_base + "/health")
    assert status == 200, body
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        # max_payload_size = 4MB in the example (the default is 1MB): a 2 MB payload fits.
        big = pb.CommandSpec(kind="echo", payload=b"x" * (2 << 20))
        answer = control.SubmitCommands(pb.SubmitCommandsRequest(commands=[big]), timeout=10)
        assert answer.results[0].state == pb.COMMAND_STATE_PENDING  # no nodes yet: it waits


class Skeleton:
    """examples/node_proxy_skeleton.py as a process; its log tells what it executed."""

    def __init__(self, target: str, node_id: str, log_path: Path) -> None:
        self.log_path = log_path
        log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(EXAMPLES / "node_proxy_skeleton.py"),
                "--target",
                target,
                "--node-id",
                node_id,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        log.close()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def skeleton_factory(tmp_path: Path) -> Iterator[type]:
    started: list[Skeleton] = []

    class Factory:
        @staticmethod
        def create(target: str, node_id: str) -> Skeleton:
            proxy = Skeleton(target, node_id, tmp_path / f"skeleton-{len(started)}.log")
            started.append(proxy)
            return proxy

    yield Factory
    for proxy in started:
        if proxy.proc.poll() is None:
            proxy.proc.kill()
            proxy.proc.wait()


def _connected(control: pb_grpc.ControlServiceStub, node_id: str) -> bool:
    try:
        return control.GetNode(pb.GetNodeRequest(node_id=node_id), timeout=5).connected
    except grpc.RpcError:
        return False


def _run(control: pb_grpc.ControlServiceStub, spec: pb.CommandSpec) -> pb.CommandRecord:
    submitted = control.SubmitCommands(pb.SubmitCommandsRequest(commands=[spec]), timeout=10)
    (record,) = control.WaitCommands(
        pb.WaitCommandsRequest(ids=[submitted.results[0].id], timeout_ms=60_000), timeout=70
    )
    return record


def test_node_proxy_skeleton_executes_once_across_a_server_restart(
    server_factory: type, skeleton_factory: type, tmp_path: Path
) -> None:
    server = server_factory.create().start()
    proxy = skeleton_factory.create(server.grpc_target, "skel-1")
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        wait_for(lambda: _connected(control, "skel-1"), 30, message="skeleton connected")
        record = _run(control, pb.CommandSpec(kind="echo", payload=b"ping", target_node="skel-1"))
        assert record.state == pb.COMMAND_STATE_SUCCEEDED, (record, proxy.log())
        assert record.output == b"ping"
        # A command still running when the server dies: it is delivered again after the
        # restart (at-least-once), and the skeleton must not run it twice.
        submitted = control.SubmitCommands(
            pb.SubmitCommandsRequest(
                commands=[pb.CommandSpec(kind="sleep", payload=b"3", target_node="skel-1")]
            ),
            timeout=10,
        )
        slow_id = submitted.results[0].id
        wait_for(lambda: f"executing {slow_id}" in proxy.log(), 30, message="slow command started")
    server.stop(signal.SIGKILL)
    restarted = server_factory.create(data_dir=server.data_dir, same_ports_as=server).start()
    with restarted.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        (slow,) = control.WaitCommands(
            pb.WaitCommandsRequest(ids=[slow_id], timeout_ms=60_000), timeout=70
        )
        assert slow.state == pb.COMMAND_STATE_SUCCEEDED, (slow, proxy.log(), restarted.log())
        assert slow.output == b"slept"
        # Delivered twice (the restarted server re-sends what is in flight), run once.
        assert f"repeat of running {slow_id}" in proxy.log() or (
            f"repeat of finished {slow_id}" in proxy.log()
        ), proxy.log()
        assert proxy.log().count(f"executing {slow_id}") == 1, proxy.log()
        # It re-registered (a new session epoch) and keeps working on the new server.
        assert control.GetNode(pb.GetNodeRequest(node_id="skel-1"), timeout=5).session_epoch >= 2
        record = _run(control, pb.CommandSpec(kind="echo", payload=b"again", target_node="skel-1"))
        assert record.state == pb.COMMAND_STATE_SUCCEEDED and record.output == b"again"
        # An unknown kind is reported as a failure, with the proxy's reason.
        record = _run(control, pb.CommandSpec(kind="nope", target_node="skel-1"))
        assert record.state == pb.COMMAND_STATE_FAILED
        assert record.reason == "unknown kind 'nope'"
        # Retried on its node (the skeleton runs a higher attempt of a failed id again).
        assert record.attempt == 3 and proxy.log().count(f"executing {record.id} ") == 3
    assert "stream ended: UNAVAILABLE" in proxy.log()
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(20) == 0, proxy.log()


def test_monitoring_example(server: ServerProcess, tmp_path: Path) -> None:
    example = EXAMPLES / "monitoring" / "prometheus.yml"
    check = subprocess.run(
        [_tool("promtool"), "check", "config", str(example)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 8 rules found" in check.stdout + check.stderr
    # The example as shipped, pointed at the test server (and at the rules by absolute path).
    text = example.read_text()
    assert '"127.0.0.1:8082"' in text and "../../deploy/prometheus-rules.yml" in text
    text = text.replace('"127.0.0.1:8082"', f'"{HOST}:{server.http_port}"')
    text = text.replace(
        "../../deploy/prometheus-rules.yml", str(REPO / "deploy" / "prometheus-rules.yml")
    )
    text = text.replace("scrape_interval: 15s", "scrape_interval: 1s")
    prom = Prometheus(tmp_path, text)
    try:
        wait_for(prom.ready, 30, message="prometheus ready")
        wait_for(lambda: prom.value('up{job="nexus-fast"}') == 1.0, 30, message="example scrapes")
        assert prom.value('nexus_uptime_seconds{job="nexus-fast"}') is not None
        groups = prom.api("/api/v1/rules")["groups"]
        assert sum(len(g["rules"]) for g in groups) == 8
    finally:
        prom.stop()
    # The dashboard it points at exists and is valid JSON with panels.
    assert "deploy/grafana-dashboard.json" in (EXAMPLES / "monitoring" / "README.md").read_text()
