"""Processes the benchmark starts or watches: the spawned server, baseline servers, CPU.

Everything started here listens on 127.0.0.1 on a free port, runs in its own process (so
it never shares the client's event loop) and is stopped by :class:`ProcessGroup` on exit,
also after Ctrl-C or an error.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class BenchError(Exception):
    """A benchmark could not run (server did not start, bad target, ...)."""


def free_ports(n: int, host: str = HOST) -> list[int]:
    """``n`` distinct ports free a moment ago: bound all at once, so no two are the same."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for sock in socks:
            sock.bind((host, 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def proc_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of ``pid`` from /proc (None when unavailable)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fp:
            raw = fp.read().decode()
    except OSError:
        return None
    # The command name (field 2) may contain spaces: split after its closing parenthesis.
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


def http_get(
    url: str,
    timeout: float = 5.0,
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, bytes]:
    """GET ``url``; returns ``(status, body)`` (HTTP errors are statuses, not exceptions).

    ``context``/``headers``: TLS (and a client certificate) and ``Authorization`` for a
    server with auth on.
    """
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as err:
        return int(err.code), err.read()


_SAMPLE_RE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text exposition -> ``{"name{labels}": value}`` (comments skipped)."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE_RE.match(line)
        if m:
            with contextlib.suppress(ValueError):
                out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def metric_sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    """Sum of every sample of ``name`` whose labels include ``labels``."""
    total = 0.0
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    for key, value in metrics.items():
        base, _, rest = key.partition("{")
        if base == name and all(w in rest for w in wanted):
            total += value
    return total


@dataclass
class Endpoints:
    """Where the server under test listens."""

    grpc: str  # the first (or only) gRPC target
    http: str | None = None  # base URL, e.g. http://127.0.0.1:8082
    ws: str | None = None  # base URL, e.g. ws://127.0.0.1:8081
    pid: int | None = None  # known when we spawned it (CPU from /proc)
    http_ssl: ssl.SSLContext | None = None  # HTTPS with auth on (spawn_server(secure=...))
    http_headers: dict[str, str] = field(default_factory=dict)  # its Authorization
    targets: tuple[str, ...] = ()  # --target with several replicas: every gRPC target

    @property
    def grpc_all(self) -> str:
        """Every gRPC target, comma separated (what NodePool and nexus-node take)."""
        return ",".join(self.targets) if self.targets else self.grpc

    def metrics(self, timeout: float = 5.0) -> dict[str, float] | None:
        """Scrape ``/metrics`` (None without an HTTP endpoint or on failure)."""
        if not self.http:
            return None
        try:
            status, body = http_get(
                self.http.rstrip("/") + "/metrics", timeout, self.http_ssl, self.http_headers
            )
        except OSError:
            return None
        return parse_metrics(body.decode(errors="replace")) if status == 200 else None

    def cpu_seconds(self) -> float | None:
        """Server CPU seconds so far: /proc when spawned, else process_cpu_seconds_total."""
        if self.pid is not None:
            return proc_cpu_seconds(self.pid)
        m = self.metrics()
        if m and "process_cpu_seconds_total" in m:
            return m["process_cpu_seconds_total"]
        return None


@dataclass
class ProcessGroup:
    """Child processes and temporary directories, all cleaned up by :meth:`close`."""

    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    dirs: list[Path] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)

    def tempdir(self, prefix: str) -> Path:
        """A new temporary directory removed at :meth:`close`."""
        path = Path(tempfile.mkdtemp(prefix=prefix))
        self.dirs.append(path)
        return path

    def start(
        self,
        argv: list[str],
        *,
        log_name: str,
        env: dict[str, str] | None = None,
        pipes: bool = False,
    ) -> subprocess.Popen[bytes]:
        """Start ``argv`` with stdout/stderr to a log file in a temporary directory.

        ``pipes``: stdin and stdout are pipes to this process (client workers), only
        stderr goes to the log.
        """
        logdir = self.dirs[0] if self.dirs else self.tempdir("nexus-bench-")
        log_path = logdir / f"{log_name}.log"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                argv,
                stdout=subprocess.PIPE if pipes else log,
                stderr=log if pipes else subprocess.STDOUT,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                env=env,
                start_new_session=True,  # Ctrl-C in the terminal reaches us, not the children
            )
        self.procs.append(proc)
        self.logs.append(log_path)
        return proc

    def log_tail(self, proc: subprocess.Popen[bytes], chars: int = 3000) -> str:
        """The end of ``proc``'s log, for error messages."""
        with contextlib.suppress(ValueError, OSError):
            return self.logs[self.procs.index(proc)].read_text(errors="replace")[-chars:]
        return ""

    def stop(self, pid: int, timeout: float = 15.0) -> None:
        """SIGTERM the child ``pid`` and wait for it (SIGKILL after ``timeout``)."""
        for proc in self.procs:
            if proc.pid == pid and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def close(self, timeout: float = 15.0) -> None:
        """SIGTERM every child, wait (then SIGKILL), remove the temporary directories."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)
        self.dirs.clear()


def wait_port(host: str, port: int, proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait until ``host:port`` accepts TCP connections (or ``proc`` exits)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), 0.2).close()
            return
        except OSError:
            if proc.poll() is not None:
                raise BenchError(
                    f"process exited with {proc.returncode} before listening"
                ) from None
            if time.monotonic() > deadline:
                raise BenchError(f"nothing listens on {host}:{port} after {timeout:.0f}s") from None
            time.sleep(0.05)


def spawn_server(
    group: ProcessGroup,
    *,
    timeout: float = 60.0,
    extra_env: dict[str, str] | None = None,
    config: Path | None = None,
    http_ssl: ssl.SSLContext | None = None,
) -> Endpoints:
    """Start ``python -m nexus_fast.cli`` on free loopback ports with a temporary data dir.

    Returns once ``/ready`` answers 200. Logging is reduced to warnings so the server does
    not spend its CPU on log lines we do not read. ``config``: a TOML file (auth on, see
    :mod:`nexus_fast.benchmark.authcost`); ``http_ssl``: the client context its HTTPS
    port needs.
    """
    data = group.tempdir("nexus-bench-data-")
    grpc_port, ws_port, http_port = free_ports(3)
    env = dict(os.environ)
    env.update(
        {
            "NEXUS_LOG_LEVEL": "warning",
            "NEXUS_DB_CACHE_SIZE": env.get("NEXUS_DB_CACHE_SIZE", "1GB"),
            "PYTHONUNBUFFERED": "1",
        }
    )
    env.update(extra_env or {})
    argv = [
        sys.executable,
        "-m",
        "nexus_fast.cli",
        "--host",
        HOST,
        "--grpc-port",
        str(grpc_port),
        "--ws-port",
        str(ws_port),
        "--http-port",
        str(http_port),
        "--db-path",
        str(data / "db"),
        *(["--config", str(config)] if config else []),
    ]
    proc = group.start(argv, log_name="server-auth" if config else "server", env=env)
    http = f"{'https' if http_ssl else 'http'}://{HOST}:{http_port}"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise BenchError(
                f"spawned server exited with {proc.returncode}:\n{group.log_tail(proc)}"
            )
        with contextlib.suppress(OSError):
            if http_get(http + "/ready", 1.0, http_ssl)[0] == 200:
                break
        if time.monotonic() > deadline:
            raise BenchError(f"spawned server not ready after {timeout:.0f}s")
        time.sleep(0.05)
    ws = f"{'wss' if http_ssl else 'ws'}://{HOST}:{ws_port}"
    return Endpoints(grpc=f"{HOST}:{grpc_port}", http=http, ws=ws, pid=proc.pid, http_ssl=http_ssl)


def spawn_baseline(group: ProcessGroup, kind: str, *args: str, timeout: float = 30.0) -> Endpoints:
    """Start a baseline server (``grpc`` echo, ``picows`` broadcast or ``dispatch-floor``)."""
    port, http_port = free_ports(2)
    argv = [sys.executable, "-m", "nexus_fast.benchmark.baselines", kind, "--port", str(port)]
    if kind != "dispatch-floor":
        http_port = 0
    if http_port:
        argv += ["--http-port", str(http_port)]
    proc = group.start([*argv, *args], log_name=f"baseline-{kind}", env=dict(os.environ))
    wait_port(HOST, port, proc, timeout)
    if http_port:
        wait_port(HOST, http_port, proc, timeout)
        return Endpoints(grpc=f"{HOST}:{port}", http=f"http://{HOST}:{http_port}", pid=proc.pid)
    if kind == "grpc":
        return Endpoints(grpc=f"{HOST}:{port}", pid=proc.pid)
    return Endpoints(grpc="", ws=f"ws://{HOST}:{port}", pid=proc.pid)
