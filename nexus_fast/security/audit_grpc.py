"""gRPC adapter of the audit log: an interceptor opening an AuditCall per audited method.

See :mod:`nexus_fast.security.auditing` for what is recorded and when.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc

from nexus_fast.security.auditing import (
    AUDITED_GRPC_METHODS,
    REQUEST_ID_HEADER,
    AuditCall,
    Auditor,
)
from nexus_fast.security.grpc_wrap import WrappingInterceptor, metadata_value, wrap_handler
from nexus_fast.store.audit_chain import OUTCOME_OK

__all__ = ["AuditInterceptor", "request_target"]


def request_target(request: Any) -> str:
    """Best-effort target named by a request (for records written by the adapter)."""
    if request is None:
        return ""
    for field in ("node_id", "id", "name"):
        value = getattr(request, field, None)
        if isinstance(value, str) and value:
            return value
    spec = getattr(request, "spec", None)
    if spec is not None and isinstance(getattr(spec, "name", None), str):
        return str(spec.name)
    commands = getattr(request, "commands", None)
    if commands is not None:
        keys = [c.idempotency_key for c in commands[:64]]
        return f"{len(commands)} commands: {','.join(k for k in keys if k)}"
    return ""


async def _durable(written: asyncio.Future[Any] | None) -> None:
    """A call that ends normally answers once its own entry (if any) is durable, as a call
    whose record went out with its change does. (An aborted call's status is already sent.)"""
    if written is not None:
        with contextlib.suppress(Exception):  # logged by the Auditor; the call succeeded
            await asyncio.shield(written)


def _outcome(context: grpc.aio.ServicerContext, exc: BaseException | None) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
        return str(code.name)
    if exc is None:
        return OUTCOME_OK
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    return "UNKNOWN"


class AuditInterceptor(WrappingInterceptor):
    """Outermost interceptor: opens an :class:`AuditCall` for every audited method.

    Installed whether or not authentication is on; placed before the auth interceptor so
    it sees that interceptor's refusals as the call's outcome.
    """

    def __init__(self, auditor: Auditor) -> None:
        super().__init__()
        self._auditor = auditor

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        if method not in AUDITED_GRPC_METHODS:
            return handler
        return _wrap(handler, self._auditor, method)


def _wrap(handler: grpc.RpcMethodHandler, auditor: Auditor, method: str) -> grpc.RpcMethodHandler:
    """The same handler (serializers untouched) run inside an :class:`AuditCall`."""

    def behavior(inner: Any, unary_request: bool, unary_response: bool) -> Any:
        def begin(request: Any, context: grpc.aio.ServicerContext) -> AuditCall:
            return auditor.begin(method, context.peer(), metadata_value(context, REQUEST_ID_HEADER))

        def target(request: Any) -> Callable[[], str]:
            return lambda: request_target(request if unary_request else None)

        if inspect.isasyncgenfunction(inner):

            async def generator(
                request: Any, context: grpc.aio.ServicerContext
            ) -> AsyncIterator[Any]:
                call = begin(request, context)
                try:
                    async for item in inner(request, context):
                        yield item
                except BaseException as exc:
                    call.finish(_outcome(context, exc), target(request))
                    raise
                await _durable(call.finish(_outcome(context, None), target(request)))

            return generator

        async def coroutine(request: Any, context: grpc.aio.ServicerContext) -> Any:
            call = begin(request, context)
            try:
                result = await inner(request, context)
            except BaseException as exc:
                call.finish(_outcome(context, exc), target(request))
                raise
            await _durable(call.finish(_outcome(context, None), target(request)))
            return result

        return coroutine

    return wrap_handler(handler, behavior)
