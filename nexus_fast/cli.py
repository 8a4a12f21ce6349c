"""``nexus-fast``: run the server.

Exit codes: 0 after a clean stop (SIGTERM/SIGINT), 1 when it cannot start
(a port in use, the data directory locked by another server or unusable, a compiled
hot path missing under NEXUS_REQUIRE_EXTENSIONS=1), 2 for invalid configuration or
arguments. A failed start prints one line, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import textwrap
from collections.abc import Sequence

import nexus_fast
from nexus_fast import failpoints
from nexus_fast.about import version_text
from nexus_fast.config import ENV_OVERRIDES, ConfigError, load_config
from nexus_fast.security.layer import check_security

# Flag -> dotted config key; flags beat environment, which beats the file.
_FLAG_KEYS = {
    "host": "server.host",
    "grpc_port": "server.grpc_port",
    "ws_port": "server.websocket_port",
    "http_port": "server.http_port",
    "db_path": "database.path",
    "log_level": "logging.level",
    "log_format": "logging.format",
    "node_timeout": "performance.node_timeout",
}


# Subcommands of nexus_fast.data_cli (kept here as names: importing it costs start-up time).
DATA_COMMANDS = ("backup", "restore", "check", "replay")

# Switches read outside the config (nexus_fast/_compat.py), listed in --help too.
_SWITCHES = {
    "NEXUS_NO_EXTENSIONS": "1: run the pure-Python twins of the hot paths",
    "NEXUS_REQUIRE_EXTENSIONS": "1: refuse to start (exit 1) if a compiled hot path is missing",
    "NEXUS_FAILPOINTS": "failpoints, e.g. stream.send=delay(50ms) (docs/reliability.md)",
}

EXIT_CODES = {
    0: "stopped cleanly (SIGTERM/SIGINT), or --version/--help",
    1: "cannot start: a port in use, the data directory held by another server or "
    "unusable, a compiled hot path missing under NEXUS_REQUIRE_EXTENSIONS=1",
    2: "invalid configuration or arguments (a bad NEXUS_FAILPOINTS too)",
    failpoints.CRASH_EXIT_CODE: "a crash failpoint fired (NEXUS_FAILPOINTS or SetFailpoints)",
}


def _epilog() -> str:
    width = max(len(name) for name in (*ENV_OVERRIDES, *_SWITCHES))
    lines = ["environment variables (flags beat them, they beat the config file):"]
    lines += [f"  {name:<{width}}  {key}" for name, key in ENV_OVERRIDES.items()]
    lines += [f"  {name:<{width}}  {what}" for name, what in _SWITCHES.items()]
    lines += ["", "data tools (nexus-fast NAME --help): " + ", ".join(DATA_COMMANDS)]
    lines += ["", "exit codes:"]
    for code, what in EXIT_CODES.items():
        lines += textwrap.wrap(what, 88, initial_indent=f"  {code}  ", subsequent_indent=" " * 5)
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nexus-fast",
        description="nexus_fast control plane server.",
        epilog=_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", "-c", help="TOML config file (e.g. configs/development.toml)")
    parser.add_argument("--version", action="store_true", help="print versions and exit")
    parser.add_argument("--host", help="address to listen on")
    parser.add_argument("--grpc-port", help="gRPC port (default 50053)")
    parser.add_argument("--ws-port", help="WebSocket port (default 8081)")
    parser.add_argument("--http-port", help="HTTP health/metrics port (default 8082)")
    parser.add_argument("--db-path", help="LMDB directory (default ./data)")
    parser.add_argument("--log-level", help="debug|info|warning|error|critical")
    parser.add_argument("--log-format", help="text|json")
    parser.add_argument("--node-timeout", help='e.g. "30s"')
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if (sys.argv[1:] if argv is None else list(argv))[:1] in (["certs"], ["token"]):
        from nexus_fast.security.tools import main as security_tool

        return security_tool(sys.argv[1:] if argv is None else list(argv))
    if (sys.argv[1:] if argv is None else list(argv))[:1] == ["audit"]:
        from nexus_fast.security.audit_cli import main as audit_tool

        return audit_tool((sys.argv[1:] if argv is None else list(argv))[1:])
    if (sys.argv[1:] if argv is None else list(argv))[:1] in [[c] for c in DATA_COMMANDS]:
        from nexus_fast.data_cli import main as data_tool

        return data_tool(sys.argv[1:] if argv is None else list(argv))
    args = _parser().parse_args(argv)
    try:
        nexus_fast.implementation()  # imports every hot path once, before anything starts
    except ImportError as exc:
        print(
            f"nexus-fast: cannot start: NEXUS_REQUIRE_EXTENSIONS=1 but a compiled hot path "
            f"is missing ({exc}); build it (make install) or unset NEXUS_REQUIRE_EXTENSIONS",
            file=sys.stderr,
        )
        return 1
    if args.version:
        print(version_text())
        return 0
    overrides = {
        key: getattr(args, flag) for flag, key in _FLAG_KEYS.items() if getattr(args, flag)
    }
    try:
        config = load_config(args.config, overrides=overrides)
        check_security(config)  # auth_required without TLS or a JWT key: exit 2
    except ConfigError as exc:
        print(f"nexus-fast: {exc}", file=sys.stderr)
        return 2
    from nexus_fast.reload import apply_logging

    try:
        apply_logging(config)  # [logging]: level, format, and the log file if any
    except ConfigError as exc:
        print(f"nexus-fast: {exc}", file=sys.stderr)
        return 2
    try:
        failpoints.configure(os.environ.get("NEXUS_FAILPOINTS", ""))  # WARNING when set
    except ValueError as exc:
        print(f"nexus-fast: invalid NEXUS_FAILPOINTS: {exc}", file=sys.stderr)
        return 2

    import uvloop

    from nexus_fast.server import run

    # A SIGHUP before the server is ready reloads nothing and must not kill it (the default).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

    return uvloop.run(run(config, args.config, overrides))


if __name__ == "__main__":
    sys.exit(main())
