"""Followers serve node streams: one Relay stream per follower carries them to the leader.

A node may open its ``NodeService.Connect`` stream on any replica. On a follower,
:class:`FollowerRelay` keeps that stream and multiplexes it, with every other node stream
held there, over ONE ``ReplicaService.Relay`` bidi stream to the leader; the leader's
:class:`RelayServicer` opens a real session per relayed node through the same
:class:`~nexus_fast.api.node_stream.NodeStreams` as Connect, and sends each session's
outbound messages back down the relay. Frames are batched both ways (per-message gRPC cost
is the expensive part).

When the leader changes (or the relay stream breaks) the follower reconnects to the
current leader and re-opens every held node there, without ending the nodes' own streams:
a failover moves leadership, not node connections. Messages lost with the old stream are
covered by the core's at-least-once delivery (the new leader resumes in-flight commands as
after a restart; nodes run each command id once).

Bounds: on the follower each node stream has its own bounded queue (the core's
:class:`~nexus_fast.core.nodes.Session` rule: a node that stops reading is cut off with
"fell behind", the others keep flowing), and messages waiting to go up are bounded per node
and in total (a node reader waits for room: gRPC flow control slows that node only). On
the leader, each relayed session is a normal bounded Session and the frames waiting to go
down are bounded in bytes.

Security: Relay needs ``cluster.relay`` (replicas only). The follower has checked the node's
credential (``check_node_id``) before relaying; the leader trusts the ``actor`` of an open
frame only because its caller is a replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import grpc

from nexus_fast import errors
from nexus_fast.api.grpc_api import instrumented
from nexus_fast.api.node_stream import NodeStreams, write_outbound
from nexus_fast.api.status import grpc_status
from nexus_fast.core.nodes import SESSION_QUEUE_SIZE, Session
from nexus_fast.logs import get_logger
from nexus_fast.pb import cluster_pb2 as cpb
from nexus_fast.pb import cluster_pb2_grpc as cpb_grpc
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.telemetry import metrics

__all__ = [
    "FollowerRelay",
    "RelayLost",
    "RelayServicer",
    "RelayedEnd",
    "add_replica_service",
    "replica_credentials",
]

log = get_logger("relay")

# One RelayUp / RelayDown carries frames up to this many bytes (always at least one frame).
BATCH_BYTES: Final = 1 << 20
# Frames waiting to go down one relay stream (leader), in bytes; pumps wait beyond it.
MAX_DOWN_BYTES: Final = 16 << 20
# Messages waiting to go up (follower): per node stream and in total; readers wait beyond.
MAX_UP_PER_NODE: Final = 64
MAX_UP_TOTAL: Final = 8192
MAX_UP_BYTES: Final = 32 << 20
# Room a NodeMessage leaves under the message limit for the RelayUp around it.
FRAME_HEADROOM: Final = 1024
# Reconnect backoff of a follower's relay (seconds).
BACKOFF_MIN: Final = 0.05
BACKOFF_MAX: Final = 1.0
# How often a follower re-reads the leader target while connected (besides leader_changed()).
TARGET_POLL: Final = 0.2

_OK: Final = grpc.StatusCode.OK
_CODES: Final = {code.value[0]: code for code in grpc.StatusCode}


def add_replica_service(servicer: RelayServicer, server: Any) -> None:
    """Register ReplicaService.Relay alone, with strict request decoding: FetchSnapshot has
    its own servicer (cluster/snapshot.py), so neither registration shadows the other."""
    from nexus_fast.api.grpc_handlers import register

    def add(relays: RelayServicer, target: Any) -> None:
        handlers = {
            "Relay": grpc.stream_stream_rpc_method_handler(
                relays.Relay,
                request_deserializer=cpb.RelayUp.FromString,
                response_serializer=cpb.RelayDown.SerializeToString,
            )
        }
        service = "nexus.cluster.v1.ReplicaService"
        target.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        target.add_registered_method_handlers(service, handlers)

    register(add, servicer, server)


def replica_credentials(security: Any) -> grpc.ChannelCredentials | None:
    """This replica's channel credentials toward the leader (None: plaintext).

    With TLS its own server certificate is its client certificate (O = nexus-replica:
    role ``replica``, which holds ``cluster.relay``), as for forwarded calls.
    """
    if not security.tls_enabled:
        return None

    def read(path: str) -> bytes | None:
        return Path(path).read_bytes() if path else None

    return grpc.ssl_channel_credentials(
        read(security.tls_ca_file), read(security.tls_key_file), read(security.tls_cert_file)
    )


class RelayedEnd(Exception):
    """The leader ended a relayed session: the node's stream ends with this status."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class RelayLost(Exception):
    """The relay stream ended under the follower (the leader went away): reconnect."""


def _end_frame(stream: int, reason: Exception | None) -> cpb.RelayDownFrame:
    if reason is None:
        code, message = _OK, ""
    elif isinstance(reason, errors.NexusError):
        code, message = grpc_status(reason), str(reason)
    else:
        code, message = grpc.StatusCode.UNAVAILABLE, "relayed session ended"
    return cpb.RelayDownFrame(stream=stream, end=cpb.RelayEnd(code=code.value[0], message=message))


# ---------------------------------------------------------------- leader side


@dataclass(eq=False)
class _Relayed:
    """One node stream relayed to this leader: its session and what waits for it."""

    stream: int
    session: Session | None = None
    inbox: deque[pb.NodeMessage] = field(default_factory=deque)
    worker: asyncio.Task[None] | None = None  # opening, or awaiting a persisted change
    pump: asyncio.Task[None] | None = None
    gone: bool = False  # the follower closed it, or the relay stream ended: no end frame
    released: bool = False  # its session was closed on the core


class RelayServicer(cpb_grpc.ReplicaServiceServicer):
    """Leader side: one session per relayed node, opened as Connect opens its own."""

    def __init__(
        self, streams: NodeStreams, *, is_leader: Callable[[], bool] | None = None
    ) -> None:
        self._streams = streams
        self._is_leader = is_leader  # None: always (embedded mode: the server leads itself)
        self._calls: set[_LeaderRelay] = set()
        self._stopping = False

    def stop(self) -> None:
        """Call before the registry ends sessions at shutdown: every relay stream ends as a
        whole (UNAVAILABLE), with no per-node end frames, so followers keep their nodes'
        streams and re-open them on the next leader."""
        self._stopping = True
        for call in list(self._calls):
            call.stop()

    @instrumented("ReplicaService/Relay")
    async def Relay(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        if self._stopping:
            raise errors.Unavailable("relay: this server is stopping")
        if self._is_leader is not None and not self._is_leader():
            raise errors.Unavailable("relay: this replica is not the leader")
        relay = _LeaderRelay(self._streams, context)
        self._calls.add(relay)
        try:
            await relay.run()
        finally:
            self._calls.discard(relay)
            relay.end_all()
        if relay.stopped:
            raise errors.Unavailable("relay: the leader is stopping; relay to the next one")


class _LeaderRelay:
    """One follower's Relay stream on the leader."""

    def __init__(self, streams: NodeStreams, context: grpc.aio.ServicerContext) -> None:
        self._streams = streams
        self._context = context
        self._held: dict[int, _Relayed] = {}
        self._down: list[tuple[cpb.RelayDownFrame, int]] = []  # (frame, its bytes)
        self._down_bytes = 0
        self._ready = asyncio.Event()  # frames wait in _down
        self._room = asyncio.Event()  # _down drained below its bound
        self._done = asyncio.Event()
        self.stopped = False
        self.peer = context.peer()

    def stop(self) -> None:
        self.stopped = True
        self._done.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        await self._context.write(cpb.RelayDown())  # "connected": the follower starts relaying
        reader = loop.create_task(self._read(), name=f"relay-reader-{self.peer}")
        writer = loop.create_task(self._write(), name=f"relay-writer-{self.peer}")
        stopped = loop.create_task(self._done.wait())
        try:
            finished, _ = await asyncio.wait(
                {reader, writer, stopped}, return_when=asyncio.FIRST_COMPLETED
            )
            for task in finished:
                if task is not stopped and not task.cancelled():
                    exc = task.exception()
                    if isinstance(exc, errors.NexusError):
                        raise exc
        finally:
            for task in (reader, writer, stopped):
                task.cancel()

    def end_all(self) -> None:
        """The relay stream ended: every session opened through it ends (disconnected)."""
        for relayed in self._held.values():
            self._forget(relayed)
        self._held.clear()

    def _forget(self, relayed: _Relayed) -> None:
        relayed.gone = True
        # An opening worker is left to finish (cancelled inside open_session it could
        # leave the node attached); it sees ``gone`` and closes what it opened.
        workers = (relayed.pump,) if relayed.session is None else (relayed.worker, relayed.pump)
        for task in workers:
            if task is not None and task is not asyncio.current_task():
                task.cancel()
        self._release(relayed)

    def _release(self, relayed: _Relayed) -> None:
        """End the relayed session on the core (once)."""
        if relayed.session is not None and not relayed.released:
            relayed.released = True
            self._streams.close(relayed.session)
            metrics.RELAY_SESSIONS.dec()

    # ------------------------------------------------------------ up: follower -> core

    async def _read(self) -> None:
        context = self._context
        while True:
            batch = await context.read()
            if batch is grpc.aio.EOF:
                return
            for frame in batch.frames:
                kind = frame.WhichOneof("kind")
                if kind == "message":
                    self._message(frame.stream, frame.message)
                elif kind == "open":
                    self._open(frame.stream, frame.open)
                elif kind == "close":
                    relayed = self._held.pop(frame.stream, None)
                    if relayed is not None:
                        self._forget(relayed)
                else:
                    raise errors.InvalidArgument("frames.kind", "a frame must say what it is")

    def _open(self, stream: int, request: cpb.RelayOpen) -> None:
        if stream in self._held:
            raise errors.InvalidArgument("frames.stream", f"stream {stream} is already open")
        relayed = _Relayed(stream)
        self._held[stream] = relayed
        relayed.worker = asyncio.get_running_loop().create_task(
            self._opening(relayed, request), name=f"relay-open-{request.node_id}"
        )

    async def _opening(self, relayed: _Relayed, request: cpb.RelayOpen) -> None:
        try:
            session = await self._streams.open(
                request.node_id, request.session_epoch, request.actor, request.peer
            )
        except errors.NexusError as exc:
            self._held.pop(relayed.stream, None)
            relayed.worker = None
            await self._send(_end_frame(relayed.stream, exc))
            return
        if relayed.gone:  # closed by the follower while opening
            self._streams.close(session)
            return
        relayed.session = session
        metrics.RELAY_SESSIONS.inc()
        relayed.pump = asyncio.get_running_loop().create_task(
            self._pump(relayed, session), name=f"relay-pump-{session.node_id}"
        )
        await self._work(relayed, session, None)

    def _message(self, stream: int, message: pb.NodeMessage) -> None:
        relayed = self._held.get(stream)
        if relayed is None:
            return  # ended here already (its end frame is on its way to the follower)
        if relayed.worker is not None:
            if len(relayed.inbox) >= SESSION_QUEUE_SIZE:
                if relayed.session is not None:
                    relayed.session.close(errors.Unavailable("relayed stream fell behind"))
                return
            relayed.inbox.append(message)
            return
        session = relayed.session
        if session is None or session.closed:
            return
        try:
            pending = self._streams.handle(session, message)
        except errors.NexusError as exc:
            session.close(exc)
            return
        if pending is not None:
            relayed.worker = asyncio.get_running_loop().create_task(
                self._work(relayed, session, pending), name=f"relay-work-{session.node_id}"
            )

    async def _work(self, relayed: _Relayed, session: Session, pending: Any) -> None:
        """Await what a message started, then the messages that queued behind it, in order."""
        streams = self._streams
        try:
            if pending is not None:
                await pending
            while relayed.inbox and not session.closed:
                pending = streams.handle(session, relayed.inbox.popleft())
                if pending is not None:
                    await pending
        except errors.NexusError as exc:
            session.close(exc)
        finally:
            if session.closed:
                relayed.inbox.clear()
            relayed.worker = None

    # ------------------------------------------------------------ down: core -> follower

    async def _pump(self, relayed: _Relayed, session: Session) -> None:
        outbound = session.outbound
        stream = relayed.stream
        while True:
            message = await outbound.get()
            if message is None:
                break
            await self._send(cpb.RelayDownFrame(stream=stream, message=message))
        self._held.pop(stream, None)
        self._release(relayed)
        if not relayed.gone and not self.stopped:
            await self._send(_end_frame(stream, session.close_reason))

    async def _send(self, frame: cpb.RelayDownFrame) -> None:
        while self._down_bytes >= MAX_DOWN_BYTES:
            self._room.clear()
            await self._room.wait()
        size = frame.ByteSize()
        self._down.append((frame, size))
        self._down_bytes += size
        self._ready.set()

    async def _write(self) -> None:
        context = self._context
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._down:
                batch, size = _take(self._down)
                self._down_bytes -= size
                self._room.set()
                await context.write(cpb.RelayDown(frames=batch))


def _take(frames: list[tuple[Any, int]]) -> tuple[list[Any], int]:
    """(frame, bytes) from the head of ``frames`` for one batch: up to BATCH_BYTES, at
    least one frame. Returns the frames and their bytes."""
    size = 0
    n = 0
    for _, cost in frames:
        if n and size + cost > BATCH_BYTES:
            break
        size += cost
        n += 1
    batch = [frame for frame, _ in frames[:n]]
    del frames[:n]
    return batch, size


# ---------------------------------------------------------------- follower side


@dataclass(eq=False)
class _Held:
    """A node stream held on this follower: its bounded outbound queue is a Session's."""

    stream: int
    session: Session
    pending_up: int = 0  # its messages waiting in the up buffer


class FollowerRelay:
    """Follower side: hold node streams here, relay them over one stream to the leader.

    ``leader_target()`` is the current leader's gRPC address (None while unknown);
    ``credentials`` (None: plaintext) and ``metadata`` authenticate this replica to it as
    one holding ``cluster.relay``. ``is_follower()`` says whether Connect streams are to be
    relayed (default: always). Call :meth:`start` once on the loop, :meth:`leader_changed`
    whenever the election says so (the target is also re-read every TARGET_POLL seconds),
    :meth:`stop` at shutdown.

    When this replica itself becomes the leader, ``leader_target()`` names it: the streams
    held here keep flowing through a relay to itself over loopback (nothing disconnects),
    while ``is_follower()`` turning False sends new Connect streams to the local core.
    A leader answers Relay only once it serves the core (``RelayServicer(is_leader=...)``):
    until then the relay retries with backoff, the nodes' streams waiting.
    """

    def __init__(
        self,
        leader_target: Callable[[], str | None],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] = (),
        is_follower: Callable[[], bool] | None = None,
        no_leader_wait: float = 5.0,
        orphan_timeout: float = 30.0,
        max_message_bytes: int = 4 * 1024 * 1024,
    ) -> None:
        self._leader_target = leader_target
        self._credentials = credentials
        self._metadata = tuple(metadata)
        self._is_follower = is_follower
        self._no_leader_wait = no_leader_wait
        self._orphan_timeout = orphan_timeout
        self._max_message_bytes = max_message_bytes
        self._held: dict[int, _Held] = {}
        self._ids = itertools.count(1)
        self._up: list[tuple[cpb.RelayUpFrame, int, _Held | None]] = []  # (frame, bytes, of)
        self._up_bytes = 0
        self._up_ready = asyncio.Event()
        self._up_room = asyncio.Event()
        self._connected = asyncio.Event()  # a relay stream to the leader is up
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self.target: str | None = None  # the leader the relay stream is (or was) open to
        self.connects = 0  # relay streams opened so far (status, tests)

    def active(self) -> bool:
        return not self._stopping and (self._is_follower is None or self._is_follower())

    def held_count(self) -> int:
        """Node streams held here."""
        return len(self._held)

    def backlog(self) -> dict[str, int]:
        """Messages waiting for each held node's stream (node id -> count)."""
        return {h.session.node_id: h.session.outbound.qsize() for h in self._held.values()}

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="follower-relay")

    def leader_changed(self) -> None:
        """The leader (or its address) changed: reconnect the relay now."""
        self._changed.set()

    async def stop(self) -> None:
        """End the relay and every held node stream (UNAVAILABLE: nodes reconnect)."""
        self._stopping = True
        for held in list(self._held.values()):
            held.session.close(errors.Unavailable("server shutting down"))
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def wait_connected(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._connected.wait(), timeout)
        return self._connected.is_set()

    # ------------------------------------------------------------ node streams

    async def serve(
        self, context: grpc.aio.ServicerContext, first: pb.NodeMessage, actor: str
    ) -> None:
        """Hold one node's Connect stream (``first`` checked by Connect) until it ends."""
        if not self._connected.is_set() and not await self.wait_connected(self._no_leader_wait):
            raise errors.Unavailable(
                f"no leader: this replica relays node streams to the leader and has none "
                f"after {self._no_leader_wait:g}s; retry (or connect to another replica)"
            )
        session = Session(first.node_id, first.session_epoch, actor, context.peer())
        held = _Held(next(self._ids), session)
        self._held[held.stream] = held
        self._queue(cpb.RelayUpFrame(stream=held.stream, open=self._open_of(session)), None)
        metrics.GRPC_CONNECTIONS_ACTIVE.inc()
        metrics.RELAY_NODE_STREAMS.inc()
        reader = asyncio.get_running_loop().create_task(
            self._read_node(context, held, first), name=f"relay-node-{session.node_id}"
        )
        try:
            await write_outbound(context, session)
        finally:
            reader.cancel()
            session.close(None)
            metrics.GRPC_CONNECTIONS_ACTIVE.dec()
            metrics.RELAY_NODE_STREAMS.dec()
            if self._held.pop(held.stream, None) is not None:
                self._queue(cpb.RelayUpFrame(stream=held.stream, close=cpb.RelayClose()), None)
        reason = session.close_reason
        if isinstance(reason, RelayedEnd):
            if reason.code is not _OK:
                await context.abort(reason.code, reason.message)
        elif reason is not None:
            raise reason

    @staticmethod
    def _open_of(session: Session) -> cpb.RelayOpen:
        return cpb.RelayOpen(
            node_id=session.node_id,
            session_epoch=session.epoch,
            actor=session.actor,
            peer=session.peer,
        )

    async def _read_node(
        self, context: grpc.aio.ServicerContext, held: _Held, first: pb.NodeMessage
    ) -> None:
        session = held.session
        limit = self._max_message_bytes - FRAME_HEADROOM
        message: Any = first
        try:
            while message is not grpc.aio.EOF:
                frame = cpb.RelayUpFrame(stream=held.stream, message=message)
                size = frame.ByteSize()
                if size > limit:
                    raise errors.InvalidArgument(
                        "NodeMessage", f"larger than {limit} bytes (the relay's limit)"
                    )
                while (
                    held.pending_up >= MAX_UP_PER_NODE
                    or len(self._up) >= MAX_UP_TOTAL
                    or self._up_bytes >= MAX_UP_BYTES
                ):
                    self._up_room.clear()
                    await self._up_room.wait()
                if session.closed:
                    return
                self._queue(frame, held, size)
                message = await context.read()
            session.close(None)  # the node half-closed: end the stream cleanly
        except errors.NexusError as exc:
            session.close(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the node vanished mid-read: end this stream only
            log.debug(
                "relayed node stream read failed", extra={"node": session.node_id, "err": exc}
            )
            session.close(errors.Unavailable("stream read failed"))

    def _queue(self, frame: cpb.RelayUpFrame, held: _Held | None, size: int = 0) -> None:
        size = size or frame.ByteSize()
        self._up.append((frame, size, held))
        self._up_bytes += size
        if held is not None:
            held.pending_up += 1
        self._up_ready.set()

    # ------------------------------------------------------------ the relay stream

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        orphaned_since = time.monotonic()
        last_error = ""
        while True:
            self._changed.clear()
            target = self._leader_target()
            if target is None:
                if self._held and time.monotonic() - orphaned_since > self._orphan_timeout:
                    self._end_all("no leader for longer than the relay waits; reconnect")
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), TARGET_POLL)
                continue
            try:
                if await self._relay_once(target):
                    backoff = BACKOFF_MIN
                    last_error = ""
            except asyncio.CancelledError:
                raise
            except (grpc.aio.AioRpcError, RelayLost) as exc:
                why = (
                    f"{exc.code().name}: {exc.details()}"
                    if isinstance(exc, grpc.aio.AioRpcError)
                    else str(exc)
                )
                if why != last_error:  # once per cause, not once per retry
                    log.info(
                        "relay stream to the leader ended", extra={"leader": target, "why": why}
                    )
                last_error = why
            except Exception:
                log.exception("relay stream failed", extra={"leader": target})
            finally:
                if self._connected.is_set():
                    orphaned_since = time.monotonic()
                self._connected.clear()
            if self._held and time.monotonic() - orphaned_since > self._orphan_timeout:
                self._end_all("the leader has been unreachable longer than the relay waits")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), backoff)
            backoff = min(BACKOFF_MAX, backoff * 2)

    def _end_all(self, why: str) -> None:
        for held in list(self._held.values()):
            held.session.close(errors.Unavailable(why))

    def _restart_up(self) -> None:
        """A new relay stream: every held node is opened again, then its waiting messages.

        Opens and closes queued for the old stream are dropped (the new leader never saw
        those streams); messages of held streams are kept, after their stream's open.
        """
        kept = [item for item in self._up if item[2] is not None and item[2].stream in self._held]
        self._up = [
            (frame, frame.ByteSize(), None)
            for frame in (
                cpb.RelayUpFrame(stream=held.stream, open=self._open_of(held.session))
                for held in self._held.values()
                if not held.session.closed
            )
        ]
        self._up.extend(kept)
        self._up_bytes = sum(size for _, size, _ in self._up)
        self._up_ready.set()

    async def _relay_once(self, target: str) -> bool:
        """One Relay stream to ``target``, until it ends or the leader changes.

        Returns True when the stream got connected (the backoff restarts).
        """
        size = self._max_message_bytes + BATCH_BYTES
        options = [
            ("grpc.max_send_message_length", size),
            ("grpc.max_receive_message_length", size),
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
        ]
        if self._credentials is None:
            channel = grpc.aio.insecure_channel(target, options=options)
        else:
            channel = grpc.aio.secure_channel(target, self._credentials, options=options)
        self.target = target
        loop = asyncio.get_running_loop()
        connected = False
        async with channel:
            call = cpb_grpc.ReplicaServiceStub(channel).Relay(metadata=self._metadata or None)
            hello = await call.read()  # the leader's first (empty) RelayDown: it serves us
            if hello is grpc.aio.EOF:
                await call.code()
                return False
            connected = True
            self.connects += 1
            metrics.RELAY_CONNECTS.inc()
            self._restart_up()
            self._connected.set()
            log.info("relaying node streams to the leader", extra={"leader": target})
            tasks = {
                loop.create_task(self._write_up(call)),
                loop.create_task(self._read_down(call)),
                loop.create_task(self._watch_target(target)),
            }
            try:
                finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    task.result()  # raises what ended the stream
            finally:
                for task in tasks:
                    task.cancel()
                call.cancel()
        return connected

    async def _watch_target(self, target: str) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), TARGET_POLL)
            self._changed.clear()
            if self._leader_target() != target:
                log.info("leader changed: moving the relay", extra={"from": target})
                return

    async def _write_up(self, call: Any) -> None:
        while True:
            await self._up_ready.wait()
            self._up_ready.clear()
            while self._up:
                items = self._up
                size = n = 0
                for _, cost, _ in items:
                    if n and size + cost > BATCH_BYTES:
                        break
                    size += cost
                    n += 1
                batch = items[:n]
                del items[:n]
                self._up_bytes -= size
                metrics.RELAY_UP_BATCH_FRAMES.observe(n)
                for _, _, held in batch:
                    if held is not None:
                        held.pending_up -= 1
                self._up_room.set()
                try:
                    await call.write(cpb.RelayUp(frames=[frame for frame, _, _ in batch]))
                except (asyncio.InvalidStateError, grpc.aio.UsageError):
                    # The leader ended the stream (it went away: expected, not a bug).
                    raise RelayLost("the leader ended the relay stream") from None

    async def _read_down(self, call: Any) -> None:
        held_streams = self._held
        while True:
            batch = await call.read()
            if batch is grpc.aio.EOF:
                await call.code()
                return
            for frame in batch.frames:
                held = held_streams.get(frame.stream)
                if held is None:
                    continue  # that node stream ended here meanwhile
                if frame.HasField("message"):
                    if not held.session.send(frame.message):
                        # Full ("fell behind"): that node alone is cut off, and the leader
                        # told now, so it stops dispatching to a stream that cannot take it
                        # (its own write may stay stuck on the node's flow control).
                        held_streams.pop(frame.stream, None)
                        self._queue(
                            cpb.RelayUpFrame(stream=frame.stream, close=cpb.RelayClose()), None
                        )
                elif frame.HasField("end"):
                    end = frame.end
                    code = _CODES.get(end.code, grpc.StatusCode.UNKNOWN)
                    held_streams.pop(frame.stream, None)  # no close frame: the leader ended it
                    held.session.close(RelayedEnd(code, end.message))
