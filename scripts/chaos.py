#!/usr/bin/env python3
"""Crash loop: kill the real server over and over and prove nothing acknowledged is lost.

One data directory, one set of ports, a ``nexus-node`` fleet that stays up (``--record``:
one line per command it ran) and a client in this process. Each round starts
``nexus-fast`` on the same data and ports, then, while the client submits batches (with
idempotency keys, re-sending those a crash left unanswered and some already answered) and
a ``WatchEvents`` subscriber follows the log from the last index it saw, the server dies:

* ``kill`` rounds: SIGKILL at a random moment;
* failpoint rounds: ``NEXUS_FAILPOINTS=<site>=crash@N`` (N random), so the server exits
  at that line on its Nth pass: before, inside and after the store commit, between commit
  and dispatch, between commit and reply, on a stream send. SIGKILL if it has not within
  a few seconds.

Each restart checks that every answered command exists under its id; the end (one more
clean start) waits for every one to be final, and checks: no idempotency key maps to two
commands, no command ran twice on one node (the fleet's record), every SUCCEEDED command
ran on its node, event indices seen once each and contiguous. Figures go to ``--json``
and, with ``--docs``, into docs/reliability.md between the ``chaos:figures`` markers.
Exit status 1 when any check failed.

    python scripts/chaos.py --rounds 1000 --json chaos.json --docs docs/reliability.md
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("GRPC_VERBOSITY", "ERROR")  # before grpc loads: no fork() notices

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

import nexus_fast
from nexus_fast.failpoints import CRASH_EXIT_CODE
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"

# Crash sites the rounds cycle through, with the largest N of crash@N (how many passes
# the site sees before it fires: commits are frequent, submits less so).
CRASH_SITES: dict[str, int] = {
    "store.before_commit": 12,
    "store.commit": 12,
    "store.after_commit": 12,
    "commands.before_dispatch": 6,
    "commands.before_reply": 6,
    "stream.send": 10,
}
FINAL = {
    pb.COMMAND_STATE_SUCCEEDED,
    pb.COMMAND_STATE_FAILED,
    pb.COMMAND_STATE_TIMED_OUT,
    pb.COMMAND_STATE_CANCELLED,
}
BATCH = 4  # commands per SubmitCommands
FAILPOINT_WAIT_S = 3.0  # a crash failpoint that has not fired by then: SIGKILL
# stream.send fires only once nodes are back on their streams (reconnect backoff).
FAILPOINT_WAIT_STREAM_S = 10.0
KILL_AFTER_S = (0.05, 1.0)  # a kill round's SIGKILL comes this long after ready
MARKER_BEGIN = "<!-- chaos:figures:begin -->"
MARKER_END = "<!-- chaos:figures:end -->"


@dataclass
class Figures:
    """What a run measured; written as JSON and into docs/reliability.md."""

    rounds: int = 0
    rounds_requested: int = 0  # more than rounds when --max-time ended the run
    kill_rounds: int = 0
    failpoint_rounds: dict[str, int] = field(default_factory=dict)
    failpoint_crashes: dict[str, int] = field(default_factory=dict)  # exited 86 there
    nodes: int = 0
    commands_acknowledged: int = 0
    duplicate_answers: int = 0  # re-sent keys answered with the existing command
    submits_cut_by_crash: int = 0
    lost: int = 0  # acknowledged, missing after a restart or at the end
    not_final: int = 0  # acknowledged, not final by the end
    idempotency_violations: int = 0  # a key answered with another id, or held by 2 commands
    ran_twice_on_a_node: int = 0
    succeeded_not_run: int = 0  # SUCCEEDED on node X but X's record never ran it
    events: int = 0
    event_gaps: int = 0
    events_seen_twice: int = 0
    subscriber_errors: int = 0
    unexpected_errors: int = 0
    server_tracebacks: int = 0
    unexpected_exits: int = 0  # exited mid-round with neither 86 nor our SIGKILL
    start_failures: int = 0  # the server exited at start (not a failpoint): log tail in errors
    implementation: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    command: str = ""
    wall_time_s: float = 0.0
    finished_utc: str = ""
    errors: list[str] = field(default_factory=list)  # the first few problems, in words

    def ok(self) -> bool:
        return not (
            self.lost
            or self.not_final
            or self.idempotency_violations
            or self.ran_twice_on_a_node
            or self.succeeded_not_run
            or self.event_gaps
            or self.events_seen_twice
            or self.unexpected_errors
            or self.server_tracebacks
            or self.start_failures
            or self.unexpected_exits
        )

    def problem(self, text: str) -> None:
        if len(self.errors) < 20:
            self.errors.append(text)


@dataclass
class ClientState:
    """What the client knows across rounds."""

    acked: dict[str, str] = field(default_factory=dict)  # command id -> key ("" none)
    unchecked: list[str] = field(default_factory=list)  # acked since the last restart
    not_final: set[str] = field(default_factory=set)
    unanswered: set[str] = field(default_factory=set)  # keys a crash cut off: re-sent
    next_key: int = 0
    last_index: int = 0  # the subscriber's newest event index


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((HOST, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def spec_for(key: str) -> pb.CommandSpec:
    """The same key always carries the same spec (a re-send must match to de-duplicate)."""
    return pb.CommandSpec(kind="echo", payload=key.encode(), idempotency_key=key)


class ChaosClient:
    """The client side of a crash loop and its checks, for any set of servers.

    Submits batches with idempotency keys (re-sending those a crash left unanswered),
    follows the event log from the last index it saw, and checks what it was told
    against what the servers hold and what the nodes ran. ``scripts/chaos_cluster.py``
    and the cluster tests reuse it against several replicas.
    """

    def __init__(self, fig: Figures, rng: random.Random) -> None:
        self.fig = fig
        self.rng = rng
        self.state = ClientState()
        self.batches = 0  # SubmitCommands calls made

    def _next_keys(self) -> list[str]:
        st = self.state
        keys = [st.unanswered.pop() for _ in range(min(len(st.unanswered), BATCH))]
        while len(keys) < BATCH:
            keys.append(f"k{st.next_key:07d}")
            st.next_key += 1
        if st.acked and self.rng.random() < 0.2:  # an answered key again: same id, duplicate
            keys[-1] = self.rng.choice(list(st.acked))
            if not st.acked[keys[-1]]:
                keys[-1] = f"k{st.next_key:07d}"
                st.next_key += 1
        return keys

    async def submit_batch(self, control: pb_grpc.ControlServiceStub, timeout: float = 5) -> bool:
        """Submit one batch and note what was answered; False when the call failed.

        Keys a failed call carried are re-sent by a later batch; an error a crash or a
        failover cannot explain is counted in ``unexpected_errors``.
        """
        st, fig = self.state, self.fig
        keys = self._next_keys()
        specs = [spec_for(k) for k in keys]
        self.batches += 1
        if self.batches % 3 == 0:  # and one without a key: the server names it
            specs.append(pb.CommandSpec(kind="echo", payload=b"nokey"))
        try:
            answer = await control.SubmitCommands(
                pb.SubmitCommandsRequest(commands=specs), timeout=timeout
            )
        except grpc.aio.AioRpcError as exc:
            st.unanswered.update(keys)  # re-sent next round under the same keys
            fig.submits_cut_by_crash += 1
            if exc.code() not in (
                grpc.StatusCode.UNAVAILABLE,
                grpc.StatusCode.CANCELLED,
                grpc.StatusCode.DEADLINE_EXCEEDED,
                grpc.StatusCode.UNKNOWN,  # the connection died mid-answer
                grpc.StatusCode.INTERNAL,
            ):
                fig.unexpected_errors += 1
                fig.problem(f"SubmitCommands: {exc.code().name}: {exc.details()}")
            return False
        for result, spec in zip(answer.results, specs, strict=True):
            key = spec.idempotency_key
            if key and result.id != key:
                fig.idempotency_violations += 1
                fig.problem(f"key {key!r} answered with id {result.id!r}")
            if result.duplicate:
                fig.duplicate_answers += 1
                if key not in st.acked and key:
                    st.acked[result.id] = key  # committed before a crash, answered now
                    st.unchecked.append(result.id)
                    st.not_final.add(result.id)
                continue
            st.acked[result.id] = key
            st.unchecked.append(result.id)
            st.not_final.add(result.id)
        return True

    async def submitter(self, control: pb_grpc.ControlServiceStub) -> None:
        """Submit batches until a call fails."""
        while await self.submit_batch(control):
            await asyncio.sleep(0.005)

    def on_event(self, event: pb.Event) -> None:
        """One event of the followed log: counted, checked for a gap or a repeat."""
        st, fig = self.state, self.fig
        if event.index <= st.last_index:
            fig.events_seen_twice += 1
            fig.problem(f"event {event.index} seen again after {st.last_index}")
            return
        if event.index != st.last_index + 1:
            fig.event_gaps += event.index - st.last_index - 1
            fig.problem(f"events {st.last_index + 1}..{event.index - 1} missing")
        st.last_index = event.index
        fig.events += 1

    async def subscriber(self, control: pb_grpc.ControlServiceStub, until: int = 0) -> None:
        """Follow the log from the last index seen; with ``until``, stop once there."""
        st, fig = self.state, self.fig
        call = control.WatchEvents(pb.WatchEventsRequest(after_index=st.last_index))
        try:
            async for batch in call:
                for event in batch.events:
                    self.on_event(event)
                if until and st.last_index >= until:
                    call.cancel()
                    return
        except grpc.aio.AioRpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                fig.subscriber_errors += 1
                fig.unexpected_errors += 1
                fig.problem(f"WatchEvents: {exc.code().name}: {exc.details()}")

    async def check_acked_exist(self, control: pb_grpc.ControlServiceStub) -> None:
        """After a restart: every command answered before it is there, under its id."""
        st = self.state
        while st.unchecked:  # one by one: a crash mid-way leaves the rest for next time
            command_id = st.unchecked[-1]
            try:
                await control.GetCommand(pb.GetCommandRequest(id=command_id), timeout=10)
            except grpc.aio.AioRpcError as exc:
                if exc.code() != grpc.StatusCode.NOT_FOUND:
                    raise
                self.fig.lost += 1
                self.fig.problem(f"acknowledged command {command_id} lost")
                st.not_final.discard(command_id)
            st.unchecked.pop()

    async def collect_final(self, control: pb_grpc.ControlServiceStub, timeout: float) -> None:
        """Drop from ``not_final`` the commands that reach a final state within ``timeout``."""
        st = self.state
        ids = sorted(st.not_final)
        for start in range(0, len(ids), 10_000):
            chunk = ids[start : start + 10_000]
            call = control.WaitCommands(
                pb.WaitCommandsRequest(ids=chunk, timeout_ms=int(timeout * 1000)),
                timeout=timeout + 30,
            )
            async for record in call:
                if record.id and record.state in FINAL:
                    st.not_final.discard(record.id)

    async def all_commands(self, control: pb_grpc.ControlServiceStub) -> list[pb.CommandRecord]:
        out: list[pb.CommandRecord] = []
        token = ""
        while True:
            page = await control.ListCommands(
                pb.ListCommandsRequest(page_size=5000, page_token=token), timeout=30
            )
            out.extend(page.commands)
            token = page.next_page_token
            if not token:
                return out

    async def final_checks(
        self, control: pb_grpc.ControlServiceStub, final_timeout: float
    ) -> tuple[list[pb.CommandRecord], int]:
        """The end of a run: every answered command exists and is final, no idempotency key
        on two commands, and the subscriber has seen every event up to one committed now.
        Returns every command record and that newest event index."""
        fig, st = self.fig, self.state
        await self.check_acked_exist(control)
        await self.collect_final(control, final_timeout)
        fig.not_final = len(st.not_final)
        for command_id in sorted(st.not_final)[:5]:
            fig.problem(f"command {command_id} not final after the run")
        records = await self.all_commands(control)
        self.check_keys(records)
        newest = (
            await control.SubmitCommands(
                pb.SubmitCommandsRequest(commands=[pb.CommandSpec(kind="echo")]), timeout=10
            )
        ).index
        await asyncio.wait_for(self.subscriber(control, until=newest), 60)
        return records, newest

    def check_keys(self, records: list[pb.CommandRecord]) -> None:
        """No idempotency key is held by two commands."""
        by_key = Counter(r.spec.idempotency_key for r in records if r.spec.idempotency_key)
        for key, count in by_key.items():
            if count > 1:
                self.fig.idempotency_violations += 1
                self.fig.problem(f"idempotency key {key!r} held by {count} commands")

    def check_record(self, records: list[pb.CommandRecord], paths: list[Path]) -> None:
        """Nothing ran twice on one node; every SUCCEEDED command ran on its node.

        ``paths``: the ``nexus-node --record`` files of every fleet (node ids differ).
        """
        fig = self.fig
        runs: Counter[tuple[str, str]] = Counter()
        for path in paths:
            if not path.exists():
                continue
            for line in path.read_text().splitlines():
                row = json.loads(line)
                runs[(row["node_id"], row["command_id"])] += 1
        for (node, command_id), count in runs.items():
            if count > 1:
                fig.ran_twice_on_a_node += 1
                fig.problem(f"command {command_id} ran {count} times on {node}")
        for record in records:
            if record.state == pb.COMMAND_STATE_SUCCEEDED and not runs[(record.node_id, record.id)]:
                fig.succeeded_not_run += 1
                fig.problem(f"command {record.id} SUCCEEDED on {record.node_id}, never ran there")


class Chaos:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.rng = random.Random(args.seed)
        self.fig = Figures(
            nodes=args.nodes, seed=args.seed, command=args.command, rounds_requested=args.rounds
        )
        self.client = ChaosClient(self.fig, self.rng)
        self.state = self.client.state
        self.data = workdir / "data"
        self.record = workdir / "record.jsonl"
        self.server_log = workdir / "server.log"
        self.grpc_port, self.ws_port, self.http_port = free_ports(3)
        self.target = f"{HOST}:{self.grpc_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.fleet: subprocess.Popen[bytes] | None = None
        self.workdir = workdir

    # ------------------------------------------------------------ processes

    def start_server(self, failpoints: str = "") -> None:
        env = {
            **os.environ,
            "NEXUS_LOG_FORMAT": "json",
            "NEXUS_LOG_LEVEL": "warning",
            "NEXUS_NODE_TIMEOUT": "3s",
            "NEXUS_HEARTBEAT_INTERVAL": "0.5s",
            "NEXUS_DB_CACHE_SIZE": "64MB",
            "NEXUS_SHUTDOWN_TIMEOUT": "10s",
        }
        env.pop("NEXUS_FAILPOINTS", None)
        if failpoints:
            env["NEXUS_FAILPOINTS"] = failpoints
        with self.server_log.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "nexus_fast.cli",
                    "--config",
                    str(REPO / "configs" / "development.toml"),
                    "--host",
                    HOST,
                    "--grpc-port",
                    str(self.grpc_port),
                    "--ws-port",
                    str(self.ws_port),
                    "--http-port",
                    str(self.http_port),
                    "--db-path",
                    str(self.data),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
            )

    def start_fleet(self) -> None:
        with (self.workdir / "fleet.log").open("ab") as log:
            self.fleet = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "nexus_fast.node",
                    "--target",
                    self.target,
                    "--nodes",
                    str(self.args.nodes),
                    "--record",
                    str(self.record),
                    "--status-interval",
                    "0",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )

    async def wait_ready(self, channel: grpc.aio.Channel, timeout: float = 60.0) -> bool:
        """True once serving; False if a crash failpoint ended the start (it may)."""
        health = health_pb2_grpc.HealthStub(channel)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            code = self.proc.poll()
            if code == CRASH_EXIT_CODE:
                return False
            if code is not None:
                tail = self.server_log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"server exited with {code} at start:\n{tail}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if answer.status == health_pb2.HealthCheckResponse.SERVING:
                    return True
            await asyncio.sleep(0.05)
        raise RuntimeError(f"server not ready within {timeout}s")

    async def wait_exit(self, timeout: float) -> int | None:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while self.proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        return self.proc.poll()

    def kill(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait()

    # ------------------------------------------------------------ rounds

    async def one_round(self, number: int) -> None:
        fig = self.fig
        if self.rng.random() < self.args.kill_share:
            site, spec = "", ""
            fig.kill_rounds += 1
        else:
            # Each site in turn: every site has its rounds once there are six of them.
            site = list(CRASH_SITES)[sum(fig.failpoint_rounds.values()) % len(CRASH_SITES)]
            spec = f"{site}=crash@{self.rng.randint(1, CRASH_SITES[site])}"
            fig.failpoint_rounds[site] = fig.failpoint_rounds.get(site, 0) + 1
        self.start_server(spec)
        async with grpc.aio.insecure_channel(self.target) as channel:
            control = pb_grpc.ControlServiceStub(channel)
            try:
                ready = await self.wait_ready(channel)
            except RuntimeError as exc:  # counted, and the next round tries again
                fig.start_failures += 1
                fig.problem(f"round {number}: {exc}")
                if fig.start_failures >= 3:
                    raise
                fig.rounds += 1
                return
            if not ready:  # crashed while starting (its own commits)
                fig.failpoint_crashes[site] = fig.failpoint_crashes.get(site, 0) + 1
                fig.rounds += 1
                return
            if self.fleet is None:
                self.start_fleet()
            elif self.fleet.poll() is not None:  # without nodes nothing would run: stop
                log = (self.workdir / "fleet.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"nexus-node exited with {self.fleet.returncode}:\n{log}")
            try:
                await self.client.check_acked_exist(control)
                await self.client.collect_final(control, 0.05)
            except grpc.aio.AioRpcError as exc:
                # A crash failpoint fires on any commit, the server's own ones too.
                if exc.code() != grpc.StatusCode.UNAVAILABLE:
                    raise
                if await self.wait_exit(5) == CRASH_EXIT_CODE:
                    fig.failpoint_crashes[site] = fig.failpoint_crashes.get(site, 0) + 1
                self.kill()
                fig.rounds += 1
                return
            tasks = [
                asyncio.create_task(self.client.submitter(control)),
                asyncio.create_task(self.client.subscriber(control)),
            ]
            if site:
                wait = FAILPOINT_WAIT_STREAM_S if site == "stream.send" else FAILPOINT_WAIT_S
                code = await self.wait_exit(wait)
                if code == CRASH_EXIT_CODE:
                    fig.failpoint_crashes[site] = fig.failpoint_crashes.get(site, 0) + 1
            else:
                await asyncio.sleep(self.rng.uniform(*KILL_AFTER_S))
            assert self.proc is not None
            code = self.proc.poll()
            if code is not None and code != CRASH_EXIT_CODE:  # died by itself, not by us
                fig.unexpected_exits += 1
                tail = self.server_log.read_text(errors="replace")[-2000:]
                fig.problem(f"round {number}: the server exited with {code}:\n{tail}")
            self.kill()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        fig.rounds += 1

    async def finish(self) -> None:
        """One clean start: everything final, then every whole-run check."""
        fig = self.fig
        self.start_server()
        async with grpc.aio.insecure_channel(self.target) as channel:
            control = pb_grpc.ControlServiceStub(channel)
            if not await self.wait_ready(channel):
                raise RuntimeError("the final start crashed with no failpoint set")
            records, _ = await self.client.final_checks(control, self.args.final_timeout)
        assert self.fleet is not None and self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(30)
        self.fleet.send_signal(signal.SIGTERM)  # flushes its record
        self.fleet.wait(30)
        self.client.check_record(records, [self.record])
        log = self.server_log.read_text(errors="replace")
        fig.server_tracebacks = log.count("Traceback")
        if fig.server_tracebacks:
            fig.problem(f"{fig.server_tracebacks} tracebacks in {self.server_log}")

    async def run(self) -> Figures:
        fig = self.fig
        fig.implementation = nexus_fast.implementation()
        started = time.monotonic()
        try:
            for number in range(self.args.rounds):
                if self.args.max_time and time.monotonic() - started > self.args.max_time:
                    break  # out of time: finish with the rounds run (fig.rounds says how many)
                await self.one_round(number)
                if self.args.progress and (number + 1) % self.args.progress == 0:
                    print(
                        f"round {number + 1}: {len(self.state.acked)} acknowledged, "
                        f"{fig.events} events, {time.monotonic() - started:.0f}s",
                        file=sys.stderr,
                        flush=True,
                    )
            await self.finish()
        finally:
            for proc in (self.proc, self.fleet):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
        fig.commands_acknowledged = len(self.state.acked)
        fig.wall_time_s = round(time.monotonic() - started, 1)
        fig.finished_utc = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        return fig


def figures_markdown(fig: Figures) -> str:
    crashes = ", ".join(
        f"`{site}` {fig.failpoint_crashes.get(site, 0)}/{rounds}"
        for site, rounds in sorted(fig.failpoint_rounds.items())
    )
    rounds = f"{fig.rounds:,}"
    if fig.rounds_requested > fig.rounds:
        rounds += f" (of {fig.rounds_requested:,} requested: `--max-time` ended the run)"
    impl = "compiled" if all(v == "c" for v in fig.implementation.values()) else "pure"
    rows = [
        ("rounds (server killed and restarted)", rounds),
        ("of them SIGKILL at a random moment", f"{fig.kill_rounds:,}"),
        ("crash failpoint rounds (fired/rounds)", crashes or "none"),
        ("nodes (nexus-node, kept up)", f"{fig.nodes}"),
        ("commands acknowledged", f"{fig.commands_acknowledged:,}"),
        ("re-sent keys answered as duplicates", f"{fig.duplicate_answers:,}"),
        ("submits cut off by a crash (re-sent)", f"{fig.submits_cut_by_crash:,}"),
        ("acknowledged commands lost", f"{fig.lost}"),
        ("acknowledged commands not final at the end", f"{fig.not_final}"),
        ("idempotency violations", f"{fig.idempotency_violations}"),
        ("commands run twice on one node", f"{fig.ran_twice_on_a_node}"),
        ("SUCCEEDED but never run on its node", f"{fig.succeeded_not_run}"),
        ("events seen by the resuming subscriber", f"{fig.events:,}"),
        ("event gaps / events seen twice", f"{fig.event_gaps} / {fig.events_seen_twice}"),
        (
            "unexpected errors / tracebacks / failed starts / other exits",
            f"{fig.unexpected_errors} / {fig.server_tracebacks} / {fig.start_failures}"
            f" / {fig.unexpected_exits}",
        ),
        ("wall time", f"{fig.wall_time_s:,.0f} s ({impl} twins, seed {fig.seed})"),
    ]
    lines = [
        f"Last long run: `{fig.command}`, {fig.finished_utc}, on a 2-core machine shared "
        "with other work.",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {name} | {value} |" for name, value in rows),
    ]
    return "\n".join(lines)


def write_docs(path: Path, fig: Figures) -> None:
    text = path.read_text()
    pattern = re.compile(re.escape(MARKER_BEGIN) + ".*?" + re.escape(MARKER_END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{path}: no {MARKER_BEGIN} ... {MARKER_END} block to fill")
    block = f"{MARKER_BEGIN}\n{figures_markdown(fig)}\n{MARKER_END}"
    path.write_text(pattern.sub(lambda _: block, text, count=1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=50, help="server kills (default 50)")
    parser.add_argument("--nodes", type=int, default=4, help="nexus-node nodes (default 4)")
    parser.add_argument(
        "--kill-share", type=float, default=0.5, help="share of SIGKILL rounds (default 0.5)"
    )
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    parser.add_argument(
        "--max-time", type=float, default=0, metavar="SECONDS",
        help="start no round after this long; 0 = run every round (default)",
    )  # fmt: skip
    parser.add_argument("--final-timeout", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument("--json", type=Path, help="write the figures here")
    parser.add_argument("--docs", type=Path, help="fill the figures block of this Markdown file")
    parser.add_argument("--workdir", type=Path, help="keep data and logs here (default: temp)")
    parser.add_argument("--progress", type=int, default=0, metavar="N", help="a line every N")
    args = parser.parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(1 << 31)
    args.command = " ".join(["scripts/chaos.py", *(argv if argv is not None else sys.argv[1:])])
    # SIGTERM ends the run like Ctrl-C: `finally` kills the server and the fleet.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with tempfile.TemporaryDirectory(prefix="nexus-chaos-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        fig = asyncio.run(Chaos(args, workdir).run())
    report = json.dumps(asdict(fig), indent=2)
    if args.json:
        args.json.write_text(report + "\n")
    if args.docs:
        write_docs(args.docs, fig)
    print(report)
    return 0 if fig.ok() else 1


if __name__ == "__main__":
    sys.exit(main())
