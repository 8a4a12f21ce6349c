"""``--auth``: what authentication costs, the same scenario with auth off and on, one run.

``nexus-bench heartbeat|dispatch --spawn --auth`` measures the scenario twice with the
same load: against a spawned server with auth off (plaintext, as ``--spawn`` alone), then
against a spawned server with auth on. The second server gets a throw-away PKI written
by ``nexus-fast certs`` into a temporary directory: ``auth_required``, TLS on the gRPC,
WebSocket and HTTP ports, client certificates required (mTLS). The client presents an
operator certificate for the handshake and a bearer token for its calls (role operator),
and every simulated node sends its own token (``sub = node:<id>``, minted from the
server's secret, as ``--node-token-secret`` does). The report has both measurements and
``auth on / auth off``, raw and per server CPU-second.

Authentication is per stream or connection, not per message: the server interceptor
checks the credentials once when a call starts (a node's Connect stream carries every
heartbeat and result of that node after one check), and a verified token is cached until
it expires. What remains per message is TLS record encryption.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from nexus_fast.benchmark.common import Context, run_labels
from nexus_fast.benchmark.procs import BenchError, ProcessGroup, http_get, spawn_server
from nexus_fast.benchmark.report import Measurement, Ratio, cpu_ratio, ratio
from nexus_fast.node.channel import ClientAuth
from nexus_fast.security import tools
from nexus_fast.security.tokens import issue_token

__all__ = ["SCENARIOS", "SecureSetup", "run", "write_pki"]

SCENARIOS = ("heartbeat", "dispatch")
TOKEN_TTL_S = 3600.0
OPERATOR = "bench"


@dataclass(frozen=True)
class SecureSetup:
    """A server config with auth on and the client credentials that go with it."""

    config: Path
    auth: ClientAuth


def write_pki(directory: Path) -> SecureSetup:
    """Write a development PKI, an HS256 secret and ``nexus.toml`` (auth on) to ``directory``."""
    with contextlib.redirect_stdout(io.StringIO()):  # its "wrote ..." line is for humans
        code = tools.main(["certs", "--out", str(directory), "--operator", OPERATOR])
    if code != 0:
        raise BenchError(f"nexus-fast certs failed with {code}")
    secret = directory / "jwt.secret"
    token = issue_token(OPERATOR, "operator", TOKEN_TTL_S, secret=secret.read_bytes().strip())
    auth = ClientAuth(
        tls_ca=str(directory / "ca.pem"),
        tls_cert=str(directory / f"operator-{OPERATOR}.pem"),
        tls_key=str(directory / f"operator-{OPERATOR}-key.pem"),
        token=token,
        node_token_secret=str(secret),
    )
    return SecureSetup(directory / "nexus.toml", auth)


def _label(results: list[Measurement], start: int, mode: str) -> Measurement | None:
    for m in results[start:]:
        m.name = f"{m.name} [auth {mode}]"
        m.extra["auth"] = mode
    return results[start] if len(results) > start else None


async def run(
    ctx: Context, group: ProcessGroup, scenario: Callable[[Context], Awaitable[None]]
) -> None:
    """Run ``scenario`` against an auth-off server, then an auth-on one; add the ratios."""
    import asyncio

    loop = asyncio.get_running_loop()
    report = ctx.report
    print("nexus-bench: starting the server (auth off) ...", file=sys.stderr)
    plain = await loop.run_in_executor(None, lambda: spawn_server(group))
    await scenario(dataclasses.replace(ctx, server=plain, auth=ClientAuth()))
    off = _label(report.results, 0, "off")
    if plain.pid is not None:
        group.stop(plain.pid)  # not idling beside the second server
    if ctx.stopping() or off is None:
        return
    setup = write_pki(group.tempdir("nexus-bench-pki-"))
    print("nexus-bench: starting the server (auth on: mTLS + tokens) ...", file=sys.stderr)
    secure = await loop.run_in_executor(
        None,
        lambda: spawn_server(group, config=setup.config, http_ssl=setup.auth.ssl_context()),
    )
    secure.http_headers = setup.auth.http_headers()
    # Proof that auth is really on: the same scrape with a forged token is refused (a token,
    # when sent, wins over the certificate, so it is checked).
    forged = {"Authorization": "Bearer Zm9v.YmFy.YmF6"}
    refused = http_get(f"{secure.http}/metrics", 5.0, secure.http_ssl, forged)[0]
    if refused != 401:
        raise BenchError(f"the auth-on server answered a forged token with {refused}")
    report.config["auth_check"] = {"metrics_with_forged_token": refused}
    start = len(report.results)
    await scenario(dataclasses.replace(ctx, server=secure, auth=setup.auth, labels=run_labels()))
    on = _label(report.results, start, "on")
    report.config["server"] = {"spawned": True, "auth": ["off", "on"]}
    if on is None:
        return
    report.ratios.append(
        Ratio(
            "auth on / auth off",
            ratio(on.throughput, off.throughput),
            f"{on.throughput:,.0f} / {off.throughput:,.0f} {on.unit}: the same load against "
            "a server with auth_required, TLS and mTLS on every port, tokens per call start",
        )
    )
    report.ratios.append(cpu_ratio("auth on / auth off", on, off, ""))
