#!/usr/bin/env python3
"""Cluster crash loop: kill -9 the leader of three replicas again and again, under load.

A real 3-member etcd, three ``nexus-fast`` replicas in cluster mode (``lease_ttl`` 2 s by
default), one ``nexus-node`` fleet per replica (each connects to its own replica first and
fails over to the others; ``--record``: one line per command it ran) and a client in this
process. Each round:

* one submit lane per live replica sends batches with idempotency keys (re-sending what
  a kill left unanswered, and some keys already answered); a ``WatchEvents`` subscriber
  follows the log on the leader;
* after a random moment the leader gets SIGKILL; the subscriber resumes on another
  replica after the last index it saw; the **failover time** is from the kill to the
  first submit (sent after the kill) that a replica answers OK, i.e. the new leader
  committed it;
* the killed replica starts again on its data (a follower now) and every command
  answered so far must exist on the new leader.

The end waits for every acknowledged command to be final and checks: no idempotency key
on two commands, nothing run twice on a node (the fleets' records), every SUCCEEDED
command ran on its node, events seen once each and contiguous by the resuming subscriber,
and the three replicas' event logs byte-identical. Figures (failover p50/max among them)
go to ``--json``. Exit status 1 when any check failed.

    python scripts/chaos_cluster.py --rounds 200 --json chaos-cluster.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc loads: no fork() notices

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # scripts.chaos and the cluster harness of the tests

import grpc  # noqa: E402
import grpc.aio  # noqa: E402

import nexus_fast  # noqa: E402
from nexus_fast.cluster.etcd_procs import EtcdCluster  # noqa: E402
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc  # noqa: E402
from scripts.chaos import ChaosClient, Figures  # noqa: E402
from tests.integration.cluster_util import (  # noqa: E402
    Cluster,
    EventRecorder,
    Replica,
    compare_event_logs,
)

KILL_AFTER_S = (0.3, 1.5)  # the leader's SIGKILL comes this long after the load starts
LOAD_AFTER_FAILOVER_S = 0.5  # load kept on the new leader before the round ends
GIVE_UP_S = 30.0  # no submit accepted this long after the kill: the round failed
SUBMIT_TIMEOUT_S = 2.0
# Quick reconnects: a restarted replica is reachable again within ~0.2 s, not after
# grpc's default backoff (1 s growing to 120 s).
CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 500),
]


@dataclass
class ClusterFigures(Figures):
    """Figures of scripts/chaos.py plus the cluster's own."""

    replicas: int = 3
    etcd_members: int = 3
    lease_ttl_s: float = 2.0
    max_failover_s: float = 5.0  # a failover slower than this fails the run
    failover_s: list[float] = field(default_factory=list)  # per round: kill -> accepted
    failover_p50_s: float = 0.0
    failover_max_s: float = 0.0
    failovers_too_slow: int = 0  # over max_failover_s, or none within GIVE_UP_S
    subscriber_resumes: int = 0  # WatchEvents resumed on another replica
    replica_log_problems: int = 0  # the replicas' event logs differ

    def ok(self) -> bool:
        return super().ok() and not (self.failovers_too_slow or self.replica_log_problems)


class ClusterChaos:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.fig = ClusterFigures(
            nodes=args.nodes,
            seed=args.seed,
            command=args.command,
            rounds_requested=args.rounds,
            replicas=args.replicas,
            lease_ttl_s=args.lease_ttl,
            max_failover_s=args.max_failover,
        )
        self.client = ChaosClient(self.fig, self.rng)
        self.workdir = workdir
        self.etcd = EtcdCluster(workdir / "etcd", members=3)
        self.cluster: Cluster | None = None
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.records: list[Path] = []
        self.killed_at = 0.0  # monotonic time of this round's kill (0: not yet)
        self.accepted_at = 0.0  # first OK answer to a submit sent after the kill

    def control(self, replica: Replica) -> pb_grpc.ControlServiceStub:
        channel = self.channels.get(replica.name)
        if channel is None:
            channel = grpc.aio.insecure_channel(replica.grpc_target, options=CHANNEL_OPTIONS)
            self.channels[replica.name] = channel
        return pb_grpc.ControlServiceStub(channel)

    async def leader(self, not_: str = "") -> Replica:
        assert self.cluster is not None
        return await asyncio.to_thread(self.cluster.wait_leader, GIVE_UP_S, None, not_)

    # ------------------------------------------------------------ load

    async def lane(self, replica: Replica, stop: asyncio.Event) -> None:
        """Submit batches to one replica while it lives; note the first accepted after a kill."""
        while not stop.is_set() and replica.alive():
            sent = time.monotonic()
            ok = await self.client.submit_batch(self.control(replica), SUBMIT_TIMEOUT_S)
            if ok and self.killed_at and sent > self.killed_at and not self.accepted_at:
                self.accepted_at = time.monotonic()
            await asyncio.sleep(0.005 if ok else 0.05)

    async def follow(self, first: Replica, stop: asyncio.Event) -> None:
        """WatchEvents on ``first``; when it ends, resume on another live replica."""
        assert self.cluster is not None
        replica = first
        while not stop.is_set():
            await self.client.subscriber(self.control(replica))
            if stop.is_set():
                return
            others = [r for r in self.cluster.live() if r is not replica] or [replica]
            replica = self.rng.choice(others)
            self.fig.subscriber_resumes += 1
            await asyncio.sleep(0.05)

    # ------------------------------------------------------------ rounds

    async def one_round(self, number: int) -> None:
        assert self.cluster is not None
        fig = self.fig
        leader = await self.leader()
        # Answered before this round: present on the leader (it applied everything first).
        await self.client.check_acked_exist(self.control(leader))
        stop = asyncio.Event()
        self.killed_at = self.accepted_at = 0.0
        tasks = [asyncio.create_task(self.lane(r, stop)) for r in self.cluster.live()]
        subscriber = asyncio.create_task(self.follow(leader, stop))
        await asyncio.sleep(self.rng.uniform(*KILL_AFTER_S))
        self.killed_at = time.monotonic()
        await asyncio.to_thread(self.cluster.kill, leader)
        fig.kill_rounds += 1
        while not self.accepted_at and time.monotonic() - self.killed_at < GIVE_UP_S:
            await asyncio.sleep(0.01)
        if self.accepted_at:
            took = round(self.accepted_at - self.killed_at, 3)
            fig.failover_s.append(took)
            if took > self.args.max_failover:
                fig.failovers_too_slow += 1
                fig.problem(f"round {number}: failover took {took}s")
        else:
            fig.failovers_too_slow += 1
            fig.problem(f"round {number}: no submit accepted {GIVE_UP_S}s after the kill")
        await asyncio.sleep(LOAD_AFTER_FAILOVER_S)
        stop.set()
        for task in (*tasks, subscriber):
            task.cancel()
        await asyncio.gather(*tasks, subscriber, return_exceptions=True)
        await asyncio.to_thread(self.cluster.restart, leader)
        for i, fleet in enumerate(self.cluster.fleets):
            if fleet.proc.poll() is not None:  # without nodes nothing would run: stop
                raise RuntimeError(f"nexus-node {i} exited with {fleet.proc.returncode}")
        fig.rounds += 1

    async def finish(self) -> None:
        """Everything final, then every whole-run check."""
        assert self.cluster is not None
        fig, st = self.fig, self.client.state
        leader = await self.leader()
        control = self.control(leader)
        # What the last kill left unanswered goes in once more (then the client is idle).
        deadline = time.monotonic() + 60
        while st.unanswered and time.monotonic() < deadline:
            if not await self.client.submit_batch(control, 10):
                await asyncio.sleep(0.2)
        records, newest = await self.client.final_checks(control, self.args.final_timeout)
        # Every replica holds the same log: 1..newest, byte for byte.
        recorders = [EventRecorder(r) for r in self.cluster.replicas]
        try:
            logs = {
                replica.name: await rec.until(newest, 120)
                for replica, rec in zip(self.cluster.replicas, recorders, strict=True)
            }
        finally:
            for rec in recorders:
                await rec.close()
        problems = compare_event_logs(logs, newest)
        fig.replica_log_problems = len(problems)
        for text in problems:
            fig.problem(text)
        await asyncio.to_thread(self.cluster.stop_fleets)  # flushes their records
        self.client.check_record(records, self.records)
        for replica in self.cluster.replicas:
            count = replica.log_path.read_text(errors="replace").count("Traceback")
            fig.server_tracebacks += count
            if count:
                fig.problem(f"{count} tracebacks in {replica.log_path}")

    async def run(self) -> ClusterFigures:
        fig = self.fig
        fig.implementation = nexus_fast.implementation()
        started = time.monotonic()
        self.etcd.start()
        try:
            self.cluster = Cluster(
                self.workdir, self.etcd.endpoints, self.args.replicas, lease_ttl=self.args.lease_ttl
            )
            await asyncio.to_thread(self.cluster.start)
            self.records = self.cluster.start_fleets(self.args.nodes)
            for number in range(self.args.rounds):
                if self.args.max_time and time.monotonic() - started > self.args.max_time:
                    break
                await self.one_round(number)
                if self.args.progress and (number + 1) % self.args.progress == 0:
                    print(
                        f"round {number + 1}: failover max {max(fig.failover_s, default=0)}s, "
                        f"{len(self.client.state.acked)} acknowledged, {fig.events} events, "
                        f"{time.monotonic() - started:.0f}s",
                        file=sys.stderr,
                        flush=True,
                    )
            await self.finish()
        finally:
            for channel in self.channels.values():
                await channel.close()
            if self.cluster is not None:
                self.cluster.stop()
            self.etcd.stop()
        fig.commands_acknowledged = len(self.client.state.acked)
        if fig.failover_s:
            fig.failover_p50_s = round(statistics.median(fig.failover_s), 3)
            fig.failover_max_s = max(fig.failover_s)
        fig.wall_time_s = round(time.monotonic() - started, 1)
        fig.finished_utc = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="leader kills (default 20)")
    parser.add_argument("--replicas", type=int, default=3, help="replicas (default 3)")
    parser.add_argument("--nodes", type=int, default=30, help="nexus-node nodes (default 30)")
    parser.add_argument("--lease-ttl", type=float, default=2.0, help="seconds (default 2)")
    parser.add_argument(
        "--max-failover", type=float, default=5.0, metavar="SECONDS",
        help="a failover slower than this fails the run (default 5)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument(
        "--max-time", type=float, default=0, metavar="SECONDS",
        help="start no round after this long; 0 = run every round (default)",
    )  # fmt: skip
    parser.add_argument("--final-timeout", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--workdir", type=Path, help="keep data and logs here (default: temp)")
    parser.add_argument("--progress", type=int, default=0, metavar="N", help="a line every N")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 31)
    args.command = " ".join(
        ["scripts/chaos_cluster.py", *(argv if argv is not None else sys.argv[1:])]
    )
    # SIGTERM ends the run like Ctrl-C: `finally` stops the replicas, fleets and etcd.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="nexus-chaos-cluster-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        fig = asyncio.run(ClusterChaos(args, workdir).run())
    report = json.dumps(asdict(fig), indent=2)
    if args.json:
        args.json.write_text(report + "\n")
    print(report)
    return 0 if fig.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
