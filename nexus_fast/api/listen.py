"""Listening ports: probe and bind with a one-line error naming the flag that moves them.

A port in use at start-up is the most common first-run failure; it must say which listener,
which address and how to change it, not grpc-core's multi-line complaint or a traceback.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

__all__ = ["StartupError", "bind", "check_port_free", "listen_error"]


class StartupError(Exception):
    """The server could not start (e.g. a port in use); the message says why."""


# Listener name -> (flag, environment variable) that change its port.
_PORT_KNOBS = {
    "grpc": ("--grpc-port", "NEXUS_GRPC_PORT"),
    "websocket": ("--ws-port", "NEXUS_WS_PORT"),
    "http": ("--http-port", "NEXUS_HTTP_PORT"),
}


def listen_error(name: str, host: str, port: int, reason: str) -> str:
    flag, env = _PORT_KNOBS[name]
    reason = reason[:1].lower() + reason[1:]
    return f"{name}: cannot listen on {host}:{port}: {reason} (change it with {flag} or {env})"


async def check_port_free(name: str, host: str, port: int) -> None:
    """Raise StartupError naming the port and its flag/env var if ``host:port`` is taken."""
    if port == 0:
        return
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except OSError as exc:
        raise StartupError(
            f"{name}: cannot resolve listen address {host!r}: {exc.strerror or exc} "
            "(change it with --host or NEXUS_HOST)"
        ) from None
    for family, type_, proto, _, address in infos:
        with socket.socket(family, type_, proto) as probe:
            # Like every real listener: TIME_WAIT leftovers of a previous run are no conflict.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as exc:
                raise StartupError(
                    listen_error(name, host, port, exc.strerror or str(exc))
                ) from None


async def bind(name: str, host: str, port: int, starting: Any) -> None:
    try:
        await starting
    except OSError as exc:
        raise StartupError(listen_error(name, host, port, exc.strerror or str(exc))) from None
