"""W3C trace context on the command path, and the few hooks the core calls.

The core never imports OpenTelemetry. It carries a :class:`TraceContext` (the W3C
``traceparent`` and ``tracestate`` strings, opaque to it) from the API edge to the command
record, and calls :func:`stamp`, :func:`committed` and :data:`tracer`'s ``dispatched``.
With tracing off (no tracer installed, the default) a submission without a
``traceparent`` costs one ``is None`` test per batch, and one with a ``traceparent`` only
the copy of two strings onto its records: the node still receives the client's context.
:mod:`nexus_fast.telemetry.tracing` installs a :class:`CommandTracer` when ``[tracing]
enabled``; it turns the same calls into spans.

Log lines written while a traced request is handled carry its ``trace_id``
(:class:`TraceIdFilter`, installed by :func:`nexus_fast.logs.configure_logging`).
"""

from __future__ import annotations

import contextvars
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Final, Protocol

if TYPE_CHECKING:
    from nexus_fast.pb import fabric_pb2 as pb

__all__ = [
    "CommandTracer",
    "TraceContext",
    "TraceIdFilter",
    "committed",
    "from_grpc_metadata",
    "from_headers",
    "incoming",
    "install",
    "note_trace_id",
    "parse",
    "stamp",
]

# version-traceid-parentid-flags (W3C Trace Context, level 1). A later version may append
# fields after the flags ("-..."); version ff is forbidden.
_TRACEPARENT: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-.*)?")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16
# W3C: at most 32 list members; 512 characters is what a vendor must propagate at least.
MAX_TRACESTATE: Final = 512

# The trace id of the request this task is handling ("" = none): put on its log lines.
TRACE_ID: Final[contextvars.ContextVar[str]] = contextvars.ContextVar("nexus_trace_id", default="")


class TraceContext:
    """A submission's W3C trace context, and the tracer's state for it (``span``).

    ``traceparent``/``tracestate`` are what the command records keep and nodes receive:
    the client's, or the server's submit span's when it traces the submission.
    """

    __slots__ = ("placed_ns", "span", "started_ns", "trace_id", "traceparent", "tracestate")

    def __init__(
        self, traceparent: str, tracestate: str = "", span: object = None, started_ns: int = 0
    ) -> None:
        self.traceparent = traceparent
        self.tracestate = tracestate
        self.trace_id = traceparent[3:35]
        self.span = span  # the tracer's submit span; None: carried only
        self.started_ns = started_ns
        self.placed_ns = 0


class CommandTracer(Protocol):
    """What :mod:`nexus_fast.telemetry.tracing` provides once tracing is on."""

    def incoming(self, traceparent: str, tracestate: str) -> TraceContext | None:
        """Decide sampling for a submission; start its submit span if sampled."""
        ...

    def committed(self, trace: TraceContext, records: Sequence[pb.CommandRecord]) -> None:
        """The submission's records are durable: place/commit spans, end the submit span."""
        ...

    def dispatched(self, records: Sequence[pb.CommandRecord]) -> None:
        """``records`` were sent to their nodes: a dispatch span for each traced one."""
        ...

    def finished(self, record: pb.CommandRecord) -> None:
        """``record`` reached a final state: its result span."""
        ...


tracer: CommandTracer | None = None
"""The installed tracer; None while tracing is off (the core tests this, nothing more)."""


def install(new: CommandTracer | None) -> None:
    """Install (or with None, remove) the tracer the hooks forward to."""
    global tracer
    tracer = new


def parse(traceparent: str, tracestate: str = "") -> TraceContext | None:
    """A valid W3C ``traceparent`` as a :class:`TraceContext`; None if it is not one.

    An invalid header is ignored, as the W3C spec asks (the request goes on untraced).
    A ``tracestate`` over :data:`MAX_TRACESTATE` characters is dropped.
    """
    match = _TRACEPARENT.fullmatch(traceparent.strip().lower())
    if match is None:
        return None
    version, trace_id, span_id, flags, rest = match.groups()
    if version == "ff" or (version == "00" and rest) or trace_id == _ZERO_TRACE:
        return None
    if span_id == _ZERO_SPAN:
        return None
    state = tracestate.strip()
    if len(state) > MAX_TRACESTATE:
        state = ""
    # A later version is read as version 00 (its first four fields), as the spec asks.
    return TraceContext(f"00-{trace_id}-{span_id}-{flags}", state)


def incoming(traceparent: str | None, tracestate: str | None = None) -> TraceContext | None:
    """The trace context of a submission from its ``traceparent``/``tracestate`` values.

    Tracing off: the client's context, to carry (None without one). Tracing on: the
    tracer's decision (its submit span's context when sampled). Sets :data:`TRACE_ID`.
    """
    active = tracer
    if active is not None:
        trace = active.incoming(traceparent or "", tracestate or "")
    elif not traceparent:
        return None
    else:
        trace = parse(traceparent, tracestate or "")
    if trace is not None:
        TRACE_ID.set(trace.trace_id)
    return trace


def from_grpc_metadata(metadata: Iterable[tuple[str, str | bytes]] | None) -> TraceContext | None:
    """:func:`incoming` for a gRPC call's invocation metadata (keys are lower-case)."""
    traceparent = tracestate = None
    for key, value in metadata or ():
        if key == "traceparent" and isinstance(value, str):
            traceparent = value
        elif key == "tracestate" and isinstance(value, str):
            tracestate = value
    if traceparent is None and tracer is None:
        return None
    return incoming(traceparent, tracestate)


def from_headers(headers: Mapping[str, str]) -> TraceContext | None:
    """:func:`incoming` for HTTP (or WebSocket upgrade) headers."""
    traceparent = headers.get("traceparent")
    if traceparent is None and tracer is None:
        return None
    return incoming(traceparent, headers.get("tracestate"))


def note_trace_id(traceparent: str | None) -> None:
    """Put a request's trace id on the log lines written while it is handled (no span)."""
    if traceparent:
        trace = parse(traceparent)
        if trace is not None:
            TRACE_ID.set(trace.trace_id)


def stamp(trace: TraceContext, records: Iterable[pb.CommandRecord]) -> None:
    """Give the submission's new records its context (before they are committed)."""
    traceparent, tracestate = trace.traceparent, trace.tracestate
    for record in records:
        record.traceparent = traceparent
        if tracestate:
            record.tracestate = tracestate
    if trace.span is not None:
        from time import time_ns  # only for traced submissions

        trace.placed_ns = time_ns()


def committed(trace: TraceContext, records: Sequence[pb.CommandRecord]) -> None:
    """The submission's records are durable (forwarded to the tracer when it traces it)."""
    active = tracer
    if trace.span is not None and active is not None:
        active.committed(trace, records)


class TraceIdFilter(logging.Filter):
    """Adds ``trace_id`` to records logged while a traced request is handled."""

    def filter(self, record: logging.LogRecord) -> bool:
        trace_id = TRACE_ID.get()
        if trace_id and not hasattr(record, "trace_id"):
            record.trace_id = trace_id
        return True
