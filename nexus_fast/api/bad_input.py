"""Bad input from peers: counted always, logged at most once per peer per minute.

A peer that sends junk (bytes that are not protobuf, a broken HTTP request line, an
oversize header) gets a typed error back; the server log gets one WARNING line per peer
per :data:`LOG_INTERVAL`, never a traceback, so a fuzzer cannot fill the disk, and
``nexus_bad_requests_total{port,reason}`` counts every one.
"""

from __future__ import annotations

import logging
import time
from typing import Final

from prometheus_client import Counter

__all__ = ["BAD_REQUESTS", "LOG_INTERVAL", "MAX_PEERS", "peer_host", "report"]

log = logging.getLogger("nexus.bad_input")

LOG_INTERVAL: Final = 60.0
"""Seconds between two log lines about the same peer."""
MAX_PEERS: Final = 4096
"""Peers remembered at once; past that the oldest are forgotten (bounded memory)."""

# Defined beside its only writer; telemetry/metrics.py holds the others.
BAD_REQUESTS = Counter(
    "nexus_bad_requests_total",
    "Requests refused because they could not be decoded, by port (grpc, http, websocket) "
    "and reason.",
    ["port", "reason"],
)

# peer host -> (monotonic time of the last line, requests suppressed since)
_last: dict[str, tuple[float, int]] = {}


def peer_host(peer: str) -> str:
    """The host part of a peer address, so all connections from one host share a limit.

    Accepts gRPC peers (``ipv4:1.2.3.4:5678``, ``ipv6:[::1]:5678``, ``unix:path``),
    ``host:port`` and bare hosts.
    """
    if peer.startswith("unix:"):
        return peer
    for prefix in ("ipv4:", "ipv6:"):
        if peer.startswith(prefix):
            peer = peer[len(prefix) :]
            break
    if peer.startswith("["):
        return peer[1:].partition("]")[0]
    if peer.count(":") == 1:
        return peer.partition(":")[0]
    return peer


def report(port: str, reason: str, peer: str, message: str) -> None:
    """Count one bad request and log it unless this peer was logged in the last minute."""
    BAD_REQUESTS.labels(port=port, reason=reason).inc()
    host = peer_host(peer)
    now = time.monotonic()
    last = _last.get(host)
    if last is not None and now - last[0] < LOG_INTERVAL:
        _last[host] = (last[0], last[1] + 1)
        return
    suppressed = last[1] if last is not None else 0
    if len(_last) >= MAX_PEERS:
        _forget(now)
    _last[host] = (now, 0)
    log.warning(
        "bad %s request from %s: %s%s",
        port,
        host or "unknown peer",
        message,
        f" ({suppressed} more from this peer not logged)" if suppressed else "",
        extra={"peer": host, "reason": reason},
    )


def _forget(now: float) -> None:
    """Drop peers whose minute is over; if all are recent, drop the oldest half."""
    for host in [h for h, (at, _) in _last.items() if now - at >= LOG_INTERVAL]:
        del _last[host]
    if len(_last) >= MAX_PEERS:
        for host in sorted(_last, key=lambda h: _last[h][0])[: MAX_PEERS // 2]:
            del _last[host]
