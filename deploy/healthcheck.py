#!/usr/bin/env python3
"""Container health check: GET /ready on the HTTP port the server was configured with.

The port, interface and scheme come from the same config file and ``NEXUS_*`` variables the
server reads (``nexus_fast.config.load_config``), so a changed ``server.http_port`` or
``NEXUS_HTTP_PORT`` needs no second edit. Exit 0 when /ready answers 200, 1 otherwise, with
one line saying why. The image's HEALTHCHECK runs it; so can systemd or a shell:

    nexus-healthcheck --config /etc/nexus-fast/nexus.toml [--path /live]

With ``security.http_tls`` the check speaks HTTPS to its own loopback without verifying the
certificate (it asks "is this process ready", not "is this peer trusted"); when the HTTP
port also requires client certificates (``tls_ca_file``), ``NEXUS_HEALTHCHECK_CERT`` and
``NEXUS_HEALTHCHECK_KEY`` name the one to present.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import urllib.error
import urllib.request

from nexus_fast.config import ConfigError, load_config

_ANY = {"0.0.0.0", "::", ""}


def ready_url(config_path: str | None, path: str) -> tuple[str, ssl.SSLContext | None]:
    """The URL to probe and, for HTTPS, the client context."""
    cfg = load_config(config_path)
    host = cfg.server.host.strip("[]")
    if host in _ANY:
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    if not cfg.security.http_tls:
        return f"http://{host}:{cfg.server.http_port}{path}", None
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    cert = os.environ.get("NEXUS_HEALTHCHECK_CERT")
    if cert:
        context.load_cert_chain(cert, os.environ.get("NEXUS_HEALTHCHECK_KEY") or None)
    return f"https://{host}:{cfg.server.http_port}{path}", context


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nexus-healthcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--config", "-c", help="the server's TOML config file")
    parser.add_argument("--path", default="/ready", help="route to GET (default /ready)")
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds (default 2)")
    args = parser.parse_args(argv)
    try:
        url, context = ready_url(args.config, args.path)
    except ConfigError as exc:
        print(f"nexus-healthcheck: {exc}", file=sys.stderr)
        return 1
    try:
        with urllib.request.urlopen(url, timeout=args.timeout, context=context) as reply:
            status = reply.status
    except urllib.error.HTTPError as exc:
        status = exc.code
    except (OSError, ssl.SSLError) as exc:
        print(f"nexus-healthcheck: {url}: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"nexus-healthcheck: {url}: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
