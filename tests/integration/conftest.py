"""Fixtures that start the real ``nexus-fast`` process (and ``nexus-node`` fleets).

Everything listens on 127.0.0.1 on free ports, keeps its data in a temporary
directory, and is stopped at teardown even when the test failed.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from nexus_fast.benchmark.procs import free_ports
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[2]
HOST = "127.0.0.1"
HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark every test under tests/integration ``integration`` (``-m "not integration"``).

    The hook sees the whole session's items, so it marks only those in this folder.
    """
    for item in items:
        if item.path.resolve().is_relative_to(HERE):
            item.add_marker(pytest.mark.integration)


class ServerProcess:
    """A real nexus-fast process on free loopback ports."""

    def __init__(
        self,
        data_dir: Path,
        log_path: Path,
        config: Path | None = None,
        same_ports_as: ServerProcess | None = None,
        **env: str,
    ) -> None:
        self.data_dir = data_dir
        self.log_path = log_path
        self.config = config or REPO / "configs" / "development.toml"
        if same_ports_as is not None:
            # A restart on the same ports: clients (nexus-node) reconnect by themselves.
            self.grpc_port = same_ports_as.grpc_port
            self.ws_port = same_ports_as.ws_port
            self.http_port = same_ports_as.http_port
        else:
            self.grpc_port, self.ws_port, self.http_port = free_ports(3)
        self.extra_env = env
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def grpc_target(self) -> str:
        return f"{HOST}:{self.grpc_port}"

    @property
    def http_base(self) -> str:
        return f"http://{HOST}:{self.http_port}"

    def command(self, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "nexus_fast.cli",
            "--config",
            str(self.config),
            "--host",
            HOST,
            "--grpc-port",
            str(self.grpc_port),
            "--ws-port",
            str(self.ws_port),
            "--http-port",
            str(self.http_port),
            "--db-path",
            str(self.data_dir),
            *extra,
        ]

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "NEXUS_LOG_FORMAT": "json",
                "NEXUS_NODE_TIMEOUT": "3s",
                "NEXUS_HEARTBEAT_INTERVAL": "0.5s",
                "NEXUS_PRUNING_INTERVAL": "0.2s",
                # Longer than stop()'s 20 s: a server that waits out its drain instead of
                # exiting once nothing is in flight fails the test rather than passing slowly.
                "NEXUS_SHUTDOWN_TIMEOUT": "30s",
                "NEXUS_DB_CACHE_SIZE": "256MB",
            }
        )
        env.update(self.extra_env)
        return env

    def start(self, timeout: float = 30.0) -> ServerProcess:
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            self.command(), stdout=log, stderr=subprocess.STDOUT, env=self.env(), cwd=REPO
        )
        log.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if http_get(self.http_base + "/ready")[0] == 200:
                    return
            time.sleep(0.05)
        raise AssertionError(f"server not ready within {timeout}s:\n{self.log()}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        """Signal the server and wait; returns its exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(
                f"server ignored signal {sig} for {timeout}s:\n{self.log()}"
            ) from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-6000:]
        except OSError:
            return ""

    def channel(self) -> grpc.Channel:
        return grpc.insecure_channel(self.grpc_target)


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes, dict[str, str]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as err:
        return err.code, err.read(), dict(err.headers)


@pytest.fixture
def server_factory(tmp_path: Path) -> Iterator[type]:
    """Build servers on fresh ports; all of them are killed at teardown."""
    started: list[ServerProcess] = []

    class Factory:
        @staticmethod
        def create(
            data_dir: Path | None = None,
            config: Path | None = None,
            same_ports_as: ServerProcess | None = None,
            **env: str,
        ) -> ServerProcess:
            server = ServerProcess(
                data_dir or tmp_path / "data",
                tmp_path / f"server-{len(started)}.log",
                config,
                same_ports_as,
                **env,
            )
            started.append(server)
            return server

    yield Factory
    for server in started:
        server.kill()


@pytest.fixture
def server(server_factory: type) -> ServerProcess:
    return server_factory.create().start()


@pytest.fixture
def control(server: ServerProcess) -> Iterator[pb_grpc.ControlServiceStub]:
    with server.channel() as channel:
        yield pb_grpc.ControlServiceStub(channel)


@pytest.fixture
def node_stub(server: ServerProcess) -> Iterator[pb_grpc.NodeServiceStub]:
    with server.channel() as channel:
        yield pb_grpc.NodeServiceStub(channel)


class Fleet:
    """A ``nexus-node`` process simulating many nodes."""

    def __init__(self, target: str, nodes: int, log_path: Path, *extra: str) -> None:
        self.log_path = log_path
        log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nexus_fast.node",
                "--target",
                target,
                "--nodes",
                str(nodes),
                "--status-interval",
                "1",
                *extra,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
        log.close()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise
        return self.proc.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture
def fleet_factory(tmp_path: Path) -> Iterator[type]:
    fleets: list[Fleet] = []

    class Factory:
        @staticmethod
        def create(target: str, nodes: int, *extra: str) -> Fleet:
            fleet = Fleet(target, nodes, tmp_path / f"fleet-{len(fleets)}.log", *extra)
            fleets.append(fleet)
            return fleet

    yield Factory
    for fleet in fleets:
        if fleet.proc.poll() is None:
            fleet.proc.kill()
            fleet.proc.wait()


def wait_for(predicate, timeout: float, interval: float = 0.1, message: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s: {message} (last={last!r})")


def list_all_nodes(
    control: pb_grpc.ControlServiceStub, statuses: tuple[int, ...] = ()
) -> list[pb.Node]:
    nodes: list[pb.Node] = []
    token = ""
    while True:
        response = control.ListNodes(
            pb.ListNodesRequest(statuses=statuses, page_size=5000, page_token=token), timeout=10
        )
        nodes.extend(response.nodes)
        token = response.next_page_token
        if not token:
            return nodes
