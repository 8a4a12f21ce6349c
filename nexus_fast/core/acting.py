"""Who is acting in this call: the context the core's commits take their audit record from.

An adapter that starts a mutating call opens an :class:`ActingCall` in a context variable
(:func:`enter`) naming the caller (principal name and role, plain strings), peer address,
method and request id. The core's commit paths call :func:`records` to get the record of
the change they are committing and pass it to ``store.commit(..., audit=...)``, so the
entry lands in the same LMDB write transaction as the change it records.

The context variable is inherited by tasks the call creates (asyncio copies the context),
so a change committed by a task the call spawned is recorded too; the first commit of a
call carries its record, later ones none (one record per call, however many commands).

This module is the core's side only and imports nothing from ``security``: which calls are
audited, authentication, and the records of refusals are set up by
:mod:`nexus_fast.security.auditing`, which subclasses :class:`ActingCall`.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Callable, Sequence
from typing import Any, Final

from nexus_fast.store.audit_chain import OUTCOME_OK, AuditRecord

__all__ = [
    "ANONYMOUS",
    "ActingCall",
    "current_call",
    "enter",
    "ids_target",
    "leave",
    "records",
]

ANONYMOUS: Final = "anonymous"
"""The principal of every caller when authentication is off (``security.auth_required =
false``): a name, not a verified identity. The audit log still names the peer."""


def _short_method(method: str) -> str:
    # "/nexus.fabric.v1.ControlService/DrainNode" -> "ControlService/DrainNode"
    return method.rsplit(".", 1)[-1] if method.startswith("/") else method


class ActingCall:
    """One mutating call in flight: who, from where, what, and whether it is recorded."""

    __slots__ = ("method", "peer", "principal", "recorded", "request_id", "role")

    def __init__(self, method: str, peer: str, request_id: str | None = None) -> None:
        self.method = _short_method(method)
        self.peer = peer
        self.request_id = request_id or os.urandom(8).hex()
        self.principal: str = ANONYMOUS
        self.role = ""
        self.recorded = False

    def act_as(self, principal: str, role: str) -> None:
        """The caller was authenticated as ``principal`` with ``role``."""
        self.principal = principal
        self.role = role

    def record(self, target: str, outcome: str = OUTCOME_OK) -> AuditRecord:
        """The record of this call (does not mark it recorded)."""
        return AuditRecord.now(
            self.principal, self.role, self.peer, self.method, target, self.request_id, outcome
        )


_call: contextvars.ContextVar[ActingCall | None] = contextvars.ContextVar(
    "nexus_audit_call", default=None
)


def current_call() -> ActingCall | None:
    """The mutating call being handled in this context, if any."""
    return _call.get()


def enter(call: ActingCall) -> contextvars.Token[ActingCall | None]:
    """Make ``call`` the current call of this context; :func:`leave` undoes it."""
    return _call.set(call)


def leave(token: contextvars.Token[ActingCall | None]) -> None:
    """Restore the call that was current before the :func:`enter` that gave ``token``."""
    _call.reset(token)


def records(target: str | Callable[[], str] = "") -> tuple[AuditRecord, ...]:
    """The audit record for the change about to be committed, for ``commit(audit=...)``.

    Empty outside a mutating call (timers, node reports, internal retries) and for every
    commit of a call after its first. ``target`` (node id, command ids, agent name) may be
    a callable, evaluated only when a record is made.
    """
    call = _call.get()
    if call is None or call.recorded:
        return ()
    call.recorded = True
    return (call.record(target() if callable(target) else target),)


def ids_target(kind: str, items: Sequence[Any]) -> str:
    """``"3 commands: a,b,c"`` from things with an ``id``; the record truncates long lists."""
    # Only as many ids as fit in a record (MAX_FIELD_CHARS), however large the batch.
    return f"{len(items)} {kind}: {','.join(x.id for x in items[:64])}"
