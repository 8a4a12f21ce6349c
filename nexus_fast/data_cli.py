"""``nexus-fast backup | restore | check | replay``: the data directory, offline and live.

All four open the store read-only (restore: only the backup) and never take the running
server's ``nexus.lock``, so they work next to a running server; restore takes that lock
itself, so it refuses while a server runs there.

* ``backup --db-path DIR --out FILE``: a consistent, compacted copy (0600, written to a
  temporary name and renamed into place) while the server keeps writing.
* ``restore FILE --db-path DIR [--force]``: checks the backup (as ``check``), refuses a
  non-empty directory without ``--force`` and a directory a server holds, installs it.
* ``check --db-path DIR``: every problem of the store, one line each
  (:mod:`nexus_fast.store.check`).
* ``replay --db-path DIR [--until-index N | --until-time T]``: the state right after
  event N (:mod:`nexus_fast.core.replay`), printed as tables or ``-o json``, or served
  read-only over HTTP (``--serve PORT``, :mod:`nexus_fast.api.replay_http`).

Exit codes: 0 done (check: no problem), 1 failed (check: problems found; the reason or
each problem on its own line), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import lmdb
import orjson

from nexus_fast.codec.json import agent_to_dict, command_to_dict, node_to_dict
from nexus_fast.core.replay import EventLogPruned, ReplayError, Snapshot, fold
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store.backup import backup_to_file, restore
from nexus_fast.store.base import StoreError
from nexus_fast.store.check import COMMAND_RECORD, LAST_EVENT_KEY, StoreCheck
from nexus_fast.store.datafile import crash_guard, data_file, iter_records, open_db, open_read_only

COMMANDS: Final = ("backup", "restore", "check", "replay")
"""The ``nexus-fast`` subcommands this module runs."""

PROG = "nexus-fast"


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)
    return 1


# ----------------------------------------------------------------------- backup / restore


def _backup(args: argparse.Namespace) -> int:
    size = backup_to_file(args.db_path, args.out)
    print(f"backup of {args.db_path} written to {args.out} ({size} bytes)")
    return 0


def _report(check: StoreCheck, what: Path) -> int:
    problems = check.run()
    for problem in problems:
        print(problem)
    if problems:
        print(f"{PROG} check: {what}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    counts = ", ".join(f"{name} {n}" for name, n in check.counts.items())
    print(
        f"check ok: {what}: {counts}; schema version {check.schema_version}; "
        f"audit head {check.audit_head or '0 (empty)'}"
    )
    return 0


def _check(args: argparse.Namespace) -> int:
    check = StoreCheck(args.db_path)
    with crash_guard(check.crash_report, fd=1):  # a crash is named as a problem too
        return _report(check, args.db_path)


def _restore(args: argparse.Namespace) -> int:
    check = StoreCheck(args.backup)
    with crash_guard(check.crash_report, fd=1):
        problems = check.run()
    if problems:
        for problem in problems:
            print(problem)
        return _fail(f"restore refused: the backup {args.backup} has {len(problems)} problem(s)")
    size = restore(args.backup, args.db_path, force=args.force)
    print(f"restored {args.backup} into {args.db_path} ({size} bytes)")
    return 0


# ----------------------------------------------------------------------- replay


def _parse_time(text: str) -> int:
    """ISO-8601 (``2026-12-02T08:00:00Z``; no zone = UTC) or Unix epoch milliseconds."""
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected ISO-8601 (2026-12-02T08:00:00Z) or epoch milliseconds"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return int(moment.timestamp() * 1000)


def load_snapshot(
    db_path: Path, until_index: int | None = None, until_time_ms: int | None = None
) -> Snapshot:
    """Fold the event log of the store at ``db_path`` (read-only) up to the bound."""
    env, _ = open_read_only(db_path)
    try:
        events = open_db(env, "events")
        meta = open_db(env, "meta")
        commands = open_db(env, "commands")
        if events is None or meta is None or commands is None:
            raise ReplayError(f"{db_path}: not a nexus store (events, meta or commands missing)")
        with env.begin(db=meta) as txn:
            raw = txn.get(LAST_EVENT_KEY)
        newest = int.from_bytes(raw, "big") if raw else 0
        with env.begin(db=events) as txn:
            empty = not txn.cursor().first()
        if empty and newest:
            raise EventLogPruned(newest + 1)
        log = ((int.from_bytes(key, "big"), body) for key, body in iter_records(env, events))
        snapshot = fold(log, until_index, until_time_ms)
        # The events left payloads above 1 KiB out; a spec never changes, so the stored
        # record (while the command is kept) has the same one.
        with env.begin(db=commands) as txn:
            for command_id in snapshot.slim_payloads:
                stored = txn.get(COMMAND_RECORD + command_id.encode())
                if stored is not None:
                    payload = pb.CommandRecord.FromString(stored).spec.payload
                    snapshot.commands[command_id].spec.payload = payload
        return snapshot
    finally:
        env.close()


def snapshot_json(snapshot: Snapshot) -> dict[str, Any]:
    """The snapshot as the live JSON API shows each entity, in id order."""
    return {
        "index": snapshot.index,
        "time_ms": snapshot.time_ms,
        "nodes": [node_to_dict(snapshot.nodes[i]) for i in sorted(snapshot.nodes)],
        "commands": [command_to_dict(snapshot.commands[i]) for i in sorted(snapshot.commands)],
        "agents": [agent_to_dict(snapshot.agents[i]) for i in sorted(snapshot.agents)],
    }


def _table(title: str, header: Sequence[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=False)]
    lines = [f"{title} ({len(rows)})"]
    for row in [list(header), *rows]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def snapshot_text(snapshot: Snapshot) -> str:
    view = snapshot_json(snapshot)
    when = datetime.fromtimestamp(snapshot.time_ms / 1000, UTC).isoformat(timespec="milliseconds")
    nodes = [
        [
            n["id"],
            n["status"],
            str(n["eligible"]).lower(),
            str(n["connected"]).lower(),
            n["address"],
        ]
        for n in view["nodes"]
    ]
    commands = [
        [c["id"], c["spec"]["kind"], c["state"], c["node_id"], str(c["attempt"])]
        for c in view["commands"]
    ]
    agents = [[a["id"], a["state"], a["node_id"], a["message"]] for a in view["agents"]]
    return "\n\n".join(
        [
            f"state after event {snapshot.index} ({when if snapshot.index else 'no events'})",
            _table("NODES", ["ID", "STATUS", "ELIGIBLE", "CONNECTED", "ADDRESS"], nodes),
            _table("COMMANDS", ["ID", "KIND", "STATE", "NODE", "ATTEMPT"], commands),
            _table("AGENTS", ["ID", "STATE", "NODE", "MESSAGE"], agents),
        ]
    )


async def _serve(snapshot: Snapshot, host: str, port: int) -> int:
    from aiohttp import web

    from nexus_fast.api.replay_http import replay_app

    runner = web.AppRunner(replay_app(snapshot), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            return _fail(f"replay: cannot listen on {host}:{port}: {exc.strerror or exc}")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        print(
            f"serving the state after event {snapshot.index} read-only on "
            f"http://{host}:{port}/api/v1/ (nodes, commands, agents); Ctrl-C stops",
            flush=True,
        )
        await stop.wait()
        return 0
    finally:
        await runner.cleanup()


def _replay(args: argparse.Namespace) -> int:
    try:
        snapshot = load_snapshot(args.db_path, args.until_index, args.until_time)
    except ReplayError as exc:
        return _fail(f"replay: {exc}")
    if args.serve is not None:
        return asyncio.run(_serve(snapshot, args.host, args.serve))
    if args.output == "json":
        sys.stdout.buffer.write(orjson.dumps(snapshot_json(snapshot)) + b"\n")
    else:
        print(snapshot_text(snapshot))
    return 0


# ----------------------------------------------------------------------- arguments


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Backups, checks and replays.")
    sub = parser.add_subparsers(dest="command", required=True)

    backup = sub.add_parser("backup", help="compacted copy of a (running) server's store")
    backup.add_argument("--db-path", required=True, type=Path, metavar="DIR", help="data directory")
    backup.add_argument("--out", required=True, type=Path, metavar="FILE", help="copy to write")

    rest = sub.add_parser("restore", help="install a backup into a data directory")
    rest.add_argument("backup", type=Path, metavar="FILE", help="a backup file (or backup dir)")
    rest.add_argument("--db-path", required=True, type=Path, metavar="DIR", help="data directory")
    rest.add_argument("--force", action="store_true", help="replace the data of a non-empty dir")

    check = sub.add_parser("check", help="verify a store; one line per problem")
    check.add_argument("--db-path", type=Path, required=True, metavar="DIR|FILE")

    replay = sub.add_parser("replay", help="the state as it was right after an event")
    replay.add_argument("--db-path", required=True, type=Path, metavar="DIR", help="data directory")
    until = replay.add_mutually_exclusive_group()
    until.add_argument("--until-index", type=int, metavar="N", help="right after event N")
    until.add_argument(
        "--until-time",
        type=_parse_time,
        metavar="TIME",
        help="after the last event at or before TIME (ISO-8601 or epoch ms)",
    )
    replay.add_argument("-o", "--output", choices=("table", "json"), default="table")
    replay.add_argument("--serve", type=int, metavar="PORT", help="serve it read-only over HTTP")
    replay.add_argument("--host", default="127.0.0.1", help="address for --serve (127.0.0.1)")
    return parser


def main(argv: Sequence[str]) -> int:
    """Run one of :data:`COMMANDS` (``argv`` starts with its name); returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage
        return exc.code if isinstance(exc.code, int) else 2
    if args.command == "replay" and args.until_index is not None and args.until_index < 0:
        print(f"{PROG} replay: --until-index must be >= 0", file=sys.stderr)
        return 2
    run = {"backup": _backup, "restore": _restore, "check": _check, "replay": _replay}
    read = args.backup if args.command == "restore" else args.db_path
    crashed = (
        f"{data_file(read)}: reading it crashed: the file is damaged beyond what LMDB can "
        "walk; restore a backup (nexus-fast restore)"
    )
    try:
        with crash_guard(crashed):
            return run[args.command](args)
    except StoreError as exc:
        return _fail(f"{args.command}: {exc}")
    except lmdb.Error as exc:
        return _fail(f"{args.command}: {args.db_path}: {exc}")
    except BrokenPipeError:  # `replay | head`
        return 0
