"""Real replicas in cluster mode on a real etcd, for the cluster tests and the cluster chaos loop.

:class:`Cluster` starts N ``nexus-fast`` processes (``[cluster] enabled = true``, each with
its own data directory, its own free loopback ports and a config file written here) on the
etcd of an :class:`~nexus_fast.cluster.etcd_procs.EtcdCluster`, finds the leader from every
replica's own view (``GetClusterStatus``), and kills (SIGKILL),
pauses (SIGSTOP), resumes (SIGCONT) or restarts replicas by pid. ``stop`` ends every one
of them by pid, also after a failed test (the :func:`cluster` context manager).

The per-process part is conftest's :class:`ServerProcess` (same command line, environment
and ``/ready`` wait); ``nexus-node`` fleets are conftest's :class:`Fleet`, given every
replica as a target. The client-side checks (nothing acknowledged lost, nothing run twice
on a node, events contiguous and seen once) are ``scripts/chaos.py``'s ``ChaosClient``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import grpc.aio

from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

from .conftest import REPO, Fleet, ServerProcess

# Long enough that no node goes down while its stream moves to another replica after a
# kill (nexus-node reconnects with a jittered backoff); heartbeats keep their usual pace.
CLUSTER_ENV = {
    "NEXUS_NODE_TIMEOUT": "20s",
    "NEXUS_HEARTBEAT_INTERVAL": "1s",
    "NEXUS_LOG_LEVEL": "warning",
}


# Per attempt: a result lost with a killed replica's stream is retried after this, not 30 s.
COMMANDS_TABLE = {"default_timeout": "10s"}


def with_table(config_text: str, table: str, settings: dict[str, Any]) -> str:
    """``config_text`` with its ``[table]`` (if any) replaced by ``settings``."""
    text = re.sub(rf"(?ms)^\[{re.escape(table)}\]\n.*?(?=^\[|\Z)", "", config_text)
    lines = ["", f"[{table}]"]
    for key, value in settings.items():
        lines.append(f"{key} = {json.dumps(value)}")  # JSON strings, numbers, lists are TOML
    return text.rstrip("\n") + "\n" + "\n".join(lines) + "\n"


@dataclass
class ClusterView:
    """What one replica says about the cluster (its GetClusterStatus answer)."""

    name: str
    role: str  # leader | follower | candidate
    leader: str  # the leader's name as this replica knows it ("" none)
    term: int
    applied_seq: int
    ready: bool  # caught up, and a leader is known (or it leads)


class Replica(ServerProcess):
    """One ``nexus-fast serve`` process of the cluster (restartable on its data and ports)."""

    def __init__(
        self,
        name: str,
        workdir: Path,
        etcd_endpoints: Sequence[str],
        prefix: str,
        lease_ttl: float,
        **env: str,
    ) -> None:
        (workdir / name).mkdir(parents=True, exist_ok=True)
        super().__init__(workdir / name / "data", workdir / f"{name}.log", **{**CLUSTER_ENV, **env})
        self.name = name
        self.config = workdir / f"{name}.toml"
        base = (REPO / "configs" / "development.toml").read_text()
        self.config.write_text(
            with_table(
                with_table(base, "commands", COMMANDS_TABLE),
                "cluster",
                {
                    "enabled": True,
                    "name": name,
                    "etcd_endpoints": list(etcd_endpoints),
                    "etcd_prefix": prefix,
                    "lease_ttl": lease_ttl,
                    "advertise": self.grpc_target,
                },
            )
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def view(self, timeout: float = 2.0) -> ClusterView | None:
        """This replica's own view (GetClusterStatus, answered locally), or None when it
        does not answer (dead, paused, starting)."""
        try:
            with self.channel() as channel:
                status = pb_grpc.ControlServiceStub(channel).GetClusterStatus(
                    pb.GetClusterStatusRequest(), timeout=timeout
                )
        except grpc.RpcError as exc:
            if exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return None
            raise
        return ClusterView(
            name=status.name,
            role=status.role,
            leader=status.leader_name,
            term=status.term,
            applied_seq=status.applied_seq,
            ready=status.ready,
        )

    def last_event_index(self) -> int:
        _, body, _ = self.http("/health/detailed")
        return int(json.loads(body)["components"]["store"]["last_event_index"])


class Cluster:
    """N replicas sharing one etcd prefix; every process is stopped by pid in :meth:`stop`."""

    def __init__(
        self,
        workdir: Path,
        etcd_endpoints: Sequence[str],
        replicas: int = 3,
        *,
        lease_ttl: float = 2.0,
        prefix: str | None = None,
        **env: str,
    ) -> None:
        self.workdir = workdir
        self.prefix = prefix or f"/nexus-test-{uuid.uuid4().hex[:8]}"
        self.lease_ttl = lease_ttl
        self.replicas = [
            Replica(f"r{i}", workdir, etcd_endpoints, self.prefix, lease_ttl, **env)
            for i in range(replicas)
        ]
        self.fleets: list[Fleet] = []

    # ------------------------------------------------------------ processes

    def start(self, timeout: float = 60.0) -> Cluster:
        """Start every replica at once, wait until each is ready and one leads."""
        for replica in self.replicas:
            replica.launch()
        for replica in self.replicas:
            replica.wait_ready(timeout)
        self.wait_leader(timeout)
        return self

    def kill(self, replica: Replica) -> None:
        """SIGKILL (``kill -9``) and reap it."""
        if replica.alive():
            replica.signal(signal.SIGCONT)  # harmless when running; a paused one dies either way
            replica.proc.kill()  # type: ignore[union-attr]
            replica.proc.wait()  # type: ignore[union-attr]

    def pause(self, replica: Replica) -> None:
        replica.signal(signal.SIGSTOP)

    def resume(self, replica: Replica) -> None:
        replica.signal(signal.SIGCONT)

    def restart(self, replica: Replica, timeout: float = 60.0) -> None:
        """Start a dead replica again on its data directory and ports; wait until ready."""
        assert not replica.alive(), f"{replica.name} is still running"
        replica.launch()
        replica.wait_ready(timeout)

    def stop(self) -> None:
        """Every fleet and replica, by pid: SIGCONT (a paused one), SIGTERM, then SIGKILL."""
        for fleet in self.fleets:
            if fleet.proc.poll() is None:
                fleet.proc.kill()
                fleet.proc.wait()
        for replica in self.replicas:
            replica.signal(signal.SIGCONT)
            replica.signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for replica in self.replicas:
            if replica.proc is None:
                continue
            try:
                replica.proc.wait(max(0.1, deadline - time.monotonic()))
            except Exception:
                replica.proc.kill()
                replica.proc.wait()

    # ------------------------------------------------------------ roles

    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.alive()]

    def views(self) -> dict[str, ClusterView | None]:
        return {r.name: r.view() if r.alive() else None for r in self.replicas}

    def leader_now(self, among: Sequence[Replica] | None = None) -> Replica | None:
        """The replica that says it leads and serves (its core is loaded: it answers a
        submit itself) and that every answering replica names, or None."""
        candidates = list(among) if among is not None else self.live()
        views = {r.name: r.view(1.0) for r in candidates}
        leaders = [
            r
            for r in candidates
            if (v := views[r.name]) is not None and v.role == "leader" and v.ready
        ]
        if len(leaders) != 1:
            return None
        name = leaders[0].name
        for view in views.values():
            if view is not None and view.role != "leader" and view.leader not in ("", name):
                return None  # someone still names an older leader
        return leaders[0]

    def wait_leader(
        self, timeout: float = 30.0, among: Sequence[Replica] | None = None, not_: str = ""
    ) -> Replica:
        """Wait until one replica (not named ``not_``) leads and the others agree."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            leader = self.leader_now(among)
            if leader is not None and leader.name != not_:
                return leader
            time.sleep(0.05)
        raise AssertionError(f"no single leader within {timeout}s: {self.views()}")

    def followers(self, leader: Replica) -> list[Replica]:
        return [r for r in self.live() if r is not leader]

    def wait_caught_up(self, timeout: float = 30.0) -> int:
        """Wait until every live replica has applied the leader's position of now; returns it."""
        leader = self.wait_leader(timeout)
        view = leader.view()
        assert view is not None, f"the leader {leader.name} does not answer"
        deadline = time.monotonic() + timeout
        views: dict[str, ClusterView | None] = {}
        while time.monotonic() < deadline:
            views = {r.name: r.view() for r in self.live()}
            if all(v is not None and v.applied_seq >= view.applied_seq for v in views.values()):
                return view.applied_seq
            time.sleep(0.1)
        raise AssertionError(f"replicas not at {view.applied_seq} within {timeout}s: {views}")

    # ------------------------------------------------------------ clients

    def targets(self, first: int = 0) -> list[str]:
        """Every replica's gRPC address, starting with replica ``first``."""
        rotated = self.replicas[first:] + self.replicas[:first]
        return [r.grpc_target for r in rotated]

    def start_fleets(self, nodes: int, *extra: str) -> list[Path]:
        """One ``nexus-node`` per replica, ``nodes`` in all, each first connecting to its
        own replica and failing over to the others; returns their ``--record`` files."""
        records = []
        for i in range(len(self.replicas)):
            count = nodes // len(self.replicas) + (1 if i < nodes % len(self.replicas) else 0)
            record = self.workdir / f"record-{i}.jsonl"
            records.append(record)
            self.fleets.append(
                Fleet(
                    fleet_target(self.targets(i)),
                    count,
                    self.workdir / f"fleet-{i}.log",
                    "--id-prefix",
                    f"f{i}-",
                    "--record",
                    str(record),
                    *extra,
                )
            )
        return records

    def stop_fleets(self) -> None:
        """SIGTERM every fleet (flushes its record) and wait."""
        for fleet in self.fleets:
            fleet.stop()


def fleet_target(targets: Sequence[str]) -> str:
    """``nexus-node --target`` for several replicas (comma-separated)."""
    return ",".join(targets)


@contextlib.contextmanager
def cluster(
    workdir: Path, etcd_endpoints: Sequence[str], replicas: int = 3, **kwargs: Any
) -> Iterator[Cluster]:
    """A started :class:`Cluster`, stopped by pid on exit (also when the body fails)."""
    c = Cluster(workdir, etcd_endpoints, replicas, **kwargs)
    try:
        yield c.start()
    finally:
        c.stop()


# ---------------------------------------------------------------- events


class EventRecorder:
    """A WatchEvents stream on one replica, keeping every event's serialized bytes."""

    def __init__(self, replica: ServerProcess, after_index: int = 0) -> None:
        self.replica = replica
        self.channel = replica.aio_channel()
        stub = pb_grpc.ControlServiceStub(self.channel)
        self.call = stub.WatchEvents(pb.WatchEventsRequest(after_index=after_index))
        self.events: list[tuple[int, bytes]] = []
        self.error: grpc.aio.AioRpcError | None = None
        self._task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for batch in self.call:
                self.events.extend((e.index, e.SerializeToString()) for e in batch.events)
        except grpc.aio.AioRpcError as err:
            self.error = err

    @property
    def position(self) -> int:
        return self.events[-1][0] if self.events else 0

    async def until(self, index: int, timeout: float = 30.0) -> list[tuple[int, bytes]]:
        """Events up to ``index`` once received (AssertionError after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while self.position < index:
            if self._task.done():
                raise AssertionError(f"watch on {self.replica.grpc_target} ended: {self.error}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"watch on {self.replica.grpc_target} at {self.position}, wanted {index}"
                )
            await asyncio.sleep(0.02)
        return [e for e in self.events if e[0] <= index]

    async def close(self) -> None:
        self.call.cancel()
        await asyncio.gather(self._task, return_exceptions=True)
        await self.channel.close()


def compare_event_logs(logs: dict[str, list[tuple[int, bytes]]], end: int) -> list[str]:
    """Problems (in words) unless every log is exactly events 1..end, byte-identical."""
    problems = []
    names = sorted(logs)
    for name in names:
        indices = [i for i, _ in logs[name]]
        if indices != list(range(1, end + 1)):
            missing = sorted(set(range(1, end + 1)) - set(indices))[:5]
            problems.append(f"{name}: {len(indices)} events for 1..{end}, missing {missing}")
    reference = names[0]
    for name in names[1:]:
        for (i, a), (j, b) in zip(logs[reference], logs[name], strict=False):
            if i != j or a != b:
                problems.append(f"{name} differs from {reference} at index {i}/{j}")
                break
    return problems
