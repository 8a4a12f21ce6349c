"""Who acted: the glue between the port adapters, the core's commits and the audit log.

An adapter that starts a mutating call (a gRPC method or WebSocket op whose permission is
not a read: :func:`is_mutating`) opens an :class:`AuditCall` with the caller's principal,
peer address, method and request id. The core's side of it (the context variable, the
record each commit carries: :func:`~nexus_fast.core.acting.records`) is
:mod:`nexus_fast.core.acting`, which knows nothing of security; :class:`AuditCall` extends
its :class:`~nexus_fast.core.acting.ActingCall` with what the core never needs. When the
call ends, :meth:`AuditCall.finish` writes what is left:

* a refusal or failure (``PERMISSION_DENIED``, ``INVALID_ARGUMENT``, ...) in its own
  commit, sampled per principal by :class:`~nexus_fast.security.audit.RefusalSampler`;
* a call that succeeded without changing anything (an idempotent resubmit, draining a
  node already draining), in its own commit.

With authentication off the principal is :data:`~nexus_fast.core.acting.ANONYMOUS`: the
log still names the peer.

Not audited: ``NodeService.Connect`` (heartbeats, acks and results on the stream are far
too frequent; the session itself is opened by ``Register``, which is), and reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from nexus_fast.core import acting
from nexus_fast.core.acting import ANONYMOUS, current_call, ids_target, records
from nexus_fast.logs import get_logger
from nexus_fast.security.audit import RefusalSampler
from nexus_fast.security.permissions import GRPC_METHODS, PUBLIC, WS_OPS
from nexus_fast.security.principal import Principal
from nexus_fast.store.audit_chain import OUTCOME_OK, AuditRecord

if TYPE_CHECKING:
    from nexus_fast.store.base import StateStore

__all__ = [
    "ANONYMOUS",
    "AUDITED_GRPC_METHODS",
    "AUDITED_WS_OPS",
    "AuditCall",
    "Auditor",
    "current_call",
    "ids_target",
    "is_mutating",
    "records",
]

log = get_logger("audit")

REQUEST_ID_HEADER: Final = "x-request-id"
WS_PRINCIPAL_KEY: Final = "principal"
"""``ws_auth.PRINCIPAL_KEY`` (ws_auth imports this module; a unit test keeps them equal)."""

NOT_AUDITED: Final = frozenset(
    {"/nexus.fabric.v1.NodeService/Connect", "/nexus.cluster.v1.ReplicaService/Relay"}
)
"""Mutating by permission but not audited: the node stream's heartbeats, acks and results
arrive thousands of times a second; the session is opened by an audited ``Register``. A
Relay stream carries node streams (a follower's), so the same holds for it."""


def is_mutating(permission: str | None) -> bool:
    """True for a permission that changes state: anything but ``public`` and ``*.read``.

    Derived from the permission table, so a new method is audited by the permission it
    is given, without a second list to keep in step.
    """
    return permission is not None and permission != PUBLIC and not permission.endswith(".read")


def _audited(table: Mapping[str, str]) -> frozenset[str]:
    return frozenset(m for m, p in table.items() if is_mutating(p) and m not in NOT_AUDITED)


AUDITED_GRPC_METHODS: Final = _audited(GRPC_METHODS)
AUDITED_WS_OPS: Final = _audited(WS_OPS)


class AuditCall(acting.ActingCall):
    """One mutating call in flight, with the auditor that records how it ended."""

    __slots__ = ("auditor", "finished")

    def __init__(
        self, auditor: Auditor, method: str, peer: str, request_id: str | None = None
    ) -> None:
        super().__init__(method, peer, request_id)
        self.auditor = auditor
        self.finished = False

    def identify(self, principal: Principal) -> None:
        """The adapter authenticated the caller."""
        self.act_as(principal.name, principal.role)

    def finish(
        self, outcome: str, target: str | Callable[[], str] = ""
    ) -> asyncio.Future[Any] | None:
        """The call ended with ``outcome`` (``"ok"`` or a status name); write what is left.

        ``target`` may be a callable, evaluated only when a record is written. Returns the
        commit of a record written here, else None; nobody needs to wait for it (gRPC has
        sent an aborted call's status already). Idempotent. Never raises: the audit of a
        refusal must not turn it into another error.
        """
        if self.finished:
            return None
        self.finished = True
        if outcome == OUTCOME_OK and self.recorded:
            return None  # the usual case: the record went out with the change
        try:
            text = target() if callable(target) else target
        except Exception:  # a malformed request must not hide the refusal
            text = ""
        if outcome == OUTCOME_OK:  # succeeded without a change: nothing to share a txn with
            return self.auditor.write(self.record(text))
        rec = self.auditor.sampler.record(
            self.principal, self.role, self.peer, self.method, text, self.request_id, outcome
        )
        return self.auditor.write(rec) if rec is not None else None


def identify(principal: Principal) -> None:
    """Name the authenticated caller of the current call (a no-op outside one)."""
    call = current_call()
    if call is not None:
        call.act_as(principal.name, principal.role)


def finish(outcome: str) -> None:
    """End the current call with ``outcome`` (a no-op outside one); does not wait."""
    call = current_call()
    if isinstance(call, AuditCall):
        call.finish(outcome)


class Auditor:
    """Writes the records no change carries (refusals, failures, no-ops) in their own commit."""

    def __init__(self, store: StateStore, sampler: RefusalSampler | None = None) -> None:
        self.store = store
        self.sampler = sampler or RefusalSampler()
        # Cluster mode: True while this replica cannot commit (a follower). Its forwarded
        # calls are audited by the leader; its own refusals are logged, not chained.
        self.read_only: Callable[[], bool] | None = None

    def begin(self, method: str, peer: str, request_id: str | None = None) -> AuditCall:
        """Open a call in the current context (the adapter's task)."""
        call = AuditCall(self, method, peer, request_id)
        acting.enter(call)
        return call

    def ws_guard(self, inner: Callable[[Any, dict[str, Any]], None]) -> Callable[..., None]:
        """WebSocket ``on_message`` that runs audited ops (``submit``) inside an AuditCall.

        Wraps the permission guard, so its refusal (``finish``) is the call's outcome; the
        op's task inherits the call, and the op handler finishes it when it answers.
        """

        def on_message(conn: Any, message: dict[str, Any]) -> None:
            op = message.get("op")
            if op not in AUDITED_WS_OPS:
                inner(conn, message)
                return
            request_id = message.get("request_id")
            call = AuditCall(
                self, f"ws/{op}", conn.remote, request_id if isinstance(request_id, str) else None
            )
            principal = conn.state.get(WS_PRINCIPAL_KEY)
            if isinstance(principal, Principal):
                call.identify(principal)
            token = acting.enter(call)
            try:
                inner(conn, message)
            finally:
                acting.leave(token)
            if call.principal == ANONYMOUS:  # a certificate principal is read on the first op
                principal = conn.state.get(WS_PRINCIPAL_KEY)
                if isinstance(principal, Principal):
                    call.identify(principal)

        return on_message

    def write(self, record: AuditRecord) -> asyncio.Future[Any] | None:
        """Commit one record alone; failures are logged, never raised. Returns the commit."""
        if self.read_only is not None and self.read_only():
            log.info(
                "not audited on a follower: %s by %s: %s",
                record.method,
                record.principal,
                record.outcome,
            )
            return None
        try:
            future = self.store.commit((), (), (record,))
        except Exception as exc:  # busy, closed: the refusal still gets its answer
            log.warning("audit record dropped: %s", exc)
            return None
        future.add_done_callback(_log_failure)
        return future


def _log_failure(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("audit record write failed: %s", future.exception())
