"""What the gRPC interceptors share: rewrapping a method handler's behaviour, per method once.

The audit, auth and limits interceptors each run code around a method's behaviour. gRPC
has four handler kinds (unary/stream request x unary/stream response); :func:`wrap_handler`
rebuilds a handler of the same kind, serializers untouched, around a new behaviour, and
:class:`WrappingInterceptor` caches the wrapped handler per method so a call costs one
dictionary lookup.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import grpc

__all__ = ["Behavior", "WrappingInterceptor", "metadata_value", "wrap_handler"]

Behavior = Callable[[Any, bool, bool], Any]
"""``behavior(inner, unary_request, unary_response)``: the behaviour to run instead of
``inner`` (keeping its kind: coroutine function or async generator function)."""


def metadata_value(context: grpc.aio.ServicerContext, name: str) -> str | None:
    """The first value of the call's invocation metadata ``name`` (None if absent or binary)."""
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else None
    return None


def wrap_handler(handler: grpc.RpcMethodHandler, behavior: Behavior) -> grpc.RpcMethodHandler:
    """The same handler (same kind, serializers untouched) running ``behavior(inner, ...)``."""
    h: Any = handler
    if h.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(
            behavior(h.unary_unary, True, True), h.request_deserializer, h.response_serializer
        )
    if h.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            behavior(h.unary_stream, True, False), h.request_deserializer, h.response_serializer
        )
    if h.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(
            behavior(h.stream_unary, False, True), h.request_deserializer, h.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        behavior(h.stream_stream, False, False), h.request_deserializer, h.response_serializer
    )


class WrappingInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """An interceptor that replaces each known method's handler by :meth:`_wrap`'s, cached.

    Unknown methods (no handler) pass through: UNIMPLEMENTED, as without the interceptor.
    """

    def __init__(self) -> None:
        # method -> (handler from the server, the wrapped one): built once per method, so
        # a call costs a dictionary lookup here; bounded by the methods that exist.
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = self._wrap(method, handler)
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler to serve ``method`` with (``handler`` itself to leave it alone)."""
        raise NotImplementedError
