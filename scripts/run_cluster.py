"""``make run-cluster``: a 3-member etcd and three nexus-fast replicas on loopback.

Data under ``./data/cluster/<name>`` (etcd's under ``./data/cluster/etcd``), ports free a
moment ago, consecutive where they can be. Prints every address, then waits; Ctrl-C (or
SIGTERM) stops the replicas and the etcd members by pid. See docs/cluster.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from nexus_fast.benchmark.procs import free_ports
from nexus_fast.cluster.etcd_procs import EtcdCluster, EtcdProcessError

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"


def replica_config(name: str, endpoints: list[str], grpc_port: int) -> str:
    base = (REPO / "configs" / "development.toml").read_text().partition("[cluster]")[0]
    return base + (
        "[cluster]\n"
        "enabled = true\n"
        f'name = "{name}"\n'
        f"etcd_endpoints = {json.dumps(endpoints)}\n"
        'etcd_prefix = "/nexus"\n'
        'lease_ttl = "2s"\n'
        f'advertise = "{HOST}:{grpc_port}"\n'
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--etcd-members", type=int, default=3)
    parser.add_argument("--data", type=Path, default=REPO / "data" / "cluster")
    args = parser.parse_args(argv)
    args.data.mkdir(parents=True, exist_ok=True)
    stop = threading.Event()

    def request_stop(signum: int, frame: object) -> None:
        stop.set()

    # Handlers, not a blocked mask: children inherit a signal mask and would ignore SIGTERM.
    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    etcd = EtcdCluster(args.data / "etcd", args.etcd_members)
    replicas: list[tuple[str, subprocess.Popen[bytes]]] = []
    targets: list[str] = []
    try:
        etcd.start()
        print(f"etcd: {','.join(etcd.endpoints)}  (data {args.data / 'etcd'})", flush=True)
        for i in range(1, args.replicas + 1):
            name = f"r{i}"
            ports = free_ports(3)
            data = args.data / name
            data.mkdir(exist_ok=True)
            config = args.data / f"{name}.toml"
            config.write_text(replica_config(name, etcd.endpoints, ports[0]))
            log = (args.data / f"{name}.log").open("ab")
            command = [
                sys.executable, "-m", "nexus_fast.cli", "--config", str(config),
                "--host", HOST, "--grpc-port", str(ports[0]), "--ws-port", str(ports[1]),
                "--http-port", str(ports[2]), "--db-path", str(data),
            ]  # fmt: skip
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            log.close()
            replicas.append((name, proc))
            targets.append(f"{HOST}:{ports[0]}")
            print(
                f"{name}: grpc {HOST}:{ports[0]}  ws {HOST}:{ports[1]}  "
                f"http http://{HOST}:{ports[2]}  pid {proc.pid}  log {args.data / name}.log",
                flush=True,
            )
        print(
            f"try: nexusctl --target {targets[0]} cluster status   (Ctrl-C stops all)", flush=True
        )
        while not stop.wait(0.5):
            for name, proc in replicas:
                if proc.poll() is not None:  # a crashed replica says so once
                    print(f"{name} exited with {proc.returncode}", file=sys.stderr, flush=True)
                    replicas.remove((name, proc))
                    break
    except EtcdProcessError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        for _, proc in replicas:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 20.0
        for name, proc in replicas:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                print(f"{name} (pid {proc.pid}) ignored SIGTERM: killed", file=sys.stderr)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait()
        etcd.stop()
        print("stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
