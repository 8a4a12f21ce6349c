"""The nexus-fast process: version, exit codes, ordered start and stop, restarts."""

from __future__ import annotations

import base64
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import nexus_fast
from nexus_fast.config import ENV_OVERRIDES
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import HOST, REPO, ServerProcess, http_get, wait_for


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nexus_fast.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )


def test_version_names_libraries_and_implementations() -> None:
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    # One version source: the installed metadata is nexus_fast.__version__.
    assert metadata.version("nexus-fast") == nexus_fast.__version__
    assert out.startswith(f"nexus-fast {nexus_fast.__version__}\n")
    for library in ("grpcio", "protobuf", "picows", "lmdb"):
        assert f"  {library} " in out
    assert "hot paths: ring=" in out and "queue=" in out


def test_invalid_config_exits_2_with_one_line(tmp_path: Path) -> None:
    cases = {
        "[server]\ngrpc_port = 70000\n": ("server.grpc_port", "70000"),
        "[server]\ngrpc_prot = 1\n": ("server.grpc_prot", "unknown key"),
        '[performance]\nnode_timeout = "-5s"\n': ("performance.node_timeout", "-5s"),
        '[server]\nmax_connections = "many"\n': ("server.max_connections", "many"),
    }
    for i, (text, (key, detail)) in enumerate(cases.items()):
        path = tmp_path / f"bad-{i}.toml"
        path.write_text(text)
        result = run_cli("--config", str(path))
        assert result.returncode == 2, (text, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert key in lines[0] and detail in lines[0], lines[0]


def test_port_in_use_exits_1_without_traceback(server_factory: type) -> None:
    server: ServerProcess = server_factory.create()
    with socket.socket() as blocker:
        blocker.bind((HOST, server.http_port))
        blocker.listen()
        result = subprocess.run(
            server.command(), capture_output=True, text=True, timeout=60, env=server.env()
        )
    assert result.returncode == 1, result.stdout + result.stderr
    output = result.stdout + result.stderr
    assert "Traceback" not in output
    assert "cannot listen" in output and str(server.http_port) in output


def test_grpc_port_in_use_is_refused_not_shared(server_factory: type) -> None:
    first: ServerProcess = server_factory.create().start()
    second: ServerProcess = server_factory.create(data_dir=first.data_dir.parent / "other")
    second.grpc_port = first.grpc_port
    result = subprocess.run(
        second.command(), capture_output=True, text=True, timeout=60, env=second.env()
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "grpc: cannot listen" in result.stdout + result.stderr


def test_health_reflection_and_sigterm(server: ServerProcess) -> None:
    with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "nexus.fabric.v1.NodeService", "nexus.fabric.v1.ControlService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING

        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = reflect.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in responses for s in r.list_services_response.service}
        assert {
            "nexus.fabric.v1.NodeService",
            "nexus.fabric.v1.ControlService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names

    # Exits before its 30 s drain deadline (stop() gives up after 20 s): nothing in flight.
    assert server.stop(signal.SIGTERM) == 0
    assert '"stopped"' in server.log() or "stopped" in server.log()


def test_state_survives_restart_and_sigterm_with_open_streams(server_factory: type) -> None:
    server: ServerProcess = server_factory.create().start()
    with server.channel() as channel:
        nodes = pb_grpc.NodeServiceStub(channel)
        control = pb_grpc.ControlServiceStub(channel)
        reply = nodes.Register(
            pb.RegisterRequest(node_id="persist-1", labels={"zone": "z"}), timeout=5
        )
        nodes.Register(pb.RegisterRequest(node_id="persist-2"), timeout=5)
        control.DrainNode(pb.DrainNodeRequest(node_id="persist-1", drain=True, reason="r"))
        control.SetNodeEligibility(
            pb.SetNodeEligibilityRequest(node_id="persist-2", eligible=False)
        )
        # An open stream must not hold up shutdown.
        stream = nodes.Connect(
            iter([pb.NodeMessage(node_id="persist-1", session_epoch=reply.session_epoch)]),
            timeout=30,
        )
        assert next(stream).HasField("config")
        assert server.stop() == 0  # before the 30 s drain deadline: the stream is closed
        try:
            for _ in stream:
                pass
        except grpc.RpcError as err:
            assert err.code() == grpc.StatusCode.UNAVAILABLE

    again = server_factory.create(data_dir=server.data_dir).start()
    with again.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        one = control.GetNode(pb.GetNodeRequest(node_id="persist-1"), timeout=5)
        two = control.GetNode(pb.GetNodeRequest(node_id="persist-2"), timeout=5)
    assert one.draining and one.drain_reason == "r" and one.labels["zone"] == "z"
    assert one.status == pb.NODE_STATUS_DRAINING and not one.connected
    assert not two.eligible and two.status == pb.NODE_STATUS_READY
    assert one.session_epoch == 1
    # Ready until proven gone: after node_timeout (3s in tests) without a reconnect they go down.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        status, body, _ = http_get(again.http_base + "/api/v1/nodes/persist-2")
        if b'"down"' in body:
            break
        time.sleep(0.2)
    assert status == 200 and b'"down"' in body


def connected_nodes(server: ServerProcess) -> int:
    _, body, _ = http_get(server.http_base + "/health/detailed")
    return int(json.loads(body)["components"]["grpc"]["connected_nodes"])


def all_connected(server: ServerProcess) -> bool:
    return connected_nodes(server) == 50


def silent_websocket(server: ServerProcess) -> socket.socket:
    """A WebSocket client that upgrades and then never reads nor answers a close frame."""
    sock = socket.create_connection((HOST, server.ws_port), timeout=10)
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /v1/events HTTP/1.1\r\nHost: {HOST}:{server.ws_port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    assert sock.recv(4096).startswith(b"HTTP/1.1 101")
    return sock


def test_sigterm_with_a_reconnecting_fleet_ends_before_the_drain_deadline(
    server_factory: type, fleet_factory: type
) -> None:
    """Defect 6: nodes that reconnected while stop() ran held gRPC's stop for the whole grace.

    A WebSocket client that never answers the close handshake keeps the WebSocket drain busy
    for half the deadline, so the 50 nodes the stop ended have time to reconnect; before the
    fix gRPC still accepted them and stop() waited out the full 30 s shutdown_timeout.
    """
    env = {"NEXUS_SHUTDOWN_TIMEOUT": "30s"}
    server: ServerProcess = server_factory.create(**env).start()
    fleet_factory.create(server.grpc_target, 50)
    wait_for(functools.partial(all_connected, server), 60, message="fleet connected")
    for _ in range(3):  # kill -9 restarts of the same data dir with the fleet attached
        server.kill()
        server = server_factory.create(same_ports_as=server, **env).start()
        wait_for(functools.partial(all_connected, server), 60, message="fleet reconnected")
    with silent_websocket(server):
        started = time.monotonic()
        code = server.stop(signal.SIGTERM, timeout=60)
        elapsed = time.monotonic() - started
    assert code == 0, server.log()
    assert elapsed < 25, f"stop took {elapsed:.1f}s of its 30s deadline:\n{server.log()}"
    stopped = [json.loads(x) for x in server.log().splitlines() if '"msg":"stopped"' in x]
    assert stopped and stopped[-1]["phases"]["listeners"] < 25, stopped


def test_sigterm_ends_a_pending_wait_commands_with_unavailable(server: ServerProcess) -> None:
    """A WaitCommands without a timeout held the stop for the whole 30 s shutdown_timeout
    (conftest): nothing ended the core's waiters. Now it ends with UNAVAILABLE at once."""
    with server.channel() as channel:
        control = pb_grpc.ControlServiceStub(channel)
        control.SubmitCommands(
            pb.SubmitCommandsRequest(
                commands=[
                    pb.CommandSpec(idempotency_key="done", kind="run"),
                    pb.CommandSpec(idempotency_key="stuck", kind="run"),  # no node: never ends
                ]
            ),
            timeout=10,
        )
        control.CancelCommand(pb.CancelCommandRequest(id="done"), timeout=10)
        stream = control.WaitCommands(pb.WaitCommandsRequest(ids=["done", "stuck"]))
        # The final one streams at once: once it is here, the server is waiting for "stuck".
        assert next(stream).id == "done"
        # ServerProcess.stop fails the test if the server takes its 20 s (< the 30 s drain).
        assert server.stop(signal.SIGTERM) == 0, server.log()
        try:
            next(stream)
        except grpc.RpcError as exc:
            assert exc.code() == grpc.StatusCode.UNAVAILABLE, exc
            assert exc.details() == "server stopping", exc
        else:
            raise AssertionError("WaitCommands yielded a command that never finished")
    assert "Traceback" not in server.log()


def test_ready_says_stopping_during_the_drain(server_factory: type) -> None:
    server: ServerProcess = server_factory.create(NEXUS_SHUTDOWN_TIMEOUT="30s").start()
    with silent_websocket(server):  # holds the drain open (WebSocket close deadline: 15 s)
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        seen: set[tuple[int, bytes]] = set()

        def stopping() -> bool:
            try:
                status, body, _ = http_get(server.http_base + "/ready", timeout=2)
            except OSError:
                return False
            seen.add((status, body))
            return status == 503 and json.loads(body)["status"] == "stopping"

        wait_for(stopping, 10, interval=0.02, message=f"/ready during the drain: {seen}")
        assert all(json.loads(body)["status"] != "starting" for _, body in seen), seen
    assert server.stop(timeout=60) == 0


def test_help_lists_environment_variables_and_exit_codes() -> None:
    result = run_cli("--help")
    assert result.returncode == 0, result.stderr
    for name in (*ENV_OVERRIDES, "NEXUS_NO_EXTENSIONS", "NEXUS_REQUIRE_EXTENSIONS"):
        assert f"  {name} " in result.stdout, name
    exit_codes = result.stdout.split("exit codes:", 1)[1]
    for code in ("0", "1", "2"):
        assert f"\n  {code}  " in exit_codes, code
