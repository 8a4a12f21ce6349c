"""``nexus-node``: the command line of the reference node proxy.

One process simulates a fleet of N nodes against a nexus_fast server (see
:mod:`nexus_fast.node.sim` for what each node does). Run ``nexus-node --help`` for the
options and the ``--spec`` file format.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import signal
import sys
import tomllib
from collections.abc import Sequence
from typing import Any

from nexus_fast.node.channel import add_arguments, check_arguments
from nexus_fast.node.dedup import StateDirLocked
from nexus_fast.node.fleet import NODES_PER_CHANNEL, Fleet
from nexus_fast.node.policy import DEFAULT_DEDUP_SIZE
from nexus_fast.node.sim import DEFAULT_COALESCE_HOLD_S, log
from nexus_fast.node.spec import (
    DEFAULT_CAPACITY,
    DEFAULT_NODES,
    build_node_specs,
    load_spec_groups,
    parse_capacity,
    parse_exec_duration,
    parse_labels,
)
from nexus_fast.node.targets import parse_targets

DEFAULT_TARGET = "127.0.0.1:50053"

_EPILOG = """\
spec file (--spec): TOML or JSON, a list of node groups. Each group has
  count      number of nodes (required)
  labels     table of label -> value. A value may be a template using {i}
             (index in the fleet), {g} (index in the group) or {id} (node id),
             or a list that cycles by index in the group.
  capacity   table like --capacity; missing keys come from --capacity
  id_prefix  overrides --id-prefix; ids count from 00000 per prefix
--labels/--capacity apply to every group as defaults; --nodes is not allowed with --spec.

  # fleet.toml
  [[groups]]
  count = 800
  labels = { tier = "cpu", zone = ["a", "b", "c"], rack = "r{g}" }
  capacity = { cpu = 16, memory = "64GB" }

  [[groups]]
  count = 200
  id_prefix = "gpu-"
  labels = { tier = "gpu", zone = "a" }
  capacity = { cpu = 32, memory = "256GB", gpu = 8 }

JSON: the same groups as a list, or {"groups": [...]}.
On the command line a label value a|b|c cycles the same way: --labels zone=a|b|c.
Sizes are binary: 1GB = 1GiB = 2^30 bytes; cpu accepts millicores (500m).

Each node: Register (backoff with full jitter 0.2s..10s), then one Connect stream
(heartbeats at the server-advised interval +-10%), ack/execute/report commands,
de-duplicated by command id. SIGINT/SIGTERM stops cleanly; a second one exits at once.
"""


def _arg_type(fn: Any, name: str) -> Any:
    def convert(text: str) -> Any:
        try:
            return fn(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = name
    return convert


def _non_negative(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a non-negative number, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"must be a positive integer, got {text!r}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"must be within 0..1, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The nexus-node argument parser."""
    p = argparse.ArgumentParser(
        prog="nexus-node",
        description="Reference node proxy: simulate a fleet of nodes against a nexus_fast server.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    nonneg = _arg_type(_non_negative, "seconds")
    posint = _arg_type(_positive_int, "count")
    g = p.add_argument_group("fleet")
    g.add_argument(
        "--nodes",
        type=_arg_type(lambda t: int(_non_negative(t)), "count"),
        help=f"number of nodes to simulate (default {DEFAULT_NODES})",
    )
    g.add_argument("--id-prefix", default="node-", help="node id prefix (default %(default)s)")
    g.add_argument(
        "--labels",
        type=_arg_type(parse_labels, "labels"),
        default={},
        help="labels for every node, e.g. zone=a,tier=gpu (a|b|c cycles)",
    )
    g.add_argument(
        "--capacity",
        type=_arg_type(parse_capacity, "capacity"),
        default=dict(DEFAULT_CAPACITY),
        help="capacity, e.g. cpu=8,memory=32GB,gpu=0,disk=100GB (the default)",
    )
    g.add_argument("--spec", metavar="FILE", help="TOML/JSON node groups (see below)")
    g.add_argument("--seed", type=int, default=None, help="random seed (reproducible jitter)")
    c = p.add_argument_group("connection")
    c.add_argument(
        "--target",
        action="append",
        metavar="HOST:PORT[,HOST:PORT...]",
        help="server address, or several replicas (comma separated or repeated): node i "
        "starts on target i mod n and moves to the next (or to the leader the server names) "
        f"when one is UNAVAILABLE (default {DEFAULT_TARGET})",
    )
    c.add_argument(
        "--channels",
        type=posint,
        default=None,
        help=f"gRPC channels (default: one per {NODES_PER_CHANNEL} nodes)",
    )
    c.add_argument(
        "--ramp",
        type=nonneg,
        default=None,
        metavar="SECONDS",
        help="spread node start-up over this long (default: one heartbeat interval)",
    )
    c.add_argument(
        "--keepalive",
        type=nonneg,
        default=0.0,
        metavar="SECONDS",
        help="HTTP/2 keepalive ping interval; 0 = off (default; the server must "
        "permit pings this frequent)",
    )
    add_arguments(c)
    r = p.add_argument_group("run")
    r.add_argument(
        "--duration",
        type=nonneg,
        default=0.0,
        help="exit after this many seconds; 0 = until SIGINT/SIGTERM (default)",
    )
    r.add_argument(
        "--status-interval",
        type=nonneg,
        default=5.0,
        help="seconds between status lines; 0 = only the final one (default 5)",
    )
    r.add_argument("--json-status", action="store_true", help="status lines as JSON")
    r.add_argument(
        "--deregister-on-exit",
        action="store_true",
        help="Deregister nodes on exit (default: leave them to time out)",
    )
    r.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error", "critical"]
    )
    x = p.add_argument_group("commands")
    x.add_argument(
        "--exec-duration",
        type=_arg_type(parse_exec_duration, "duration"),
        default=(0.01, 0.01),
        metavar="SECONDS",
        help='simulated run time, e.g. 0.01 or a range "0.01-0.05" (default 0.01)',
    )
    x.add_argument(
        "--coalesce-hold",
        type=nonneg,
        default=DEFAULT_COALESCE_HOLD_S,
        metavar="SECONDS",
        help="hold acks/results this long before each send so a burst shares a message "
        "(default 0: an idle stream sends at once, a busy one batches what arrives while "
        "a write is in flight)",
    )
    x.add_argument(
        "--failure-rate",
        type=_arg_type(_probability, "rate"),
        default=0.0,
        metavar="P",
        help="probability a command fails (default 0)",
    )
    x.add_argument(
        "--record",
        metavar="FILE",
        help="append a JSON line per executed command (node_id, command_id, attempt, success)",
    )
    x.add_argument(
        "--state-dir",
        metavar="DIR",
        help="keep the de-duplication record in DIR (fsync'd before a command runs and "
        "before its result is sent), so no command runs twice on a node across restarts",
    )
    x.add_argument(
        "--tracing-endpoint",
        metavar="URL",
        help="OTLP/gRPC collector (http://host:4317): a span around each run of a command "
        "whose traceparent is sampled, continuing the core's trace (default: off)",
    )
    x.add_argument(
        "--dedup-size",
        type=posint,
        default=DEFAULT_DEDUP_SIZE,
        metavar="N",
        help="finished command ids remembered for de-duplication, per process "
        "(default %(default)s)",
    )
    return p


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse and validate the CLI; the expanded fleet is in ``args.node_specs``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.spec and args.nodes is not None:
        parser.error("--nodes cannot be combined with --spec (counts come from the spec)")
    check_arguments(parser, args)
    try:
        # One string for logs and callers that read it; the Fleet parses it again.
        args.target = ",".join(parse_targets(args.target or [DEFAULT_TARGET]))
    except ValueError as exc:
        parser.error(f"--target: {exc}")
    try:
        if args.spec:
            groups: list[Any] = load_spec_groups(args.spec)
        else:
            groups = [{"count": DEFAULT_NODES if args.nodes is None else args.nodes}]
        args.node_specs = build_node_specs(
            groups, id_prefix=args.id_prefix, base_labels=args.labels, base_capacity=args.capacity
        )
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        parser.error(f"--spec {args.spec}: {exc}" if args.spec else str(exc))
    if not args.node_specs:
        parser.error("no nodes to simulate")
    return args


async def run_fleet(
    args: argparse.Namespace | Sequence[str], *, stop_event: asyncio.Event | None = None
) -> int:
    """Run a fleet until SIGINT/SIGTERM, ``--duration`` or ``stop_event``; return an exit code."""
    if not isinstance(args, argparse.Namespace):
        args = parse_args(args)
    specs = getattr(args, "node_specs", None)
    if specs is None:
        raise ValueError("args must come from parse_args()")
    loop = asyncio.get_running_loop()
    stop = stop_event or asyncio.Event()
    try:
        fleet = Fleet(args, specs)
    except (StateDirLocked, OSError) as exc:
        log.error("cannot open --state-dir %s: %s", args.state_dir, exc)
        return 2
    signals_seen = 0

    def on_signal(sig: signal.Signals) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen == 1:
            log.info("%s: stopping (again to exit immediately)", sig.name)
            stop.set()
        else:
            log.warning("%s again: exiting immediately", sig.name)
            fleet.flush_record()
            os._exit(130)

    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig)
            installed.append(sig)
        except (NotImplementedError, RuntimeError, ValueError):
            pass  # not the main thread / not supported: rely on stop_event
    try:
        return await fleet.run(stop)
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``nexus-node``)."""
    args = parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s nexus-node: %(message)s",
        stream=sys.stderr,
    )
    try:
        import uvloop
    except ImportError:  # pragma: no cover
        return asyncio.run(run_fleet(args))
    return uvloop.run(run_fleet(args))
