"""Cut off ``WatchEvents`` clients that stopped reading while a write waits on them.

A gRPC write that the client's HTTP/2 flow-control window does not admit waits in gRPC
core, and grpc.aio offers no way to end such a call (measured with grpcio 1.85, 40 stalled
streams, docs/reliability.md "Stuck peers"): ``context.abort()`` from another task fails at
once with ``ExecuteBatchError`` and sends nothing (the status queues behind the stalled
message); cancelling the handler task ends the coroutine but not the call: the client
waits forever and gRPC core keeps the call and its pending message; keepalive pings are
answered by the client's transport, which reads even when its application does not;
``grpc.max_connection_age_ms`` does end it, but for every connection of every client,
node streams included. What ends the call and frees it is closing the transport of that
one peer: ``shutdown()`` on its socket makes gRPC core fail the connection, cancel its calls
(the handler gets ``CancelledError`` and releases its subscription) and free their buffers.

:class:`StuckWriteWatch` does that: handlers mark the subscription as writing around each
``context.write``; a timer every :data:`CHECK_INTERVAL` seconds cuts off each one still
writing while more than ``events.subscriber_buffer`` events behind (the same bound a
reading subscriber meets between writes), counted in
``nexus_event_slow_consumer_disconnects_total{transport="grpc"}`` and logged once.
Linux only (it finds the socket through ``/proc/self/fd``); elsewhere it logs that it
cannot, and the stream stays as before.
"""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Final

from nexus_fast.core.events import Subscription
from nexus_fast.logs import get_logger
from nexus_fast.telemetry import metrics

__all__ = ["CHECK_INTERVAL", "StuckWriteWatch", "parse_peer", "shutdown_peer_socket", "watch"]

CHECK_INTERVAL: Final = 0.25
"""Seconds between checks of the pending writes (the cut-off comes at most this late)."""

log = get_logger("grpc.events")


def parse_peer(peer: str) -> tuple[str, int] | None:
    """``("127.0.0.1", 5000)`` from gRPC's ``ipv4:127.0.0.1:5000`` / ``ipv6:[::1]:5000``."""
    kind, _, rest = peer.partition(":")
    host, _, port = rest.rpartition(":")
    if kind not in ("ipv4", "ipv6") or not port.isdigit() or not host:
        return None
    host = host.removeprefix("[").removesuffix("]").replace("%25", "%")
    return host, int(port)


def shutdown_peer_socket(peer: tuple[str, int], local_ports: frozenset[int]) -> bool:
    """``shutdown()`` this process's TCP socket connected to ``peer`` on one of
    ``local_ports``; True when one was found. Blocking (a scan of the open files): run it
    in a thread. ``shutdown`` acts on the socket, not on the descriptor, so gRPC keeps its
    descriptor and closes it itself after it has seen the connection fail."""
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return False
    for name in fds:
        fd = int(name)
        try:
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("socket:"):
                continue
            # A duplicate descriptor: the family is detected, and closing it is harmless.
            with socket.socket(fileno=os.dup(fd)) as sock:
                if sock.family not in (socket.AF_INET, socket.AF_INET6):
                    continue
                if sock.getsockname()[1] not in local_ports:
                    continue
                remote = sock.getpeername()
                # gRPC listens on a dual-stack socket: IPv4 peers appear as ::ffff:a.b.c.d.
                if (remote[0].removeprefix("::ffff:"), remote[1]) == peer:
                    sock.shutdown(socket.SHUT_RDWR)
                    return True
        except OSError:
            continue  # not a connected socket of that family, or gone meanwhile
    return False


class StuckWriteWatch:
    """The WatchEvents streams whose write is pending, and the timer that cuts off stuck ones."""

    def __init__(self) -> None:
        # Subscription -> its peer, taken once while the call is surely alive: a finished
        # call's context must not be asked (grpc.aio's peer() dereferences the freed call).
        self._writing: dict[Subscription, str] = {}
        self._local_ports: frozenset[int] = frozenset()
        self._timer: asyncio.Task[None] | None = None
        self._cutting: set[Subscription] = set()

    def set_local_ports(self, ports: set[int] | frozenset[int]) -> None:
        """The gRPC listening ports (a peer's socket is looked for on these only)."""
        self._local_ports = frozenset(ports)

    def begin(self, sub: Subscription, peer: str) -> None:
        """A write for ``sub`` (a stream from ``peer``, gRPC's form) is about to be awaited."""
        self._writing[sub] = peer
        timer = self._timer
        loop = asyncio.get_running_loop()
        # (Another loop's timer, left by an earlier asyncio.run in this process, is dead.)
        if timer is None or timer.done() or timer.get_loop() is not loop:
            self._timer = loop.create_task(self._run())

    def end(self, sub: Subscription) -> bool:
        """The write for ``sub`` finished (or failed); True if it was being cut off."""
        self._writing.pop(sub, None)
        if sub in self._cutting:
            self._cutting.remove(sub)
            return True
        return False

    def stuck(self) -> list[tuple[Subscription, str]]:
        """Writers past the lag bound (the bound a reader meets in ``check_lag``)."""
        out = []
        for sub, peer in self._writing.items():
            bus = sub._bus
            if sub.live and bus.last_index - sub.cursor > bus.subscriber_buffer:
                out.append((sub, peer))
        return out

    async def _run(self) -> None:
        while self._writing:
            await asyncio.sleep(CHECK_INTERVAL)
            for sub, peer in self.stuck():
                if sub not in self._cutting:
                    self._cutting.add(sub)
                    asyncio.get_running_loop().create_task(self._cut(sub, peer))

    async def _cut(self, sub: Subscription, peer_text: str) -> None:
        peer = parse_peer(peer_text)
        lag = sub._bus.last_index - sub.cursor
        found = False
        if peer is not None and self._local_ports:
            try:
                found = await asyncio.to_thread(shutdown_peer_socket, peer, self._local_ports)
            except Exception:  # never an unretrieved task error: say it below
                found = False
        if found:
            metrics.EVENT_SLOW_CONSUMERS.labels(transport="grpc").inc()
            log.warning(
                "closing slow grpc watcher: its write waits on a client that stopped reading",
                extra={"peer": peer_text, "lag": lag, "resume_after_index": sub.cursor},
            )
        else:
            # Said once per stuck write (it stays in _cutting until the write ends).
            log.warning(
                "cannot close slow grpc watcher: its connection was not found",
                extra={"peer": peer_text, "lag": lag},
            )


watch: Final = StuckWriteWatch()
"""The one watch of this process (server.py gives it the gRPC port)."""
