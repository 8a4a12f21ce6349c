"""Follower forwarding: calls that need the leader's core go to the leader as raw bytes.

A follower holds no core (node registry, command state machine, agents): those live on the
leader only. :class:`LeaderRouter` is a server interceptor consulted once per call; for a
method in :data:`FORWARDED` while this replica does not serve the core, it answers with a
handler whose serializers are the identity, so the request's bytes go to the leader
unparsed over one grpc.aio channel, and the leader's answer (or status and trailers) comes
back the same way. NodeService ``Register``/``Deregister`` (:data:`NODE_FORWARDED`) are
forwarded too, parsed first so the follower can check the node's id. Every other call, and
every call on the leader, continues untouched.

Identity: with authentication off the call is forwarded as is. With it on, the follower has
already authenticated and authorised the caller (its interceptors run before this one); the
forwarded call authenticates as this replica (its own certificate, role ``replica``) and
names the caller in :data:`~nexus_fast.security.grpc_auth.ON_BEHALF_HEADER`; the leader
accepts that header from the ``replica`` role only and authorises and audits as the caller.
A node caller also travels with its node id
(:data:`~nexus_fast.security.grpc_auth.ON_BEHALF_NODE_HEADER`), so the leader still holds it
to its own id.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Final

import grpc

from nexus_fast import errors
from nexus_fast.api.status import grpc_status, grpc_trailers
from nexus_fast.config import Config
from nexus_fast.core import acting
from nexus_fast.logs import get_logger
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.security.auditing import REQUEST_ID_HEADER, AuditCall
from nexus_fast.security.grpc_auth import (
    ON_BEHALF_HEADER,
    ON_BEHALF_NODE_HEADER,
    current_principal,
)
from nexus_fast.telemetry.trace_context import TraceContext

__all__ = ["FORWARDED", "FORWARDED_HEADER", "NODE_FORWARDED", "LeaderChannel", "LeaderRouter"]

log = get_logger("cluster")

_CONTROL: Final = "/nexus.fabric.v1.ControlService/"
FORWARDED: Final[dict[str, bool]] = {
    # method -> streams its response. Reads are here too: they read the core's memory.
    _CONTROL + name: name == "WaitCommands"
    for name in (
        "ListNodes",
        "GetNode",
        "DrainNode",
        "SetNodeEligibility",
        "RemoveNode",
        "SubmitCommands",
        "GetCommand",
        "ListCommands",
        "CancelCommand",
        "WaitCommands",
        "DeployAgent",
        "ListAgents",
        "GetAgent",
        "StopAgent",
    )
}
"""ControlService methods a follower forwards to the leader. WatchEvents, ListAudit
(local LMDB), failpoints, GetClusterStatus and health stay local."""

_NODE: Final = "/nexus.fabric.v1.NodeService/"
NODE_FORWARDED: Final[dict[str, Callable[[bytes], Any]]] = {
    # method -> its request parser. A node registers on any replica: a follower forwards
    # Register/Deregister to the leader and holds the node's Connect stream itself (the
    # FollowerRelay carries it to the leader, cluster/relay.py), so node streams spread
    # over the replicas. The request is parsed here (not raw bytes) so the follower's
    # authorisation holds a node to its own node id exactly as on the leader.
    _NODE + "Register": pb.RegisterRequest.FromString,
    _NODE + "Deregister": pb.DeregisterRequest.FromString,
}

# Caller metadata that travels with a forwarded call (never the caller's credential).
_PASSED_ON: Final = frozenset({"traceparent", "tracestate", REQUEST_ID_HEADER})
FORWARDED_HEADER: Final = "nexus-forwarded"
"""Set on a forwarded call: a replica that is not the leader (any more) refuses it with the
leader hint instead of forwarding it again, so two replicas that briefly name each other as
leader never bounce a call between them."""


class LeaderChannel:
    """One grpc.aio channel to the current leader, replaced when the leader changes."""

    def __init__(
        self,
        config: Config,
        leader: Callable[[], tuple[str | None, bool]],
        etcd_cause: Callable[[], str | None] | None = None,
    ) -> None:
        """``leader()`` -> (the leader's advertise address or None, this replica leads).

        ``etcd_cause()`` -> why etcd is failing the election (:meth:`Election.etcd_cause`),
        named in the answers when no leader can be reached.
        """
        self._config = config
        self._leader = leader
        self._etcd_cause = etcd_cause
        self._target: str | None = None
        self._channel: grpc.aio.Channel | None = None
        self._old: set[grpc.aio.Channel] = set()

    def leader(self) -> tuple[str | None, bool]:
        """(the leader's advertise address or None, this replica leads)."""
        return self._leader()

    def etcd_cause(self) -> str | None:
        """Why etcd fails the election now, or None."""
        return self._etcd_cause() if self._etcd_cause is not None else None

    def unreachable(self, details: str) -> errors.LeaderElsewhere:
        """The answer when the leader's channel failed under a call, or the leader
        answered UNAVAILABLE while going away: naming the leader, and etcd when the
        election says it is the cause."""
        lost = any(phrase in details.lower() for phrase in _TRANSPORT)
        message = f"leader {self._target or '?'}{' unreachable' if lost else ''}: {details}"
        cause = self.etcd_cause()
        if cause is not None:
            message += f"; {cause}"
        return errors.LeaderElsewhere(message)

    def get(self) -> grpc.aio.Channel:
        """The channel to the leader; LeaderElsewhere when there is none to forward to."""
        target, leading = self._leader()
        if leading:  # the leader itself, still catching up before it loads its core
            raise errors.LeaderElsewhere("this replica is the leader and still catching up")
        if not target:
            cause = self.etcd_cause()
            raise errors.LeaderElsewhere(
                f"no leader elected: {cause}" if cause else "no leader elected yet"
            )
        if target != self._target or self._channel is None:
            if self._channel is not None:
                self._retire(self._channel)
            self._channel = self._open(target)
            self._target = target
        return self._channel

    def _open(self, target: str) -> grpc.aio.Channel:
        cfg = self._config
        size = cfg.server.max_message_size
        options = [
            ("grpc.max_receive_message_length", size),
            ("grpc.max_send_message_length", size),
            ("grpc.keepalive_time_ms", 10_000),
        ]
        sec = cfg.security
        if not sec.tls_enabled:
            return grpc.aio.insecure_channel(target, options=options)
        # This replica's own certificate is its client certificate (O=nexus-replica).
        root = Path(sec.tls_ca_file).read_bytes() if sec.tls_ca_file else None
        key = Path(sec.tls_key_file).read_bytes() if sec.tls_ca_file else None
        chain = Path(sec.tls_cert_file).read_bytes() if sec.tls_ca_file else None
        credentials = grpc.ssl_channel_credentials(root, key, chain)
        return grpc.aio.secure_channel(target, credentials, options=options)

    def _retire(self, channel: grpc.aio.Channel) -> None:
        # Calls in flight on the old leader's channel end by themselves (it is gone);
        # close it after a grace so the ones that can still finish do.
        self._old.add(channel)

        async def close() -> None:
            await asyncio.sleep(5.0)
            await channel.close()
            self._old.discard(channel)

        asyncio.get_running_loop().create_task(close())

    async def close(self) -> None:
        for channel in (self._channel, *self._old):
            if channel is not None:
                with contextlib.suppress(Exception):
                    await channel.close(grace=0.5)
        self._channel = None
        self._old.clear()

    async def submit(
        self, specs: list[pb.CommandSpec], actor: str, trace: TraceContext | None
    ) -> pb.SubmitCommandsResponse:
        """SubmitCommands on the leader for a WebSocket ``submit`` op on this follower."""
        call = self.get().unary_unary(
            _CONTROL + "SubmitCommands",
            request_serializer=pb.SubmitCommandsRequest.SerializeToString,
            response_deserializer=pb.SubmitCommandsResponse.FromString,
        )
        metadata: list[tuple[str, str]] = [(FORWARDED_HEADER, "1")]
        current = acting.current_call()
        if self._config.security.auth_required and current is not None:
            metadata.append((ON_BEHALF_HEADER, f"{current.role}:{actor}"))
        if isinstance(current, AuditCall):
            current.finished = True  # the leader audits it, as the caller
        if trace is not None:
            metadata.append(("traceparent", trace.traceparent))
            if trace.tracestate:
                metadata.append(("tracestate", trace.tracestate))
        try:
            response: pb.SubmitCommandsResponse = await call(
                pb.SubmitCommandsRequest(commands=specs), metadata=metadata, timeout=30.0
            )
        except grpc.aio.AioRpcError as exc:
            raise _as_error(exc, self._target, self) from None
        return response


_FROM_LEADER: Final[dict[grpc.StatusCode, Callable[[str], errors.NexusError]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: lambda details: errors.InvalidArgument("request", details),
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: lambda details: errors.ResourceExhausted(details, 1.0),
}


def _as_error(
    exc: grpc.aio.AioRpcError, target: str | None, channel: LeaderChannel | None = None
) -> errors.NexusError:
    """The leader's refusal as the core error the WebSocket adapter reports."""
    details = exc.details() or exc.code().name
    build = _FROM_LEADER.get(exc.code())
    if build is not None:
        return build(details)
    if channel is not None and _transport_failure(exc):
        return channel.unreachable(details)
    return errors.LeaderElsewhere(f"leader {target}: {details}", target or "")


class LeaderRouter(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Per call: the local handler, or (follower) a raw-bytes forwarder to the leader."""

    def __init__(
        self, channel: LeaderChannel, serving_core: Callable[[], bool], auth_on: bool
    ) -> None:
        self._channel = channel
        self._serving_core = serving_core
        self._auth_on = auth_on
        self._handlers = {method: self._handler(method, s) for method, s in FORWARDED.items()}
        for method, parse in NODE_FORWARDED.items():
            self._handlers[method] = self._handler(method, False, parse)

    async def intercept_service(
        self, continuation: Callable[[Any], Any], details: grpc.HandlerCallDetails
    ) -> Any:
        handler = self._handlers.get(details.method)
        if handler is None or self._serving_core():
            return await continuation(details)
        return handler

    def _metadata(self, context: grpc.aio.ServicerContext) -> list[tuple[str, str]]:
        out = [(FORWARDED_HEADER, "1")]
        for key, value in context.invocation_metadata() or ():
            if key == FORWARDED_HEADER:  # forwarded to us by a replica that took us for leader
                target, _ = self._channel.leader()
                raise errors.LeaderElsewhere(
                    f"not the leader; the leader is at {target}" if target else "no leader",
                    target or "",
                )
            if key in _PASSED_ON and isinstance(value, str):
                out.append((key, value))
        principal = current_principal()
        if self._auth_on and principal is not None:
            out.append((ON_BEHALF_HEADER, f"{principal.role}:{principal.name}"))
            if principal.node_id is not None:  # the leader holds the node to this id
                out.append((ON_BEHALF_NODE_HEADER, principal.node_id))
        # Audited by the leader, as the caller: no second record here.
        call = acting.current_call()
        if isinstance(call, AuditCall):
            call.finished = True
        return out

    def _handler(
        self, method: str, streaming: bool, parse: Callable[[bytes], Any] | None = None
    ) -> grpc.RpcMethodHandler:
        channel = self._channel

        if streaming:

            async def stream(
                request: bytes, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[bytes]:
                try:
                    call = channel.get().unary_stream(method)(
                        request, metadata=self._metadata(context), timeout=context.time_remaining()
                    )
                    async for item in call:
                        yield item
                except grpc.aio.AioRpcError as exc:
                    await _relay(context, exc, channel)
                except errors.NexusError as exc:
                    await _abort(context, exc)

            return grpc.unary_stream_rpc_method_handler(stream)

        # A parsed request (NODE_FORWARDED) goes on as its bytes again.
        serialize = None if parse is None else _serialize

        async def unary(request: Any, context: grpc.aio.ServicerContext) -> bytes:
            try:
                answer: bytes = await channel.get().unary_unary(
                    method, request_serializer=serialize
                )(request, metadata=self._metadata(context), timeout=context.time_remaining())
                return answer
            except grpc.aio.AioRpcError as exc:
                await _relay(context, exc, channel)
            except errors.NexusError as exc:
                await _abort(context, exc)
            raise AssertionError("abort raises")  # pragma: no cover

        return grpc.unary_unary_rpc_method_handler(unary, request_deserializer=parse)


def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


async def _abort(context: grpc.aio.ServicerContext, exc: errors.NexusError) -> None:
    trailers = grpc_trailers(exc)
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(grpc_status(exc), str(exc))


_TRANSPORT: Final = (
    "failed to connect",
    "stream removed",
    "socket closed",
    "connection reset",
    "connection refused",
    "goaway",
    "broken pipe",
    "keepalive",
)
"""gRPC's own UNAVAILABLE details when no leader process answered the forwarded call."""


def _transport_failure(exc: grpc.aio.AioRpcError) -> bool:
    """UNAVAILABLE without the leader's trailers nor a word of etcd: the channel failed
    (or the leader answered while shutting down); the etcd cause is worth adding."""
    if exc.code() != grpc.StatusCode.UNAVAILABLE or exc.trailing_metadata():
        return False  # the leader's own UNAVAILABLE answers mostly carry its trailers
    return "etcd" not in (exc.details() or "").lower()


async def _relay(
    context: grpc.aio.ServicerContext, exc: grpc.aio.AioRpcError, channel: LeaderChannel
) -> None:
    """The leader's status, details and trailers, as the caller's; or, when the leader
    could not be reached, UNAVAILABLE saying so (and naming etcd when it is the cause)."""
    if _transport_failure(exc):
        await _abort(context, channel.unreachable(exc.details() or exc.code().name))
    trailers = tuple(
        (k, v) for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str | bytes)
    )
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(exc.code(), exc.details() or "")
