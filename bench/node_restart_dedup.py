"""How many commands does a restarted nexus-node run twice, with and without --state-dir?

Starts a server and a fleet (``--record`` on), submits commands that take 0.3-1.5 s each,
stops the fleet mid-run with SIGTERM (which flushes its ``--record``), restarts it on the
same record (and state dir), waits until every command is final, and counts the
(node, command) pairs the nodes' own record shows succeeding more than once.

    .venv/bin/python bench/node_restart_dedup.py [--state-dir] [--commands 1000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import time
from pathlib import Path

import grpc

from nexus_fast.benchmark.procs import ProcessGroup, spawn_server
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--state-dir", action="store_true", help="run the fleet with --state-dir")
    parser.add_argument("--commands", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3, help="SIGTERM + restart rounds")
    parser.add_argument("--nodes", type=int, default=8)
    args = parser.parse_args()
    group = ProcessGroup()
    try:
        server = spawn_server(group)
        work = group.tempdir("nexus-dedup-")
        record = work / "record.jsonl"
        fleet_argv = [
            sys.executable, "-m", "nexus_fast.node", "--target", server.grpc,
            "--nodes", str(args.nodes), "--status-interval", "0", "--id-prefix", "rd-",
            "--exec-duration", "0.3-1.5", "--record", str(record),
            *(["--state-dir", str(work / "state")] if args.state_dir else []),
        ]  # fmt: skip
        fleet = group.start(fleet_argv, log_name="fleet")
        with grpc.insecure_channel(server.grpc) as channel:
            control = pb_grpc.ControlServiceStub(channel)
            while (
                len(control.ListNodes(pb.ListNodesRequest(statuses=[1]), timeout=5).nodes)
                < args.nodes
            ):
                time.sleep(0.2)
            reply = control.SubmitCommands(
                pb.SubmitCommandsRequest(
                    commands=[
                        pb.CommandSpec(kind="echo", timeout_ms=120_000, max_attempts=5)
                        for _ in range(args.commands)
                    ]
                ),
                timeout=60,
            )
            ids = [r.id for r in reply.results]
            for _ in range(args.rounds):
                time.sleep(1.0)
                fleet.send_signal(signal.SIGTERM)
                fleet.wait(30)
                fleet = group.start(fleet_argv, log_name="fleet")
            done = sum(
                1
                for _ in control.WaitCommands(
                    pb.WaitCommandsRequest(ids=ids, timeout_ms=120_000), timeout=150
                )
            )
        fleet.send_signal(signal.SIGTERM)
        fleet.wait(30)
        runs = collections.Counter(
            (e["node_id"], e["command_id"])
            for e in map(json.loads, Path(record).read_text().splitlines())
            if e.get("success")
        )
        twice = sum(1 for n in runs.values() if n > 1)
        print(
            json.dumps(
                {
                    "state_dir": args.state_dir,
                    "commands": args.commands,
                    "restarts": args.rounds,
                    "final": done,
                    "succeeded_twice_on_a_node": twice,
                }
            )
        )
        return 0
    finally:
        group.close()


if __name__ == "__main__":
    sys.exit(main())
