"""gRPC adapter: one server interceptor authenticates and authorises every call.

Authentication happens once per call, which for a stream is once per stream: the
interceptor wraps the method's behaviour, reads ``authorization: Bearer ...`` from the
call's metadata or the verified client certificate from ``context.auth_context()``, looks
the method up in :data:`~nexus_fast.security.permissions.GRPC_METHODS` and either aborts
(``UNAUTHENTICATED`` / ``PERMISSION_DENIED`` with the reason) or runs the handler with the
principal in a context variable (:func:`current_principal`).
"""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Final

import grpc

from nexus_fast.logs import get_logger
from nexus_fast.security import auditing
from nexus_fast.security.identity import (
    Authenticator,
    PermissionDenied,
    Principal,
    Unauthenticated,
)
from nexus_fast.security.permissions import GRPC_METHODS, NODE_SELF, PUBLIC, Rbac

__all__ = ["AuthInterceptor", "check_node_id", "current_principal"]

log = get_logger("security")

_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "nexus_principal", default=None
)
# Unary NodeService calls whose request names the node acted for.
_NODE_ID_METHODS: Final = frozenset(
    {"/nexus.fabric.v1.NodeService/Register", "/nexus.fabric.v1.NodeService/Deregister"}
)


def current_principal() -> Principal | None:
    """The caller of the gRPC call being handled (None when authentication is off)."""
    return _principal.get()


async def check_node_id(context: grpc.aio.ServicerContext, node_id: str) -> None:
    """Abort with PERMISSION_DENIED unless the caller may act for ``node_id``.

    Node principals act only as themselves; other principals were already authorised by
    the method's permission. A no-op when authentication is off.
    """
    principal = _principal.get()
    if principal is not None and principal.node_id is not None and node_id != principal.node_id:
        log.warning(
            "node principal refused acting as another node",
            extra={"principal": principal.name, "node": principal.node_id, "asked": node_id},
        )
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED,
            f"node {principal.node_id!r} may act only as itself, not as {node_id!r}",
        )


def _metadata_value(context: grpc.aio.ServicerContext, name: str) -> str | None:
    for key, value in context.invocation_metadata() or ():
        if key == name:
            return value if isinstance(value, str) else None
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticate once per call, check the method's permission, expose the principal."""

    def __init__(self, authenticator: Authenticator, rbac: Rbac) -> None:
        self._auth = authenticator
        self._rbac = rbac
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
            return handler  # unknown method: UNIMPLEMENTED, as without auth
        method: str = handler_call_details.method
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        permission = GRPC_METHODS.get(method)
        wrapped = (
            handler if permission == PUBLIC else _wrap(handler, self._authorize(method, permission))
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _authorize(
        self, method: str, permission: str | None
    ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Principal | None]]:
        auth, rbac = self._auth, self._rbac
        check_request = method in _NODE_ID_METHODS

        async def authorize(request: Any, context: grpc.aio.ServicerContext) -> Principal | None:
            try:
                pems = context.auth_context().get("x509_pem_cert") or ()
                principal = auth.authenticate(
                    _metadata_value(context, "authorization"), pem=pems[0] if pems else None
                )
                auditing.identify(principal)  # a refusal below is audited under this name
                if not rbac.allows(principal, permission):
                    raise PermissionDenied(
                        f"{principal.role} {principal.name!r} may not call {method}"
                        + (f" (needs {permission})" if permission else " (not in the table)")
                    )
                if (
                    check_request
                    and principal.node_id is not None
                    and permission == NODE_SELF
                    and request.node_id != principal.node_id
                ):
                    raise PermissionDenied(
                        f"node {principal.node_id!r} may act only as itself, "
                        f"not as {request.node_id!r}"
                    )
            except Unauthenticated as exc:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, str(exc))
                return None
            except PermissionDenied as exc:
                log.info("permission denied", extra={"method": method, "reason": str(exc)})
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
                return None
            _principal.set(principal)
            return principal

        return authorize


def _wrap(
    handler: grpc.RpcMethodHandler,
    authorize: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Principal | None]],
) -> grpc.RpcMethodHandler:
    """The same handler (serializers untouched) with ``authorize`` run first."""
    h: Any = handler
    if h.unary_unary is not None:
        inner = h.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            await authorize(request, context)
            return await inner(request, context)

        return grpc.unary_unary_rpc_method_handler(
            unary_unary, h.request_deserializer, h.response_serializer
        )
    if h.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(
            _stream_behavior(h.unary_stream, authorize, True),
            h.request_deserializer,
            h.response_serializer,
        )
    if h.stream_unary is not None:
        inner_su = h.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            await authorize(None, context)
            return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(
            stream_unary, h.request_deserializer, h.response_serializer
        )
    return grpc.stream_stream_rpc_method_handler(
        _stream_behavior(h.stream_stream, authorize, False),
        h.request_deserializer,
        h.response_serializer,
    )


def _stream_behavior(
    inner: Any,
    authorize: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Principal | None]],
    unary_request: bool,
) -> Any:
    """Wrap a streaming behaviour keeping its kind: async generator or coroutine."""
    if inspect.isasyncgenfunction(inner):

        async def generator(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await authorize(request if unary_request else None, context)
            async for item in inner(request, context):
                yield item

        return generator

    async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await authorize(request if unary_request else None, context)
        return await inner(request, context)

    return coroutine
