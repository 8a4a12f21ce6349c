"""``nexus-bench``: measure nexus_fast end to end, with the baseline it is judged against.

    nexus-bench dispatch --spawn --baseline --duration 10 --json out.json
    nexus-bench heartbeat --target 127.0.0.1:50053 --http 8082 --nodes 10000
    nexus-bench events --spawn --subscribers 100 --baseline
    nexus-bench heartbeat --spawn --baseline --nodes 10000 --client-procs 2
    nexus-bench state --baseline
    nexus-bench micro
    nexus-bench roundtrip --spawn --baseline --before --peers ray,celery
    nexus-bench relay --nodes 2000 --rate 5000 --duration 20 --rounds 2

Exit codes: 0 done and the error rate within ``--max-error-rate``; 1 error rate exceeded
or the run failed; 2 invalid arguments; 130 interrupted (Ctrl-C) — children are stopped
and temporary directories removed in every case.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import ipaddress
import math
import os
import signal
import socket
import sys
from collections.abc import Sequence
from typing import Any

import nexus_fast.node.channel as client_channel
from nexus_fast.benchmark.clustercost import SCENARIOS as CLUSTER_SCENARIOS
from nexus_fast.benchmark.clustercost import parse_cluster
from nexus_fast.benchmark.common import Context
from nexus_fast.benchmark.peers import missing as missing_peers
from nexus_fast.benchmark.peers import parse_peers
from nexus_fast.benchmark.procs import BenchError, Endpoints, ProcessGroup, spawn_server
from nexus_fast.benchmark.report import Report
from nexus_fast.benchmark.runner import HARD_MAX_DURATION, HARD_MAX_OPS
from nexus_fast.benchmark.scenarios.etcdcommit import MAX_VALUE_BYTES, parse_members
from nexus_fast.benchmark.workers import MAX_CLIENT_PROCS
from nexus_fast.node.channel import ClientAuth
from nexus_fast.node.targets import parse_targets

SCENARIOS = (
    "heartbeat",
    "dispatch",
    "events",
    "state",
    "micro",
    "roundtrip",
    "catchup",
    "etcd",
    "relay",
)
NETWORK = frozenset({"heartbeat", "dispatch", "events"})
SERVED = NETWORK | {"roundtrip"}  # scenarios that need --target or --spawn
DEFAULT_NODES = {"heartbeat": 100, "dispatch": 100, "events": 10, "relay": 1000}

_SCENARIO_DOC = {
    "heartbeat": """\
N nodes stream heartbeats (back to back, or --interval/--rate); heartbeats handled/s by
the server. Baseline: bare grpc.aio bidi echo, same streams.""",
    "dispatch": """\
SubmitCommands batches -> place -> dispatch -> node ack+result -> succeeded; commands/s,
latency submit->node receives, ->reply, ->final (sampled).

Its commands go to its own simulated nodes only: every node of the run registers with
the label nexus-bench-run=<random> and every command selects that label, so other nodes
of the server (a nexus-node fleet, an earlier run) never receive them.

Baselines: bare grpc.aio unary echo of the same request, same concurrency/rate; and the
dispatch floor, a grpc.aio server with the same RPCs and no work behind them, driven by
the same client and fleet (ours / floor: what our work costs on top of the transport).""",
    "events": """\
M WebSocket subscribers (+ gRPC WatchEvents watchers) while a command load runs (on this
run's own nodes, as dispatch); delivered events/s, event time->receive latency.
Baseline: bare picows broadcast of one of our frames to M subscribers.""",
    "state": """\
LmdbStore in this process: durable commits/s per --levels, get/s.
Baseline: bare py-lmdb, one synced txn per put.""",
    "micro": "ring, queue, scoring: compiled twin vs pure twin (ratio c/py).",
    "roundtrip": """\
One command (or --concurrency) in flight: SubmitCommands with wait_ms -> a nexus-node
child process (--exec-duration 0, this run's label) -> SUCCEEDED in the reply; p50/p99/p99.9.

--before: also the path before issue 11 (node holding each send 2 ms, Submit then
WaitCommands) and Submit then WaitCommands with today's node. --baseline: bare grpc.aio
unary echo of the same request, and one synced LMDB commit on the same filesystem. --peers ray,celery: the same no-op round trip on Ray
(ray.init(num_cpus=2): a task and an actor method) and Celery + Redis (redis-server on a
free loopback port and a solo worker, started and stopped here); needs pip install
'.[peers]'. The server's means (submit->dispatch, submit->final, SubmitCommands call)
show where the time goes.""",
    "catchup": """\
A subscriber catching up --events events from the durable log (zero-copy batches read in
this process), vs a bare py-lmdb cursor scan of the same records (always measured); the
pure twin and the envelope-per-event path on the first --pure-events. Rounds are
interleaved for --duration seconds; the best of each counts.""",
    "etcd": """\
The replicated log's commit on real etcd (members started here, --members 1,3): one fenced
txn per commit (compare the leader key's create_revision and the log key's version == 0,
put --value-bytes), --levels in flight; commits/s, latency, etcd and client CPU per commit.
--baseline: interleaved level by level, LmdbStore.commit of the same bytes (synced, the
embedded default) and a bare etcd Range of one key (the client's gRPC floor).""",
    "relay": """\
CPU per node message a follower relays to the leader (issue 12). Starts 1 etcd member and
3 cluster-mode replicas, connects --nodes nodes to the two followers only, heartbeats at
--rate for --duration; each process's CPU from /proc. Same run, each round interleaved:
the same nodes and rate on the embedded server (CPU per direct heartbeat) and on a bare
grpc.aio bidi echo. Reports the leader's CPU per relayed heartbeat, each follower's per
heartbeat received and relayed, frames per RelayUp, and the ratios (medians of --rounds).""",
}

_SUMMARY = {
    "heartbeat": "node streams heartbeat: heartbeats handled/s",
    "dispatch": "commands end to end, on this run's own nodes: commands/s, latency",
    "events": "WebSocket and gRPC event fan-out under a command load",
    "state": "LMDB store in this process: durable commits/s, get/s",
    "micro": "hot paths: compiled twin vs pure twin",
    "roundtrip": "one command in flight, submit -> node -> final; vs echo, Ray, Celery",
    "catchup": "catch-up from the durable event log vs a bare py-lmdb scan",
    "etcd": "one replicated-log commit on real etcd (1/3 members) vs an LMDB commit",
    "relay": "leader/follower CPU per relayed heartbeat vs a direct one (3 replicas)",
}

_RATE_NOTE = """\
--rate R is operations per second on a fixed timetable (dispatch/events: batches,
heartbeat: heartbeats over all nodes); latency then counts from the intended send time."""

_CLIENT_PROCS_NOTE = """\
--client-procs K runs the node streams / WebSocket subscribers in K client worker
processes (an even split, the same for ours and the baseline; dispatch's submits,
WaitCommands samples and unary echo baseline stay in the main process), so one client
process no longer bounds both sides; the JSON records client_procs and each worker's CPU."""

_CLUSTER_NOTE = """\
--cluster 1,3 starts the embedded server and, per N, etcd (1 member for N=1, else 3) with N
replicas ([cluster] enabled, own data dirs), waits for a leader, and runs the scenario on
each system in turn, --cluster-rounds times (interleaved), the targets of a cluster spread
over its replicas; ratios are cluster / embedded (medians over rounds). A cluster's server
CPU is its replicas' plus its etcd members'."""

_CPU_NOTE = """\
Ratios are printed raw and per server CPU-second as well: when a client, not the server,
sets both rates, the second still compares the servers."""

_EPILOG = """\
nexus-bench SCENARIO --help shows that scenario's options.

Exit codes: 0 done and the error rate within --max-error-rate; 1 error rate exceeded or
the run failed; 2 invalid arguments; 130 interrupted."""

# What a scenario's namespace holds for the options it does not take (the checks and the
# report read one shape of namespace for every scenario).
_DEFAULTS: dict[str, Any] = {
    "target": None,
    "spawn": False,
    "http": None,
    "ws": None,
    "tls_ca": None,
    "tls_cert": None,
    "tls_key": None,
    "tls_server_name": None,
    "token": None,
    "node_token_secret": None,
    "auth": False,
    "allow_remote": False,
    "baseline": False,
    "count": None,
    "rate": None,
    "concurrency": 4,
    "batch_size": 100,
    "nodes": None,
    "interval": None,
    "subscribers": 100,
    "watchers": 1,
    "levels": [1, 16, 256],
    "final_every": 20,
    "client_procs": 1,
    "peers": None,
    "peer_count": None,
    "warmup": 0,
    "before": False,
    "members": [1, 3],
    "cluster": None,
    "cluster_rounds": 2,
    "value_bytes": 1024,
    "rounds": 2,
}


def _pos_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _pos_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number within 0..1, got {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"expected a number within 0..1, got {text!r}")
    return value


def _levels(text: str) -> list[int]:
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected e.g. 1,16,256, got {text!r}") from None
    if not levels or any(x < 1 for x in levels):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,16,256, got {text!r}")
    return levels


def _server_options(p: argparse.ArgumentParser, scenario: str) -> None:
    s = p.add_argument_group("server under test")
    where = s.add_mutually_exclusive_group()
    where.add_argument(
        "--target",
        action="append",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="a running server's gRPC address; several replicas: comma separated or repeated "
        "(the simulated nodes spread over them, submits move on when one is UNAVAILABLE)",
    )
    where.add_argument(
        "--spawn",
        action="store_true",
        help="start python -m nexus_fast.cli on free 127.0.0.1 ports with a temporary data dir",
    )
    if scenario in CLUSTER_SCENARIOS:
        where.add_argument(
            "--cluster",
            type=parse_cluster,
            metavar="N[,N...]",
            help="start the embedded server AND, per N, etcd (1 member for N=1, else 3) with "
            "N cluster-mode replicas; run the scenario on each, interleaved (see --help)",
        )
        s.add_argument(
            "--cluster-rounds",
            type=_pos_int,
            default=2,
            help="with --cluster: rounds over every system, each --duration long (2)",
        )
    s.add_argument(
        "--http", metavar="URL|PORT", help="the target's HTTP port or base URL (/metrics)"
    )
    s.add_argument("--ws", metavar="URL|PORT", help="the target's WebSocket port or base URL")
    client_channel.add_arguments(s)
    s.add_argument(
        "--auth",
        action="store_true",
        help="with --spawn (heartbeat, dispatch): measure twice in one run, against a "
        "server with auth off and one with auth on (mTLS + bearer tokens, a throw-away "
        "PKI), and report both and the ratio",
    )
    s.add_argument(
        "--allow-remote",
        action="store_true",
        help="allow a --target that is not a loopback address",
    )


def _load_options(p: argparse.ArgumentParser, scenario: str) -> None:
    w = p.add_argument_group("load")
    if scenario not in ("micro", "catchup", "relay"):
        w.add_argument("--baseline", action="store_true", help="also measure the baseline")
    w.add_argument(
        "--duration",
        type=_pos_float,
        default=10.0,
        help=f"seconds of measurement (default 10, at most {HARD_MAX_DURATION:.0f})",
    )
    if scenario in NETWORK:
        w.add_argument(
            "--count",
            "--commands",
            dest="count",
            type=_pos_int,
            default=None,
            help="stop after this many operations (commands for dispatch/events, heartbeats)",
        )
        w.add_argument("--rate", type=_pos_float, default=None, help="fixed rate, operations/s")
        w.add_argument(
            "--nodes",
            type=_pos_int,
            default=None,
            help=f"simulated nodes of this run (default {DEFAULT_NODES[scenario]})"
            + ("; its commands go to these only" if scenario != "heartbeat" else ""),
        )
        w.add_argument(
            "--client-procs",
            type=_pos_int,
            default=1,
            help="split the client load (node streams, WebSocket subscribers) over K "
            "worker processes, ours and baseline alike (1)",
        )
    if scenario == "roundtrip":
        w.add_argument(
            "--count", type=_pos_int, default=None, help="stop after this many round trips"
        )
        w.add_argument("--concurrency", type=_pos_int, default=1, help="round trips in flight (1)")
        w.add_argument(
            "--warmup", type=int, default=50, help="untimed round trips first, each system (50)"
        )
        w.add_argument(
            "--before",
            action="store_true",
            help="also measure the path before issue 11 (2 ms node hold, Submit then Wait)",
        )
    if scenario in ("roundtrip", "dispatch"):
        w.add_argument(
            "--peers",
            type=parse_peers,
            default=None,
            metavar="ray,celery",
            help="also run the same no-op workload on Ray and/or Celery + Redis "
            "(needs pip install '.[peers]' and, for Celery, Debian's redis-server)",
        )
        w.add_argument(
            "--peer-count",
            type=_pos_int,
            default=None,
            help="tasks per peer measurement (roundtrip: --count or 2000; dispatch: 20000)",
        )
    if scenario in ("dispatch", "events"):
        w.add_argument(
            "--concurrency", type=_pos_int, default=4, help="requests in flight, closed loop (4)"
        )
        w.add_argument("--batch-size", type=_pos_int, default=100, help="commands per submit (100)")
    if scenario == "heartbeat":
        w.add_argument(
            "--interval",
            type=_pos_float,
            default=None,
            help="seconds between heartbeats of one node (default: back to back)",
        )
    if scenario == "dispatch":
        w.add_argument(
            "--final-every",
            type=int,
            default=20,
            help="time submit->final on one command of every Nth batch (20; 0 = off)",
        )
    if scenario == "events":
        w.add_argument("--subscribers", type=_pos_int, default=100, help="WebSocket subscribers")
        w.add_argument(
            "--watchers", type=int, default=1, help="gRPC WatchEvents streams (default 1)"
        )
    if scenario == "catchup":
        w.add_argument(
            "--events", type=_pos_int, default=1_000_000, help="events in the log (1000000)"
        )
        w.add_argument(
            "--pure-events",
            type=_pos_int,
            default=100_000,
            help="events the pure twin and the envelope path catch up (100000)",
        )
    if scenario in ("state", "etcd"):
        default = [1, 16, 256] if scenario == "state" else [1, 16, 64]
        w.add_argument(
            "--levels",
            type=_levels,
            default=default,
            help=f"commits in flight, comma separated ({','.join(map(str, default))})",
        )
    if scenario == "relay":
        w.add_argument(
            "--nodes",
            type=_pos_int,
            default=None,
            help=f"simulated nodes, on the followers (default {DEFAULT_NODES[scenario]})",
        )
        w.add_argument(
            "--rate", type=_pos_float, default=2000.0, help="heartbeats/s over all nodes (2000)"
        )
        w.add_argument(
            "--rounds", type=_pos_int, default=2, help="rounds over the three systems (2)"
        )
    if scenario == "etcd":
        w.add_argument(
            "--members", type=parse_members, default=[1, 3], help="etcd cluster sizes (1,3)"
        )
        w.add_argument(
            "--value-bytes", type=_pos_int, default=1024, help="bytes put per commit (1024)"
        )


def _output_options(p: argparse.ArgumentParser) -> None:
    o = p.add_argument_group("output")
    o.add_argument("--json", metavar="FILE", help="write the machine-readable report")
    o.add_argument("--plot", metavar="FILE.png", help="draw latency percentiles (matplotlib)")
    o.add_argument(
        "--max-error-rate",
        type=_fraction,
        default=0.01,
        help="exit 1 when errors / attempts exceed this (default 0.01)",
    )


def _scenario_description(scenario: str) -> str:
    notes = [_SCENARIO_DOC[scenario]]
    if scenario in NETWORK:
        notes += [_RATE_NOTE, _CLIENT_PROCS_NOTE]
    if scenario in ("heartbeat", "dispatch"):
        notes.append(_CPU_NOTE)
    if scenario in CLUSTER_SCENARIOS:
        notes.append(_CLUSTER_NOTE)
    return "\n\n".join(notes)


def build_parser() -> argparse.ArgumentParser:
    """The nexus-bench argument parser: one sub-command per scenario, each with its options."""
    p = argparse.ArgumentParser(
        prog="nexus-bench",
        description="Benchmark nexus_fast end to end, side by side with a bare baseline.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="scenario", required=True, metavar="SCENARIO")
    for scenario in SCENARIOS:
        sp = sub.add_parser(
            scenario,
            help=_SUMMARY[scenario],
            description=_scenario_description(scenario),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        if scenario in SERVED:
            _server_options(sp, scenario)
        _load_options(sp, scenario)
        _output_options(sp)
        taken = {a.dest for a in sp._actions}
        sp.set_defaults(**{k: v for k, v in _DEFAULTS.items() if k not in taken})
    return p


def _is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(
                ipaddress.ip_address(info[4][0]).is_loopback
                for info in socket.getaddrinfo(host, None)
            )
        except OSError:
            return False


def _split_target(target: str) -> tuple[str, int]:
    host, sep, port = target.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--target must be HOST:PORT, got {target!r}")
    return host, int(port)


def _url(value: str | None, host: str, scheme: str) -> str | None:
    if not value:
        return None
    if value.isdigit():
        return f"{scheme}://{host}:{value}"
    if "://" not in value:
        raise ValueError(f"expected a port or a {scheme}:// URL, got {value!r}")
    return value.rstrip("/")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and cross-check the arguments (argparse exits 2 on errors)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.scenario in SERVED:
        if not args.target and not args.spawn and not args.cluster:
            parser.error(f"{args.scenario} needs --target HOST:PORT, --spawn or --cluster N")
        if args.target:
            try:
                args.targets = parse_targets(args.target)
                args.target = ",".join(args.targets)
                hosts = [_split_target(t)[0] for t in args.targets]
                args.http_url = _url(args.http, hosts[0], "http")
                args.ws_url = _url(args.ws, hosts[0], "ws")
            except ValueError as exc:
                parser.error(f"--target: {exc}")
            for host, target in zip(hosts, args.targets, strict=True):
                if not args.allow_remote and not _is_loopback(host):
                    parser.error(f"--target {target} is not a loopback address; add --allow-remote")
            if args.scenario == "events" and not args.ws_url:
                parser.error("events with --target needs --ws (the WebSocket port or URL)")
        elif args.http or args.ws:
            parser.error("--http/--ws go with --target (--spawn knows its own ports)")
    client_channel.check_arguments(parser, args)
    if args.spawn and (args.tls_ca or args.tls_cert):
        parser.error("--spawn starts a plaintext server; TLS options need --target")
    if args.auth:
        from nexus_fast.benchmark.authcost import SCENARIOS as AUTH_SCENARIOS

        if not args.spawn or args.scenario not in AUTH_SCENARIOS:
            parser.error("--auth goes with --spawn, for heartbeat or dispatch")
        if args.baseline:
            parser.error("--auth compares the server with itself; run --baseline separately")
        if args.token or args.node_token_secret:
            parser.error("--auth makes its own credentials; drop --token/--node-token-secret")
    if args.duration > HARD_MAX_DURATION:
        parser.error(f"--duration is at most {HARD_MAX_DURATION:.0f} s")
    if args.count is not None and args.count > HARD_MAX_OPS:
        parser.error(f"--count is at most {HARD_MAX_OPS}")
    if args.interval is not None and args.rate is not None:
        parser.error("--interval and --rate both set the heartbeat rate: give one")
    if args.watchers < 0 or args.final_every < 0:
        parser.error("--watchers and --final-every must be >= 0")
    if args.plot:
        try:
            importlib.import_module("matplotlib")
        except ImportError:
            parser.error(
                "--plot needs matplotlib: pip install 'nexus-fast[plot]' (or pip install matplotlib)"
            )
    if args.peers:
        why = missing_peers(args.peers)
        if why:
            parser.error(why)
    if args.value_bytes > MAX_VALUE_BYTES:
        parser.error(f"--value-bytes is at most {MAX_VALUE_BYTES} (etcd's request limit here)")
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.nodes is None:
        args.nodes = DEFAULT_NODES.get(args.scenario, 1)
    if args.client_procs > 1:
        if args.client_procs > MAX_CLIENT_PROCS:
            parser.error(f"--client-procs is at most {MAX_CLIENT_PROCS}")
        nodes = args.scenario in ("heartbeat", "dispatch")
        load = args.nodes if nodes else args.subscribers
        if args.client_procs > load:
            what = "--nodes" if nodes else "--subscribers"
            parser.error(f"--client-procs {args.client_procs} is more than {what} {load}")
    return args


def _config(args: argparse.Namespace) -> dict[str, Any]:
    config = {
        k: v for k, v in vars(args).items() if isinstance(v, str | int | float | bool | list | None)
    }
    if config.get("token"):
        config["token"] = "(set)"  # the report says a token was used, never which
    return config


async def _run(ctx: Context) -> None:
    from nexus_fast.benchmark.scenarios import (
        catchup,
        dispatch,
        etcdcommit,
        events,
        heartbeat,
        micro,
        relay,
        roundtrip,
        state,
    )

    modules = {
        "heartbeat": heartbeat,
        "dispatch": dispatch,
        "events": events,
        "state": state,
        "micro": micro,
        "roundtrip": roundtrip,
        "catchup": catchup,
        "etcd": etcdcommit,
        "relay": relay,
    }
    await modules[ctx.args.scenario].run(ctx)


async def _locate_server(ctx: Context, group: ProcessGroup) -> None:
    """``--spawn`` a server, or point at ``--target``."""
    args = ctx.args
    if args.spawn:
        print("nexus-bench: starting the server ...", file=sys.stderr)
        loop = asyncio.get_running_loop()
        ctx.server = await loop.run_in_executor(None, lambda: spawn_server(group))
        ctx.report.config["server"] = {"spawned": True, "grpc": ctx.server.grpc}
    else:
        targets = tuple(args.targets)
        ctx.server = Endpoints(targets[0], args.http_url, args.ws_url, targets=targets)
        ctx.report.config["server"] = {"spawned": False, "grpc": args.target}


async def amain(args: argparse.Namespace, group: ProcessGroup) -> Report:
    """Run the scenario; Ctrl-C/SIGTERM ends the measurement early (the report still prints)."""
    report = Report(scenario=args.scenario, config=_config(args))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    hits = [0]

    def on_signal() -> None:
        hits[0] += 1
        stop.set()
        if hits[0] > 1:  # a second Ctrl-C: stop waiting for the drain
            for task in asyncio.all_tasks(loop):
                task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    ctx = Context(args=args, group=group, report=report, stop=stop, auth=ClientAuth.from_args(args))
    try:
        if args.auth:
            from nexus_fast.benchmark import authcost

            await authcost.run(ctx, group, _run)
        elif args.cluster:
            from nexus_fast.benchmark import clustercost

            await clustercost.run(ctx, group, _run)
        else:
            if args.scenario in SERVED:
                await _locate_server(ctx, group)
            await _run(ctx)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    if stop.is_set():
        report.notes.append("interrupted: figures cover the part that ran")
        report.exit_code = 130
    return report


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``nexus-bench``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_worker"]:  # hidden: a client worker process (--client-procs)
        from nexus_fast.benchmark import roles

        return roles.main(argv[1:])
    args = parse_args(argv)
    import uvloop

    group = ProcessGroup()
    try:
        report = uvloop.run(amain(args, group))
    except BenchError as exc:
        print(f"nexus-bench: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("nexus-bench: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # one line, not a traceback (NEXUS_BENCH_DEBUG=1 shows it)
        if os.environ.get("NEXUS_BENCH_DEBUG"):
            raise
        detail = exc.details() if hasattr(exc, "details") else str(exc)
        print(
            f"nexus-bench: {args.scenario} failed: {type(exc).__name__}: {detail}", file=sys.stderr
        )
        return 1
    finally:
        group.close()
    rate = report.error_rate()
    if report.exit_code == 0 and rate > args.max_error_rate:
        report.exit_code = 1
        report.notes.append(
            f"error rate {rate:.2%} exceeds --max-error-rate {args.max_error_rate:.2%}"
        )
    if report.exit_code == 0 and not report.results:
        report.exit_code = 1
        report.notes.append("nothing was measured")
    print(report.table())
    if args.json:
        report.write_json(args.json)
        print(f"json: {args.json}")
    if args.plot:
        report.plot(args.plot)
        print(f"plot: {args.plot}")
    return report.exit_code


if __name__ == "__main__":
    sys.exit(main())
