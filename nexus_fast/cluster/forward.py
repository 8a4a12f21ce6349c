"""Follower forwarding: calls that need the leader's core go to the leader as raw bytes.

A follower holds no core (node registry, command state machine, agents): those live on the
leader only. :class:`LeaderRouter` is a server interceptor consulted once per call; for a
method in :data:`FORWARDED` while this replica does not serve the core, it answers with a
handler whose serializers are the identity, so the request's bytes go to the leader
unparsed over one grpc.aio channel, and the leader's answer (or status and trailers) comes
back the same way. Every other call, and every call on the leader, continues untouched.

Identity: with authentication off the call is forwarded as is. With it on, the follower has
already authenticated and authorised the caller (its interceptors run before this one); the
forwarded call authenticates as this replica (its own certificate, role ``replica``) and
names the caller in :data:`~nexus_fast.security.grpc_auth.ON_BEHALF_HEADER`; the leader
accepts that header from the ``replica`` role only and authorises and audits as the caller.
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
from nexus_fast.security.grpc_auth import ON_BEHALF_HEADER, current_principal
from nexus_fast.telemetry.trace_context import TraceContext

__all__ = ["FORWARDED", "FORWARDED_HEADER", "REFUSED_ON_FOLLOWERS", "LeaderChannel", "LeaderRouter"]

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
REFUSED_ON_FOLLOWERS: Final[dict[str, str]] = {
    # method -> kind. A node that registers on a follower gets UNAVAILABLE with the
    # nexus-leader trailer and follows it. Connect streams are served on followers: the
    # FollowerRelay carries them to the leader (cluster/relay.py).
    _NODE + "Register": "unary",
    _NODE + "Deregister": "unary",
}

# Caller metadata that travels with a forwarded call (never the caller's credential).
_PASSED_ON: Final = frozenset({"traceparent", "tracestate", REQUEST_ID_HEADER})
FORWARDED_HEADER: Final = "nexus-forwarded"
"""Set on a forwarded call: a replica that is not the leader (any more) refuses it with the
leader hint instead of forwarding it again, so two replicas that briefly name each other as
leader never bounce a call between them."""


class LeaderChannel:
    """One grpc.aio channel to the current leader, replaced when the leader changes."""

    def __init__(self, config: Config, leader: Callable[[], tuple[str | None, bool]]) -> None:
        """``leader()`` -> (the leader's advertise address or None, this replica leads)."""
        self._config = config
        self._leader = leader
        self._target: str | None = None
        self._channel: grpc.aio.Channel | None = None
        self._old: set[grpc.aio.Channel] = set()

    def leader(self) -> tuple[str | None, bool]:
        """(the leader's advertise address or None, this replica leads)."""
        return self._leader()

    def get(self) -> grpc.aio.Channel:
        """The channel to the leader; LeaderElsewhere when there is none to forward to."""
        target, leading = self._leader()
        if leading:  # the leader itself, still catching up before it loads its core
            raise errors.LeaderElsewhere("this replica is the leader and still catching up")
        if not target:
            raise errors.LeaderElsewhere("no leader elected yet")
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
            raise _as_error(exc, self._target) from None
        return response


_FROM_LEADER: Final[dict[grpc.StatusCode, Callable[[str], errors.NexusError]]] = {
    grpc.StatusCode.INVALID_ARGUMENT: lambda details: errors.InvalidArgument("request", details),
    grpc.StatusCode.NOT_FOUND: errors.NotFound,
    grpc.StatusCode.ALREADY_EXISTS: errors.AlreadyExists,
    grpc.StatusCode.PERMISSION_DENIED: errors.PermissionDenied,
    grpc.StatusCode.FAILED_PRECONDITION: errors.FailedPrecondition,
    grpc.StatusCode.RESOURCE_EXHAUSTED: lambda details: errors.ResourceExhausted(details, 1.0),
}


def _as_error(exc: grpc.aio.AioRpcError, target: str | None) -> errors.NexusError:
    """The leader's refusal as the core error the WebSocket adapter reports."""
    details = exc.details() or exc.code().name
    build = _FROM_LEADER.get(exc.code())
    if build is not None:
        return build(details)
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
        for method, kind in REFUSED_ON_FOLLOWERS.items():
            self._handlers[method] = self._refusal(kind)

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
        # Audited by the leader, as the caller: no second record here.
        call = acting.current_call()
        if isinstance(call, AuditCall):
            call.finished = True
        return out

    def _refusal(self, kind: str) -> grpc.RpcMethodHandler:
        channel = self._channel

        async def refuse(request: Any, context: grpc.aio.ServicerContext) -> Any:
            target, _ = channel.leader()
            await _abort(
                context,
                errors.LeaderElsewhere(
                    f"not the leader; connect to the leader at {target}"
                    if target
                    else "no leader elected yet",
                    target or "",
                ),
            )

        if kind == "stream":
            return grpc.stream_stream_rpc_method_handler(refuse)
        return grpc.unary_unary_rpc_method_handler(refuse)

    def _handler(self, method: str, streaming: bool) -> grpc.RpcMethodHandler:
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
                    await _relay(context, exc)
                except errors.NexusError as exc:
                    await _abort(context, exc)

            return grpc.unary_stream_rpc_method_handler(stream)

        async def unary(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
            try:
                answer: bytes = await channel.get().unary_unary(method)(
                    request, metadata=self._metadata(context), timeout=context.time_remaining()
                )
                return answer
            except grpc.aio.AioRpcError as exc:
                await _relay(context, exc)
            except errors.NexusError as exc:
                await _abort(context, exc)
            raise AssertionError("abort raises")  # pragma: no cover

        return grpc.unary_unary_rpc_method_handler(unary)


async def _abort(context: grpc.aio.ServicerContext, exc: errors.NexusError) -> None:
    trailers = grpc_trailers(exc)
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(grpc_status(exc), str(exc))


async def _relay(context: grpc.aio.ServicerContext, exc: grpc.aio.AioRpcError) -> None:
    """The leader's status, details and trailers, as the caller's."""
    trailers = tuple(
        (k, v) for k, v in (exc.trailing_metadata() or ()) if isinstance(v, str | bytes)
    )
    if trailers:
        context.set_trailing_metadata(trailers)
    await context.abort(exc.code(), exc.details() or "")
