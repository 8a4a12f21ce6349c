"""OpenTelemetry tracing of the command path (``[tracing] enabled``; off by default).

Each traced submission becomes one trace, continuing the client's W3C ``traceparent``
when it sent one::

    nexus.submit            the submit call, from receipt until its records are durable
      nexus.place           validation, de-duplication and placement (the batch)
      nexus.commit          the group-committed write of the batch's records and events
      nexus.dispatch        per command: durable -> sent on its node's stream (per attempt)
      nexus.result          per command: sent -> final state (result, timeout, cancel)

Every span names the command (``nexus.command.id``) and its node (``nexus.node.id``) when
the batch has one; the node receives the submit span's context in ``Command.traceparent``,
so its own work continues the same trace.

The core knows nothing of this module: it calls the hooks in
:mod:`nexus_fast.telemetry.trace_context`, which forward here once :func:`start` installed
a :class:`SpanTracer`. Spans are recorded after the fact (explicit start and end times
taken at the hook sites), and only for sampled submissions. Sampling is decided here, once
per submission and before the SDK is called (its sampler path costs tens of microseconds):
a client's ``traceparent`` is followed as its flags say (sampled: traced; not: carried
only), and a submission without one is traced with probability ``sample_ratio`` (the
provider's sampler is then ``ParentBased(ALWAYS_ON)``). Export is the SDK's ``BatchSpanProcessor`` (its own
thread; ``OTEL_BSP_*`` variables tune it) to an OTLP/gRPC collector.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Sequence
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace as otel
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_ON, ParentBased
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from nexus_fast.config import TracingConfig
from nexus_fast.core.command_states import STATE_NAMES, SUCCEEDED
from nexus_fast.logs import get_logger
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.telemetry import trace_context
from nexus_fast.telemetry.trace_context import TraceContext, parse

__all__ = ["ExecutionSpans", "SpanTracer", "build_provider", "node_spans", "start", "stop"]

log = get_logger("tracing")

# Commands whose dispatch/result spans are still to come; the oldest are forgotten past
# this (their later spans are not recorded), so a stuck backlog cannot grow memory.
MAX_TRACED_COMMANDS: Final = 65536
# Command ids named on a batch's submit span (a batch may hold thousands).
_MAX_IDS_ON_SPAN: Final = 16
# The parent of a new trace's submit span: an empty context (never an ambient span).
_ROOT: Final = otel_context.Context()


class _Traced:
    """A sampled command between its commit and its final state."""

    __slots__ = ("context", "last_ns")

    def __init__(self, context: Any, last_ns: int) -> None:
        self.context = context  # the submit span, as a parent context
        self.last_ns = last_ns  # end of its previous span: the next one starts here


class SpanTracer:
    """Turns the command path's hooks into OpenTelemetry spans (loop thread only)."""

    def __init__(
        self, provider: TracerProvider, exporter: SpanExporter, sample_ratio: float
    ) -> None:
        self.provider = provider
        self.exporter = exporter
        self.sample_ratio = sample_ratio
        self._tracer = provider.get_tracer("nexus_fast")
        self._traced: dict[str, _Traced] = {}
        self._random = random.random

    # ------------------------------------------------------------ hooks

    def incoming(self, traceparent: str, tracestate: str) -> TraceContext | None:
        """Sample a submission: its submit span's context, or the client's (carried only)."""
        client = parse(traceparent, tracestate) if traceparent else None
        if client is not None:
            if not int(client.traceparent[-2:], 16) & 1:
                return client  # the client decided not to sample: carried only
            parent = otel.set_span_in_context(otel.NonRecordingSpan(_span_context(client)))
        elif self._random() < self.sample_ratio:
            parent = _ROOT  # a new trace
        else:
            return None
        now = time.time_ns()
        span = self._tracer.start_span(
            "nexus.submit",
            context=parent,
            kind=SpanKind.SERVER,
            start_time=now,
        )
        own = span.get_span_context()
        state = own.trace_state.to_header()
        carried = f"00-{own.trace_id:032x}-{own.span_id:016x}-{int(own.trace_flags):02x}"
        return TraceContext(carried, state, span=span, started_ns=now)

    def committed(self, trace: TraceContext, records: Sequence[pb.CommandRecord]) -> None:
        """Place and commit spans, the submit span's attributes and end; track the commands."""
        span: Any = trace.span
        now = time.time_ns()
        placed = trace.placed_ns or trace.started_ns
        attributes = _batch_attributes(records)
        span.set_attributes(attributes)
        parent = otel.set_span_in_context(span)
        for name, start, end in (("nexus.place", trace.started_ns, placed),
                                 ("nexus.commit", placed, now)):  # fmt: skip
            child = self._tracer.start_span(
                name, context=parent, start_time=start, attributes=attributes
            )
            child.end(end_time=end)
        span.end(end_time=now)
        traced = self._traced
        for record in records:
            if len(traced) >= MAX_TRACED_COMMANDS:
                del traced[next(iter(traced))]
            traced[record.id] = _Traced(parent, now)

    def dispatched(self, records: Sequence[pb.CommandRecord]) -> None:
        """A dispatch span for each traced command just sent to its node."""
        traced = self._traced
        if not traced:
            return
        now = 0
        for record in records:
            entry = traced.get(record.id)
            if entry is None:
                continue
            now = now or time.time_ns()
            self._span("nexus.dispatch", entry, record, now)

    def finished(self, record: pb.CommandRecord) -> None:
        """The result span of a traced command (it is forgotten afterwards)."""
        entry = self._traced.pop(record.id, None) if self._traced else None
        if entry is None:
            return
        attributes = {"nexus.command.state": STATE_NAMES.get(record.state, "?")}
        if record.reason:
            attributes["nexus.command.reason"] = record.reason[:256]
        ok = record.state == SUCCEEDED
        self._span("nexus.result", entry, record, time.time_ns(), attributes, ok)

    def _span(
        self,
        name: str,
        entry: _Traced,
        record: pb.CommandRecord,
        now: int,
        extra: dict[str, Any] | None = None,
        ok: bool = True,
    ) -> None:
        attributes: dict[str, Any] = {
            "nexus.command.id": record.id,
            "nexus.command.kind": record.spec.kind,
            "nexus.command.attempt": record.attempt,
            "nexus.node.id": record.node_id,
        }
        if extra:
            attributes.update(extra)
        span = self._tracer.start_span(
            name, context=entry.context, start_time=entry.last_ns, attributes=attributes
        )
        if not ok:
            span.set_status(Status(StatusCode.ERROR, record.reason[:256]))
        span.end(end_time=now)
        entry.last_ns = now


class ExecutionSpans:
    """``nexus-node --tracing-endpoint``: a span around running each traced command.

    Only commands whose ``Command.traceparent`` is sampled get one (the node follows the
    core's decision, it never starts a trace); the span's parent is that context, i.e. the
    core's ``nexus.submit`` span.
    """

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("nexus_fast.node")

    def executed(
        self, node_id: str, command: pb.Command, started_ns: int, success: bool, error: str
    ) -> None:
        """Record the span of ``command``'s run on ``node_id`` (from ``started_ns`` to now)."""
        client = parse(command.traceparent, command.tracestate)
        if client is None or not int(client.traceparent[-2:], 16) & 1:
            return
        span = self._tracer.start_span(
            "nexus.node.execute",
            context=otel.set_span_in_context(otel.NonRecordingSpan(_span_context(client))),
            kind=SpanKind.CONSUMER,
            start_time=started_ns,
            attributes={
                "nexus.command.id": command.id,
                "nexus.command.kind": command.kind,
                "nexus.command.attempt": command.attempt,
                "nexus.node.id": node_id,
            },
        )
        if not success:
            span.set_status(Status(StatusCode.ERROR, error[:256]))
        span.end()


def node_spans(endpoint: str) -> ExecutionSpans:
    """The node's span recorder, exporting to the OTLP/gRPC collector at ``endpoint``."""
    settings = TracingConfig(enabled=True, endpoint=endpoint, service_name="nexus-node")
    provider, _ = build_provider(settings)
    return ExecutionSpans(provider)


def _span_context(client: TraceContext | None) -> SpanContext:
    if client is None:
        return otel.INVALID_SPAN_CONTEXT
    _, trace_id, span_id, flags = client.traceparent.split("-")
    try:
        state = TraceState.from_header([client.tracestate]) if client.tracestate else None
    except ValueError:
        state = None
    return SpanContext(
        int(trace_id, 16),
        int(span_id, 16),
        is_remote=True,
        trace_flags=TraceFlags(int(flags, 16)),
        trace_state=state,
    )


def _batch_attributes(records: Sequence[pb.CommandRecord]) -> dict[str, Any]:
    """What a batch's submit, place and commit spans say about it."""
    attributes: dict[str, Any] = {"nexus.command.count": len(records)}
    ids = [r.id for r in records[:_MAX_IDS_ON_SPAN]]
    nodes = sorted({r.node_id for r in records if r.node_id})
    if len(records) == 1:
        attributes["nexus.command.id"] = ids[0]
        attributes["nexus.command.kind"] = records[0].spec.kind
        if not records[0].node_id:  # not placed yet: why it waits
            attributes["nexus.command.reason"] = records[0].reason[:256]
    elif ids:
        attributes["nexus.command.ids"] = ids
    if len(nodes) == 1:
        attributes["nexus.node.id"] = nodes[0]
    elif nodes:
        attributes["nexus.node.ids"] = nodes[:_MAX_IDS_ON_SPAN]
    return attributes


def build_provider(
    settings: TracingConfig, exporter: SpanExporter | None = None
) -> tuple[TracerProvider, SpanExporter]:
    """A TracerProvider recording every span it is asked for (the callers sample),
    exporting in batches to OTLP/gRPC (or to ``exporter``).
    """
    from nexus_fast import __version__

    resource = Resource.create(
        {"service.name": settings.service_name, "service.version": __version__}
    )
    provider = TracerProvider(resource=resource, sampler=ParentBased(ALWAYS_ON))
    if exporter is None:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.endpoint)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider, exporter


def start(
    settings: TracingConfig, on_final: list[Any], exporter: SpanExporter | None = None
) -> SpanTracer | None:
    """Install a tracer when ``settings.enabled`` (None otherwise: the hooks stay no-ops).

    ``on_final`` is the command service's final-state hook list; the tracer joins it.
    """
    if not settings.enabled:
        return None
    tracer = SpanTracer(*build_provider(settings, exporter), settings.sample_ratio)
    on_final.append(tracer.finished)
    trace_context.install(tracer)
    log.info(
        "tracing on",
        extra={"endpoint": settings.endpoint, "sample_ratio": settings.sample_ratio},
    )
    return tracer


def stop(tracer: SpanTracer | None, timeout_s: float = 2.0) -> None:
    """Uninstall ``tracer`` and flush its spans for at most ``timeout_s`` (blocking: call
    it off the loop). A collector that is down costs the timeout, not the exporter's retries.
    """
    if tracer is None:
        return
    trace_context.install(None)
    # force_flush waits for the export in progress, retries included: past the timeout,
    # shutting the exporter down ends them (it closes its channel and stops retrying).
    deadline = threading.Timer(timeout_s, tracer.exporter.shutdown)
    deadline.start()
    try:
        tracer.provider.force_flush(int(timeout_s * 1000))
    finally:
        deadline.cancel()
    tracer.provider.shutdown()
