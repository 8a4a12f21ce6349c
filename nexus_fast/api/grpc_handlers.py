"""Registering our gRPC services with strict request decoding.

grpc.aio decodes a request before the handler runs; when the bytes are not a valid
protobuf, the ``DecodeError`` escapes into grpc itself, which answers
``UNKNOWN "Unexpected <class 'DecodeError'>"`` (``INTERNAL`` inside a stream handler) and
logs a traceback at ERROR for every such request. :func:`register` installs the generated
handlers with a deserializer that turns the error into
:class:`~nexus_fast.errors.UndecodableRequest` instead, at registration time (nothing
added per call):

* for unary requests it is *returned* as the request: the handler wrapper
  (``grpc_api.instrumented``) raises it, so it maps to ``INVALID_ARGUMENT`` through the
  error table like every other error;
* for request streams it is *raised* from ``context.read()`` inside the handler, where
  the same wrapper catches it.

Servicers we did not write (gRPC health, server reflection) have no such wrapper:
``register(..., guard=True)`` wraps each of their methods in one that does the same
(``INVALID_ARGUMENT``, one rate-limited WARNING through :mod:`.bad_input`).
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from nexus_fast.api import bad_input
from nexus_fast.api.status import grpc_status
from nexus_fast.errors import UndecodableRequest

__all__ = ["register", "strict_deserializer"]

Deserializer = Callable[[bytes], Any]


def strict_deserializer(deserialize: Deserializer, streaming: bool) -> Deserializer:
    """Wrap a generated ``Message.FromString`` so junk bytes become UndecodableRequest."""
    message = getattr(deserialize, "__self__", None)
    descriptor = getattr(message, "DESCRIPTOR", None)
    name = getattr(descriptor, "full_name", None) or "request message"

    def parse(raw: bytes) -> Any:
        try:
            return deserialize(raw)
        except DecodeError:
            error = UndecodableRequest(name)
            if streaming:
                raise error from None
            return error

    return parse


def _guarded(behaviour: Any, method: str) -> Any:
    """``behaviour`` answering UndecodableRequest with INVALID_ARGUMENT, for a servicer
    without ``grpc_api.instrumented`` (unary requests arrive as the error; streamed ones
    raise it from the iterator)."""

    async def refuse(error: UndecodableRequest, context: grpc.aio.ServicerContext) -> None:
        bad_input.report("grpc", "undecodable", context.peer(), f"{method}: {error}")
        await context.abort(grpc_status(error), str(error))

    if inspect.isasyncgenfunction(behaviour):

        async def stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                if type(request) is UndecodableRequest:
                    raise request
                async for response in behaviour(request, context):
                    yield response
            except UndecodableRequest as error:
                await refuse(error, context)

        return stream

    async def call(request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            if type(request) is UndecodableRequest:
                raise request
            return await behaviour(request, context)
        except UndecodableRequest as error:
            await refuse(error, context)

    return call


def _strict(
    handler: Any,
    serializers: Mapping[str, Callable[[Any], bytes]],
    method: str,
    guard: str | None = None,
) -> Any:
    deserialize = handler.request_deserializer
    if deserialize is None:
        return handler
    parse = strict_deserializer(deserialize, handler.request_streaming)
    serialize = serializers.get(method, handler.response_serializer)
    if handler.request_streaming and handler.response_streaming:
        build, behaviour = grpc.stream_stream_rpc_method_handler, handler.stream_stream
    elif handler.request_streaming:
        build, behaviour = grpc.stream_unary_rpc_method_handler, handler.stream_unary
    elif handler.response_streaming:
        build, behaviour = grpc.unary_stream_rpc_method_handler, handler.unary_stream
    else:
        build, behaviour = grpc.unary_unary_rpc_method_handler, handler.unary_unary
    if guard is not None:
        behaviour = _guarded(behaviour, guard)
    return build(behaviour, request_deserializer=parse, response_serializer=serialize)


class _Registrar:
    """Stands in for the server while generated code registers a service, rewriting each
    method handler (strict decoding, optional response serializers) on the way through."""

    def __init__(
        self, server: Any, serializers: Mapping[str, Callable[[Any], bytes]], guard: bool
    ) -> None:
        self._server = server
        self._serializers = serializers
        self._guard = guard

    def _patch(self, service: str, handlers: Mapping[str, Any]) -> dict[str, Any]:
        short = service.rpartition(".")[2]
        return {
            name: _strict(h, self._serializers, name, f"{short}/{name}" if self._guard else None)
            for name, h in handlers.items()
        }

    def add_generic_rpc_handlers(self, generic_handlers: Sequence[Any]) -> None:
        # The generated code passes one DictionaryGenericHandler for the service.
        patched = []
        for handler in generic_handlers:
            table = getattr(handler, "_method_handlers", None)
            name = handler.service_name() if hasattr(handler, "service_name") else None
            if isinstance(table, dict) and name:
                prefix = f"/{name}/"
                methods = {k.removeprefix(prefix): v for k, v in table.items()}
                handler = grpc.method_handlers_generic_handler(name, self._patch(name, methods))
            patched.append(handler)
        self._server.add_generic_rpc_handlers(tuple(patched))

    def add_registered_method_handlers(self, service: str, handlers: dict[str, Any]) -> None:
        self._server.add_registered_method_handlers(service, self._patch(service, handlers))


def register(
    add_to_server: Callable[[Any, Any], None],
    servicer: Any,
    server: Any,
    response_serializers: Mapping[str, Callable[[Any], bytes]] | None = None,
    *,
    guard: bool = False,
) -> None:
    """``add_XServicer_to_server(servicer, server)`` with strict request decoding.

    ``response_serializers`` replaces the serializer of the named methods (e.g. one that
    passes pre-encoded bytes through). ``guard=True`` is for servicers we did not write
    (health, reflection): their methods get the INVALID_ARGUMENT answer that
    ``grpc_api.instrumented`` gives ours.
    """
    add_to_server(servicer, _Registrar(server, response_serializers or {}, guard))
