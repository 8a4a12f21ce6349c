"""Real etcd members on loopback for tests, nexus-bench and ``make run-cluster``.

:class:`EtcdCluster` starts ``members`` etcd processes (Debian's etcd-server package) on
free ports of ``host``, each with its data dir and log file under ``workdir``, tuned for
loopback (50 ms heartbeats, 500 ms election timeout), and stops them by pid. A member can
be killed (SIGKILL) and started again on the same ports and data dir, or paused (SIGSTOP).

    python -m nexus_fast.cluster.etcd_procs --members 3 --workdir /tmp/etcd

runs a cluster in the foreground, printing its endpoints, until Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import grpc

from nexus_fast.benchmark.procs import free_ports
from nexus_fast.pb import etcd_rpc_pb2 as pb
from nexus_fast.pb import etcd_rpc_pb2_grpc as pb_grpc

ETCD_PATHS = ("/usr/bin/etcd",)
STOP_GRACE = 3.0  # seconds between SIGTERM and SIGKILL
LOG_TAIL = 2000  # characters of a member's log quoted when it fails
TUNING = (
    "--heartbeat-interval=50",
    "--election-timeout=500",
    "--max-request-bytes=8388608",  # 8 MiB: a log entry up to [cluster] max_entry_bytes
    "--quota-backend-bytes=2147483648",  # 2 GiB (etcd's default, named)
    "--experimental-watch-progress-notify-interval=1s",
    "--logger=zap",
    "--log-level=info",
    "--log-outputs=stderr",
)


@dataclass(frozen=True, slots=True)
class EtcdTls:
    """TLS on the client port: the members' certificate, client certificates required
    (signed by ``ca``); ``client_cert``/``client_key`` are what the health check shows."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


class EtcdProcessError(RuntimeError):
    """etcd is missing, or a member did not start or become healthy."""


def etcd_binary() -> str:
    """The etcd executable: /usr/bin/etcd (Debian etcd-server) or ``etcd`` on PATH."""
    for path in ETCD_PATHS:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which("etcd")
    if found:
        return found
    raise EtcdProcessError(
        "etcd not found: install it with `apt-get install etcd-server` (or `make etcd`)"
    )


class EtcdCluster:
    """``members`` etcd processes forming one cluster (real members for tests, nexus-bench and make run-cluster)."""

    def __init__(
        self,
        workdir: Path,
        members: int = 1,
        *,
        host: str = "127.0.0.1",
        tls: EtcdTls | None = None,
    ) -> None:
        if members < 1:
            raise ValueError("an etcd cluster has at least one member")
        self.workdir = Path(workdir)
        self.members = members
        self.host = host
        self.tls = tls
        self.endpoints: list[str] = []
        self._peer_urls: list[str] = []
        self._procs: list[subprocess.Popen[bytes] | None] = [None] * members
        self._token = f"nexus-{uuid.uuid4().hex[:12]}"

    # -- lifecycle --------------------------------------------------------------------
    def start(self, timeout: float = 20.0) -> None:
        """Start every member on free ports; return when each answers with a leader."""
        if self.endpoints:
            raise EtcdProcessError("this EtcdCluster was already started")
        etcd_binary()
        self.workdir.mkdir(parents=True, exist_ok=True)
        ports = free_ports(2 * self.members, self.host)
        self.endpoints = [f"{self.host}:{p}" for p in ports[: self.members]]
        self._peer_urls = [f"http://{self.host}:{p}" for p in ports[self.members :]]
        try:
            for i in range(self.members):
                self._spawn(i)
            self.wait_healthy(timeout=timeout)
        except BaseException:
            self.stop()
            raise

    def _name(self, i: int) -> str:
        return f"etcd{i}"

    def log_path(self, i: int) -> Path:
        """Member ``i``'s log file (appended to across restarts)."""
        return self.workdir / f"{self._name(i)}.log"

    def _spawn(self, i: int) -> None:
        initial = ",".join(f"{self._name(j)}={u}" for j, u in enumerate(self._peer_urls))
        client_url = f"{'https' if self.tls else 'http'}://{self.endpoints[i]}"
        args = [
            etcd_binary(),
            f"--name={self._name(i)}",
            f"--data-dir={self.workdir / (self._name(i) + '.data')}",
            f"--listen-client-urls={client_url}",
            f"--advertise-client-urls={client_url}",
            f"--listen-peer-urls={self._peer_urls[i]}",
            f"--initial-advertise-peer-urls={self._peer_urls[i]}",
            f"--initial-cluster={initial}",
            "--initial-cluster-state=new",  # ignored once the data dir exists (restarts)
            f"--initial-cluster-token={self._token}",
            *TUNING,
        ]
        if self.tls is not None:
            args += [
                f"--cert-file={self.tls.server_cert}",
                f"--key-file={self.tls.server_key}",
                f"--trusted-ca-file={self.tls.ca}",
                "--client-cert-auth",
            ]
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        with open(self.log_path(i), "ab") as logfile:
            self._procs[i] = subprocess.Popen(
                args,
                stdin=subprocess.DEVNULL,
                stdout=logfile,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # Ctrl-C in a terminal reaches us, not etcd
            )

    def pid(self, i: int) -> int | None:
        """Member ``i``'s pid while it runs."""
        proc = self._procs[i]
        return proc.pid if proc is not None and proc.poll() is None else None

    def kill(self, i: int) -> None:
        """SIGKILL member ``i`` (no clean shutdown) and reap it."""
        proc = self._procs[i]
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)

    def pause(self, i: int) -> None:
        """SIGSTOP member ``i``: it keeps its connections but answers nothing (a hung host)."""
        proc = self._procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGSTOP)

    def resume(self, i: int) -> None:
        """SIGCONT member ``i`` after :meth:`pause`."""
        proc = self._procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)

    def start_member(self, i: int, *, wait: float = 20.0) -> None:
        """Start member ``i`` again (same ports and data dir); with ``wait`` > 0, return
        when it answers with a leader. Blocking: from a coroutine, run it in a thread."""
        if not self.endpoints:
            raise EtcdProcessError("start() the cluster first")
        if self.pid(i) is not None:
            return
        self._spawn(i)
        if wait > 0:
            self.wait_healthy([i], timeout=wait)

    def stop(self) -> None:
        """SIGTERM each member, SIGKILL it after a grace period; idempotent. One at a
        time: a leader stopping hands leadership to a live peer (~0.1 s), which stopped
        at the same moment would leave it waiting for a transfer that cannot complete."""
        for proc in self._procs:
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)  # a paused member cannot handle SIGTERM
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def __enter__(self) -> EtcdCluster:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- health -----------------------------------------------------------------------
    def log_tail(self, i: int, chars: int = LOG_TAIL) -> str:
        """The end of member ``i``'s log (for error messages)."""
        try:
            data = self.log_path(i).read_bytes()
        except OSError:
            return ""
        return data[-chars:].decode(errors="replace")

    def member_status(self, i: int, timeout: float = 1.0) -> pb.StatusResponse | None:
        """Member ``i``'s Maintenance.Status, or None when it does not answer in time."""
        if self.tls is None:
            channel = grpc.insecure_channel(self.endpoints[i])
        else:
            credentials = grpc.ssl_channel_credentials(
                self.tls.ca.read_bytes(),
                self.tls.client_key.read_bytes(),
                self.tls.client_cert.read_bytes(),
            )
            channel = grpc.secure_channel(self.endpoints[i], credentials)
        with channel:
            try:
                resp: pb.StatusResponse = pb_grpc.MaintenanceStub(channel).Status(
                    pb.StatusRequest(), timeout=timeout
                )
            except grpc.RpcError:
                return None
        return resp

    def wait_healthy(self, members: list[int] | None = None, timeout: float = 20.0) -> None:
        """Wait until each of ``members`` (default: all) answers Status and knows a leader."""
        pending = list(range(self.members) if members is None else members)
        end = time.monotonic() + timeout
        while pending:
            for i in list(pending):
                proc = self._procs[i]
                if proc is None or proc.poll() is not None:
                    code = None if proc is None else proc.returncode
                    raise EtcdProcessError(
                        f"etcd member {i} is not running (exit {code}); "
                        f"log {self.log_path(i)}:\n{self.log_tail(i)}"
                    )
                status = self.member_status(i, timeout=0.5)
                if status is not None and status.leader:
                    pending.remove(i)
            if pending and time.monotonic() > end:
                tails = "\n".join(f"--- member {i}:\n{self.log_tail(i)}" for i in pending)
                raise EtcdProcessError(
                    f"etcd members {pending} not healthy after {timeout:g}s "
                    f"(endpoints {self.endpoints}):\n{tails}"
                )
            if pending:
                time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=3)
    parser.add_argument("--workdir", type=Path, required=True)
    args = parser.parse_args(argv)
    cluster = EtcdCluster(args.workdir, args.members)
    try:
        cluster.start()
        # Blocked only now (for sigwait): members started earlier would inherit the mask
        # and ignore the SIGTERM that stops them.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        print(",".join(cluster.endpoints), flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
    except EtcdProcessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
