"""gRPC adapter: NodeService and ControlService on grpc.aio.

Handlers only translate protobuf to core calls and core errors to statuses
(``nexus_fast.api.status``); the core does the work.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc
import orjson

from nexus_fast import errors, failpoints
from nexus_fast.api import bad_input, grpc_events
from nexus_fast.api.grpc_handlers import register
from nexus_fast.api.node_stream import NodeRelay, NodeStreams, write_outbound
from nexus_fast.api.status import grpc_status, grpc_trailers
from nexus_fast.core import acting
from nexus_fast.core.acting import ANONYMOUS
from nexus_fast.core.agents import AgentService
from nexus_fast.core.commands import CommandService
from nexus_fast.core.events import EventBus
from nexus_fast.core.nodes import NodeRegistry, Session, validate_node_id
from nexus_fast.core.submit_wait import submit_and_wait
from nexus_fast.logs import get_logger
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.pb import fabric_pb2_grpc as pb_grpc
from nexus_fast.security.grpc_auth import check_node_id, current_principal
from nexus_fast.security.limits import PrincipalLimits
from nexus_fast.store.base import StateStore
from nexus_fast.telemetry import metrics
from nexus_fast.telemetry.trace_context import from_grpc_metadata

log = get_logger("grpc")

AUDIT_PAGE_DEFAULT = 500
AUDIT_PAGE_MAX = 5000
AUDIT_PAGE_BYTES = 1 << 20  # well under the default 4 MB message cap, whatever the entries

# A node that opens a stream but never says who it is is dropped after this.
FIRST_MESSAGE_TIMEOUT = 30.0

_Handler = TypeVar("_Handler", bound=Callable[..., Awaitable[Any]])


def _status_name(context: grpc.aio.ServicerContext) -> str:
    code: object = context.code()
    if code is None:
        return "OK"
    if isinstance(code, grpc.StatusCode):
        name: str = code.name
        return name
    return str(code)


def instrumented(method: str) -> Callable[[_Handler], _Handler]:
    """Count and time a handler, and map core errors to gRPC statuses in one place."""
    histogram = metrics.GRPC_REQUEST_DURATION.labels(method=method)

    def decorate(handler: _Handler) -> _Handler:
        @functools.wraps(handler)
        async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
            started = time.perf_counter()
            status = "OK"
            try:
                if type(request) is errors.UndecodableRequest:
                    raise request  # the strict deserializer's verdict (grpc_handlers)
                return await handler(self, request, context)
            except errors.NexusError as exc:
                code = grpc_status(exc)
                status = code.name
                if isinstance(exc, errors.UndecodableRequest):
                    bad_input.report("grpc", "undecodable", context.peer(), f"{method}: {exc}")
                trailers = grpc_trailers(exc)
                if trailers:
                    context.set_trailing_metadata(trailers)
                await context.abort(code, str(exc))
            except asyncio.CancelledError:
                status = "CANCELLED"
                raise
            except grpc.aio.AbortError:
                status = _status_name(context)
                raise
            except Exception:
                status = "INTERNAL"
                log.exception("unhandled error in handler", extra={"method": method})
                await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
            finally:
                histogram.observe(time.perf_counter() - started)
                metrics.GRPC_REQUESTS.labels(method=method, status=status).inc()

        return wrapper  # type: ignore[return-value]

    return decorate


def actor() -> str:
    """The name of the principal making the current call: what events say it did.

    ``anonymous`` with authentication off (no identity was proven).
    """
    principal = current_principal()
    return principal.name if principal is not None else ANONYMOUS


def add_node_service(servicer: pb_grpc.NodeServiceServicer, server: Any) -> None:
    """``add_NodeServiceServicer_to_server`` with strict request decoding (junk bytes get
    ``INVALID_ARGUMENT``, see :mod:`.grpc_handlers`)."""
    register(pb_grpc.add_NodeServiceServicer_to_server, servicer, server)


class NodeService(pb_grpc.NodeServiceServicer):
    """What node proxies speak: register, one Connect stream per node, deregister."""

    def __init__(
        self,
        registry: NodeRegistry,
        commands: CommandService,
        agents: AgentService,
        limits: PrincipalLimits | None = None,
        relay: NodeRelay | None = None,
    ) -> None:
        self._registry = registry
        self._streams = NodeStreams(registry, commands, agents)
        # Registered nodes per principal ([security.limits]); released when a node is gone.
        self._limits = limits
        # Cluster mode: on a follower, Connect streams are relayed to the leader.
        self._relay = relay

    @instrumented("NodeService/Register")
    async def Register(
        self, request: pb.RegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.RegisterResponse:
        limits = self._limits
        if limits is None:
            node, config = await self._registry.register(request, actor(), context.peer())
        else:
            principal = current_principal()
            name = principal.name if principal is not None else ANONYMOUS
            held = limits.nodes.owner(request.node_id) == name
            limits.register_node(name, request.node_id)  # LimitExceeded: RESOURCE_EXHAUSTED
            try:
                node, config = await self._registry.register(request, actor(), context.peer())
            except BaseException:
                if not held:
                    limits.deregister_node(request.node_id)  # no node, no slot
                raise
        return pb.RegisterResponse(session_epoch=node.session_epoch, config=config, node=node)

    @instrumented("NodeService/Deregister")
    async def Deregister(
        self, request: pb.DeregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeregisterResponse:
        await self._registry.deregister(
            request.node_id, request.session_epoch, actor(), context.peer()
        )
        return pb.DeregisterResponse()

    @instrumented("NodeService/Connect")
    async def Connect(self, request_iterator: Any, context: grpc.aio.ServicerContext) -> None:
        try:
            first = await asyncio.wait_for(context.read(), FIRST_MESSAGE_TIMEOUT)
        except TimeoutError:
            raise errors.InvalidArgument(
                "first message", f"no NodeMessage within {FIRST_MESSAGE_TIMEOUT:.0f}s"
            ) from None
        if first is grpc.aio.EOF:
            return
        await check_node_id(context, first.node_id)  # nodes act only as themselves
        relay = self._relay
        if relay is not None and relay.active():
            await relay.serve(context, first, actor())  # a follower: the leader serves it
            return
        session = await self._streams.open(
            first.node_id, first.session_epoch, actor(), context.peer()
        )
        metrics.GRPC_CONNECTIONS_ACTIVE.inc()
        reader = asyncio.get_running_loop().create_task(
            self._read_loop(context, session, first), name=f"node-reader-{session.node_id}"
        )
        try:
            await write_outbound(context, session)
        finally:
            reader.cancel()
            self._streams.close(session)
            metrics.GRPC_CONNECTIONS_ACTIVE.dec()
        if session.close_reason is not None:
            raise session.close_reason

    async def _read_loop(
        self, context: grpc.aio.ServicerContext, session: Session, first: pb.NodeMessage
    ) -> None:
        streams = self._streams
        message: Any = first
        try:
            while message is not grpc.aio.EOF:
                pending = streams.handle(session, message)
                if pending is not None:
                    await pending
                if session.closed:
                    return
                message = await context.read()
            session.close(None)  # the node half-closed: end the stream cleanly
        except errors.NexusError as exc:
            session.close(exc)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the peer vanished mid-read, or a bug: end this stream only
            if not session.closed:
                log.debug("node stream read failed", extra={"node": session.node_id, "err": exc})
            session.close(errors.Unavailable("stream read failed"))
        finally:
            if not session.closed:
                streams.close(session)


class ControlService(pb_grpc.ControlServiceServicer):
    """What operators speak: nodes, commands, agents and the event stream."""

    def __init__(
        self,
        registry: NodeRegistry,
        commands: CommandService,
        agents: AgentService,
        *,
        events: EventBus | None = None,
        store: StateStore | None = None,
        limits: PrincipalLimits | None = None,
        cluster_status: Callable[[], Awaitable[pb.ClusterStatus]] | None = None,
    ) -> None:
        self._registry = registry
        self._commands = commands
        self._agents = agents
        self._events = events
        # Cluster mode: this replica's view of the cluster; None: standalone.
        self._cluster_status = cluster_status
        self._store = store  # for ListAudit: the audit log is read straight from the store
        # A SubmitCommands that waits (wait_ms) holds a stream slot of its principal.
        self._limits = limits

    @instrumented("ControlService/WatchEvents")
    async def WatchEvents(
        self, request: pb.WatchEventsRequest, context: grpc.aio.ServicerContext
    ) -> None:
        # Register with grpc_events.add_control_service: it yields pre-encoded bytes.
        await grpc_events.watch_events(self._events, request, context)

    @instrumented("ControlService/ListNodes")
    async def ListNodes(
        self, request: pb.ListNodesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListNodesResponse:
        nodes, token, matched = self._registry.list_nodes(
            statuses=list(request.statuses),
            labels=dict(request.label_selector),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListNodesResponse(nodes=nodes, next_page_token=token, total_matched=matched)

    @instrumented("ControlService/GetNode")
    async def GetNode(
        self, request: pb.GetNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.Node:
        validate_node_id(request.node_id)
        return self._registry.get(request.node_id)

    @instrumented("ControlService/DrainNode")
    async def DrainNode(
        self, request: pb.DrainNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.Node:
        return await self._registry.drain(request.node_id, request.drain, request.reason, actor())

    @instrumented("ControlService/SetNodeEligibility")
    async def SetNodeEligibility(
        self, request: pb.SetNodeEligibilityRequest, context: grpc.aio.ServicerContext
    ) -> pb.Node:
        return await self._registry.set_eligibility(request.node_id, request.eligible, actor())

    @instrumented("ControlService/RemoveNode")
    async def RemoveNode(
        self, request: pb.RemoveNodeRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveNodeResponse:
        await self._registry.remove(request.node_id, actor())
        return pb.RemoveNodeResponse()

    # ------------------------------------------------------------ commands

    @instrumented("ControlService/SubmitCommands")
    async def SubmitCommands(
        self, request: pb.SubmitCommandsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitCommandsResponse:
        trace = from_grpc_metadata(context.invocation_metadata())  # W3C traceparent, if any
        if not request.wait_ms:
            return await self._commands.submit(request.commands, actor(), trace)
        slot = None
        if self._limits is not None:  # taken before submitting: a refusal commits nothing
            slot = self._limits.stream(actor())
        try:
            return await submit_and_wait(
                self._commands, list(request.commands), actor(), request.wait_ms, trace
            )
        finally:
            if slot is not None:
                slot.release()

    @instrumented("ControlService/GetCommand")
    async def GetCommand(
        self, request: pb.GetCommandRequest, context: grpc.aio.ServicerContext
    ) -> pb.CommandRecord:
        return self._commands.get(request.id)

    @instrumented("ControlService/ListCommands")
    async def ListCommands(
        self, request: pb.ListCommandsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCommandsResponse:
        records, token = self._commands.list_commands(
            states=list(request.states),
            node_id=request.node_id,
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListCommandsResponse(commands=records, next_page_token=token)

    @instrumented("ControlService/CancelCommand")
    async def CancelCommand(
        self, request: pb.CancelCommandRequest, context: grpc.aio.ServicerContext
    ) -> pb.CommandRecord:
        return await self._commands.cancel(request.id, actor())

    @instrumented("ControlService/WaitCommands")
    async def WaitCommands(
        self, request: pb.WaitCommandsRequest, context: grpc.aio.ServicerContext
    ) -> None:
        timeout = request.timeout_ms / 1000.0 if request.timeout_ms else None
        async for record in self._commands.wait(list(request.ids), timeout):
            await context.write(record)

    # ------------------------------------------------------------ agents

    @instrumented("ControlService/DeployAgent")
    async def DeployAgent(
        self, request: pb.DeployAgentRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeployAgentResponse:
        return pb.DeployAgentResponse(agents=await self._agents.deploy(request.spec, actor()))

    @instrumented("ControlService/ListAgents")
    async def ListAgents(
        self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAgentsResponse:
        agents, token = self._agents.list_agents(
            name=request.name,
            states=list(request.states),
            page_size=request.page_size,
            page_token=request.page_token,
        )
        return pb.ListAgentsResponse(agents=agents, next_page_token=token)

    @instrumented("ControlService/GetAgent")
    async def GetAgent(
        self, request: pb.GetAgentRequest, context: grpc.aio.ServicerContext
    ) -> pb.Agent:
        return self._agents.get(request.id)

    @instrumented("ControlService/StopAgent")
    async def StopAgent(
        self, request: pb.StopAgentRequest, context: grpc.aio.ServicerContext
    ) -> pb.StopAgentResponse:
        return pb.StopAgentResponse(agents=await self._agents.stop_agent(request.name, actor()))

    @instrumented("ControlService/ListAudit")
    async def ListAudit(
        self, request: pb.ListAuditRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAuditResponse:
        store = self._store
        if store is None:
            raise errors.Unavailable("the audit log is not available on this server")
        if request.limit > AUDIT_PAGE_MAX:
            raise errors.InvalidArgument("limit", f"at most {AUDIT_PAGE_MAX}")
        rows = store.audit_since(
            request.after_seq, request.limit or AUDIT_PAGE_DEFAULT, AUDIT_PAGE_BYTES
        )
        response = pb.ListAuditResponse(
            next_after_seq=rows[-1][0] if rows else request.after_seq,
            more=bool(rows) and rows[-1][0] < store.audit_head.seq,
        )
        add = response.entries.add
        for seq, digest, body in rows:
            try:
                fields = orjson.loads(body)
            except orjson.JSONDecodeError:
                fields = None
            if not isinstance(fields, dict):  # shown as such; `audit verify` names it
                fields = {"outcome": "undecodable"}
            add(
                seq=seq,
                hash=digest,
                time_ms=_int_field(fields, "time_ms", 63),
                suppressed=_int_field(fields, "suppressed", 32),
                **{k: v for k, v in fields.items() if k in _AUDIT_TEXT and type(v) is str},
            )
        return response

    # ------------------------------------------------------------ failpoints

    @instrumented("ControlService/SetFailpoints")
    async def SetFailpoints(
        self, request: pb.SetFailpointsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListFailpointsResponse:
        try:
            failpoints.configure(request.spec)
        except ValueError as exc:
            raise errors.InvalidArgument("spec", str(exc)) from None
        # Audited without waiting for it: a pause just set may hold the writer, and the
        # call that clears it must answer whatever the store does.
        audit = acting.records(request.spec[:256] or "cleared")
        if audit and self._store is not None:
            try:
                self._store.commit((), (), audit).add_done_callback(_audit_written)
            except Exception as exc:  # closed, busy: the change stands, the log says so
                log.warning("failpoints audit record dropped: %s", exc)
        return _failpoint_list()

    @instrumented("ControlService/ListFailpoints")
    async def ListFailpoints(
        self, request: pb.ListFailpointsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListFailpointsResponse:
        return _failpoint_list()

    @instrumented("ControlService/GetClusterStatus")
    async def GetClusterStatus(
        self, request: pb.GetClusterStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClusterStatus:
        if self._cluster_status is None:
            return pb.ClusterStatus(enabled=False, role="standalone", ready=True)
        return await self._cluster_status()


def _audit_written(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("failpoints audit record write failed: %s", future.exception())


def _failpoint_list() -> pb.ListFailpointsResponse:
    return pb.ListFailpointsResponse(
        failpoints=[pb.Failpoint(**fp) for fp in failpoints.snapshot()],  # type: ignore[arg-type]
        available=[f"{name}: {site.description}" for name, site in failpoints.SITES.items()],
    )


_AUDIT_TEXT = frozenset(("principal", "role", "peer", "method", "target", "request_id", "outcome"))


def _int_field(fields: dict[str, Any], name: str, bits: int) -> int:
    value = fields.get(name)
    return value if type(value) is int and 0 <= value < 1 << bits else 0
