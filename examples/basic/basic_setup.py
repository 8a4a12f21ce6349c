#!/usr/bin/env python3
"""Basic setup: a running server, a few nodes, one command, its result.

Start a server first (defaults: gRPC 127.0.0.1:50053):

    nexus-fast --config configs/development.toml

then run this script. It starts ``nexus-node`` (the reference proxy) simulating ``--nodes``
nodes, waits until they are connected, submits one ``echo`` command with the generated stubs,
waits for its final state with ``WaitCommands`` and prints the record.

    python examples/basic/basic_setup.py --target 127.0.0.1:50053 --nodes 3
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

import grpc

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc


def wait_for_nodes(
    control: pb_grpc.ControlServiceStub, count: int, timeout: float
) -> list[pb.Node]:
    """Nodes that are ready and connected, once there are ``count`` of them."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = control.ListNodes(
            pb.ListNodesRequest(statuses=[pb.NODE_STATUS_READY]), timeout=5
        ).nodes
        connected = [n for n in nodes if n.connected]
        if len(connected) >= count:
            return connected
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(connected)} of {count} nodes connected after {timeout}s")
        time.sleep(0.2)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="127.0.0.1:50053", help="server gRPC address")
    parser.add_argument("--nodes", type=int, default=3, help="nodes to simulate")
    args = parser.parse_args()

    # A few nodes: nexus-node simulates them in one process (labels zone=a|b|c).
    nodes = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nexus_fast.node",
            "--target",
            args.target,
            "--nodes",
            str(args.nodes),
            "--id-prefix",
            "basic-",
            "--labels",
            "zone=a|b|c",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        with grpc.insecure_channel(args.target) as channel:
            control = pb_grpc.ControlServiceStub(channel)
            ready = wait_for_nodes(control, args.nodes, timeout=30)
            print(f"{len(ready)} nodes ready:", ", ".join(n.id for n in ready))

            # One command; the idempotency key makes a retry of this call safe.
            spec = pb.CommandSpec(
                idempotency_key=f"basic-example-{time.time_ns()}",
                kind="echo",
                payload=b"hello fabric",
                placement=pb.Placement(label_selector={"zone": "a"}),
            )
            submitted = control.SubmitCommands(
                pb.SubmitCommandsRequest(commands=[spec]), timeout=10
            )
            result = submitted.results[0]
            print(
                f"submitted {result.id}: {pb.CommandState.Name(result.state)} on {result.node_id}"
            )

            for record in control.WaitCommands(
                pb.WaitCommandsRequest(ids=[result.id], timeout_ms=30_000), timeout=40
            ):
                if not record.id:  # the marker ending a timed-out wait: nothing finished
                    break
                print(
                    f"{record.id}: {pb.CommandState.Name(record.state)} on {record.node_id} "
                    f"after {record.attempt} attempt(s), output={record.output!r}"
                )
                return 0 if record.state == pb.COMMAND_STATE_SUCCEEDED else 1
            print(f"{result.id} did not finish within 30 s")
            return 1
    finally:
        nodes.terminate()
        nodes.wait(20)


if __name__ == "__main__":
    sys.exit(main())
