"""``nexus-fast audit verify|export --db-path DIR``: check or dump the audit hash chain.

Opens the LMDB environment read-only, never takes the server's data-directory lock, and
reads in short transactions (a chunk at a time), so it is safe next to a running server.
When LMDB's own lock file cannot be opened (a read-only copy), it reads without it and
says so: then no server may be writing to that directory.

Exit codes: 0 chain intact / export written, 1 chain broken (the first broken entry is
named on stderr) or an entry could not be decoded on export, 2 bad arguments or the
database cannot be opened.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO

import lmdb
import orjson

from nexus_fast.store.audit_chain import (
    AUDIT_DB,
    ChainBreak,
    ChainVerifier,
    audit_key,
    iter_export,
)
from nexus_fast.store.datafile import iter_records

_MAX_DBS = 32  # same as the store's MAX_DBS; opening needs room for the named databases


class AuditCliError(Exception):
    """The command cannot run (exit code 2)."""


def _open_env(db_path: Path, err: IO[str]) -> lmdb.Environment:
    if not (db_path / "data.mdb").is_file():
        raise AuditCliError(f"{db_path}: no LMDB database here (data.mdb not found)")

    def open_env(lock: bool) -> lmdb.Environment:
        return lmdb.open(
            str(db_path),
            subdir=True,
            readonly=True,
            lock=lock,
            max_dbs=_MAX_DBS,
            readahead=False,
        )

    try:
        # lock=True uses LMDB's reader table (not the server's lock): pages we read cannot
        # be reused under us by a running writer.
        return open_env(lock=True)
    except lmdb.Error as exc:
        try:
            env = open_env(lock=False)
        except lmdb.Error as exc2:
            raise AuditCliError(f"{db_path}: cannot open LMDB environment: {exc2}") from None
        print(
            f"nexus-fast audit: warning: opened without LMDB's lock file ({exc}); "
            "results are reliable only if no server is writing to this directory",
            file=err,
        )
        return env


def _entries(env: lmdb.Environment, after: int = 0) -> Iterator[tuple[bytes, bytes]]:
    """Every audit ``(key, value)`` with seq > ``after``, in key order, a chunk per read txn."""
    try:
        db = env.open_db(AUDIT_DB.encode(), create=False)
    except lmdb.NotFoundError:
        return  # no audit database yet: an empty log
    yield from iter_records(env, db, audit_key(after + 1) if after >= 0 else b"")


def _parse_head(text: str) -> tuple[int, bytes]:
    seq_text, sep, hex_text = text.partition(":")
    try:
        seq = int(seq_text)
        digest = bytes.fromhex(hex_text)
    except ValueError:
        seq, digest = 0, b""
    if not sep or seq < 1 or len(digest) != 32:
        raise argparse.ArgumentTypeError("expected SEQ:HASH (hash = 64 hex digits)")
    return seq, digest


def _verify(
    env: lmdb.Environment, expect: tuple[int, bytes] | None, out: IO[str], err: IO[str]
) -> int:
    verifier = ChainVerifier()
    broken: ChainBreak | None = None
    expect_ok = expect is None
    for key, value in _entries(env):
        broken = verifier.feed(key, value)
        if broken is not None:
            break
        if expect is not None and verifier.head.seq == expect[0]:
            if verifier.head.hash != expect[1]:
                broken = ChainBreak(expect[0], "hash differs from --expect-head: chain rewritten")
                break
            expect_ok = True
    if broken is None and not expect_ok:
        assert expect is not None
        broken = ChainBreak(
            expect[0], f"missing: the log ends at entry {verifier.head.seq} (truncated)"
        )
    if broken is not None:
        print(
            f"nexus-fast audit: chain BROKEN at entry {broken.seq}: {broken.reason} "
            f"({verifier.count} entries before it are intact)",
            file=err,
        )
        return 1
    head = verifier.head
    print(
        f"audit chain ok: {verifier.count} entries, head {head.seq}:{head.hash.hex()}",
        file=out,
    )
    return 0


def _export(env: lmdb.Environment, after: int, out: IO[bytes]) -> int:
    status = 0
    for row in iter_export(_entries(env, after)):
        if "error" in row:
            status = 1
        out.write(orjson.dumps(row) + b"\n")
    out.flush()
    return status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nexus-fast audit", description="Verify or export the audit hash chain."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="walk the chain; exit 1 naming the first broken entry")
    verify.add_argument("--db-path", required=True, type=Path, help="LMDB data directory")
    verify.add_argument(
        "--expect-head",
        type=_parse_head,
        metavar="SEQ:HASH",
        help="a head printed by an earlier verify: fail if that entry is gone or differs",
    )
    export = sub.add_parser("export", help="write entries as JSON lines to stdout")
    export.add_argument("--db-path", required=True, type=Path, help="LMDB data directory")
    export.add_argument(
        "--after", type=int, default=0, metavar="SEQ", help="only entries with seq > SEQ"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``nexus-fast audit ...`` with ``argv`` (the words after ``audit``); returns the exit code."""
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage; hand back its code
        return exc.code if isinstance(exc.code, int) else 2
    try:
        env = _open_env(args.db_path, sys.stderr)
    except AuditCliError as exc:
        print(f"nexus-fast audit: {exc}", file=sys.stderr)
        return 2
    try:
        if args.command == "verify":
            return _verify(env, args.expect_head, sys.stdout, sys.stderr)
        try:
            return _export(env, max(args.after, 0), sys.stdout.buffer)
        except BrokenPipeError:  # `export | head`: the reader left, not an error of ours
            return 0
    except lmdb.Error as exc:
        print(f"nexus-fast audit: reading {args.db_path}: {exc}", file=sys.stderr)
        return 2
    finally:
        env.close()


if __name__ == "__main__":
    sys.exit(main())
