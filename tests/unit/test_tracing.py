"""W3C trace context through the real core, and the spans the tracer makes of it.

The core runs on a real LmdbStore (``tests/unit/fabric.py``); spans go to the SDK's
InMemorySpanExporter through the same provider (sampler, batch processor) the server builds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from nexus_fast.config import TracingConfig
from nexus_fast.logs import JsonFormatter
from nexus_fast.telemetry import trace_context, tracing
from nexus_fast.telemetry.trace_context import TraceIdFilter, incoming, parse
from tests.unit.fabric import fabric, run, spec, wait_sent

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_SPAN = "00f067aa0ba902b7"
SAMPLED = f"00-{TRACE_ID}-{CLIENT_SPAN}-01"
UNSAMPLED = f"00-{TRACE_ID}-{CLIENT_SPAN}-00"


@pytest.fixture(autouse=True)
def no_tracer_left() -> Iterator[None]:
    yield
    trace_context.install(None)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",  # no flags
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero parent id
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",  # v00 takes no more
        "00-4bf92f3577b34da6a3ce929d0e0e47zz-00f067aa0ba902b7-01",  # not hex
    ],
)
def test_invalid_traceparent_is_ignored(header: str) -> None:
    assert parse(header) is None
    assert incoming(header) is None  # tracing off: nothing to carry


def test_valid_traceparent_is_normalised_and_a_later_version_read_as_00() -> None:
    trace = parse(f"  {SAMPLED.upper()} ", "vendor=1")
    assert trace is not None
    assert (trace.traceparent, trace.tracestate, trace.trace_id) == (SAMPLED, "vendor=1", TRACE_ID)
    later = parse(f"01-{TRACE_ID}-{CLIENT_SPAN}-01-more")
    assert later is not None and later.traceparent == SAMPLED
    assert parse(SAMPLED, "x" * 600).tracestate == ""  # type: ignore[union-attr]


def test_tracing_off_carries_the_clients_context_to_the_record_and_the_node(
    tmp_path: Path,
) -> None:
    async def main() -> None:
        f = await fabric(tmp_path)
        session = await f.node("n1")
        assert session is not None
        await f.commands.submit([spec("traced")], "", incoming(SAMPLED, "vendor=1"))
        await f.commands.submit([spec("plain")])
        sent = {c.id: c for c in await wait_sent(session, 2)}
        assert (sent["traced"].traceparent, sent["traced"].tracestate) == (SAMPLED, "vendor=1")
        assert (sent["plain"].traceparent, sent["plain"].tracestate) == ("", "")
        await f.flush()
        stored = f.stored("traced")
        assert stored is not None and stored.traceparent == SAMPLED
        assert f.stored("plain").traceparent == ""  # type: ignore[union-attr]
        await f.stop()

    run(main())


def test_a_sampled_command_is_one_trace_of_submit_place_commit_dispatch_result(
    tmp_path: Path,
) -> None:
    exporter = InMemorySpanExporter()

    async def main() -> None:
        f = await fabric(tmp_path)
        # Ratio 0: only a client's sampled context is traced, never a fresh root.
        tracer = tracing.start(
            TracingConfig(enabled=True, sample_ratio=0.0), f.commands.on_final, exporter
        )
        assert tracer is not None and trace_context.tracer is tracer
        session = await f.node("n1")
        assert session is not None
        await f.commands.submit([spec("sampled")], "alice", incoming(SAMPLED))
        await f.commands.submit([spec("unsampled")], "alice", incoming(UNSAMPLED))
        await f.commands.submit([spec("rootless")], "alice", incoming(None))
        sent = {c.id: c for c in await wait_sent(session, 3)}
        # The node continues our submit span (same trace, our span id), not the client's.
        carried = sent["sampled"].traceparent
        assert carried.startswith(f"00-{TRACE_ID}-") and carried.endswith("-01")
        assert CLIENT_SPAN not in carried
        assert sent["unsampled"].traceparent == UNSAMPLED  # carried, not traced
        assert sent["rootless"].traceparent == ""
        for command_id in sent:
            f.succeed("n1", command_id)
        await f.flush()
        tracing.stop(tracer)
        assert trace_context.tracer is None
        await f.stop()

    run(main())
    spans = exporter.get_finished_spans()
    assert {format(s.context.trace_id, "032x") for s in spans} == {TRACE_ID}
    by_name = {s.name: s for s in spans}
    assert sorted(by_name) == [
        "nexus.commit",
        "nexus.dispatch",
        "nexus.place",
        "nexus.result",
        "nexus.submit",
    ]
    submit = by_name["nexus.submit"]
    assert submit.parent is not None and format(submit.parent.span_id, "016x") == CLIENT_SPAN
    for name in ("nexus.place", "nexus.commit", "nexus.dispatch", "nexus.result"):
        span = by_name[name]
        assert span.parent is not None and span.parent.span_id == submit.context.span_id, name
        assert span.attributes is not None and span.attributes["nexus.node.id"] == "n1", name
        assert span.start_time is not None and span.end_time is not None
        assert span.start_time <= span.end_time, name
    assert by_name["nexus.result"].attributes["nexus.command.state"] == "succeeded"  # type: ignore[index]
    assert by_name["nexus.dispatch"].start_time >= by_name["nexus.commit"].end_time  # type: ignore[operator]


def test_log_lines_carry_the_trace_id_of_the_request_being_handled() -> None:
    def line() -> str:
        record = logging.LogRecord("nexus.grpc", logging.INFO, "", 0, "submitted", None, None)
        TraceIdFilter().filter(record)
        return JsonFormatter().format(record)

    import contextvars

    def traced() -> str:
        incoming(SAMPLED)
        return line()

    assert '"trace_id"' not in line()
    assert f'"trace_id":"{TRACE_ID}"' in contextvars.copy_context().run(traced)


def test_sample_ratio_decides_new_traces_and_a_clients_flags_decide_its_own() -> None:
    for ratio, expect_traced in ((1.0, True), (0.0, False)):
        tracer = tracing.start(
            TracingConfig(enabled=True, sample_ratio=ratio), [], InMemorySpanExporter()
        )
        assert tracer is not None
        fresh = tracer.incoming("", "")
        assert (fresh is not None and fresh.span is not None) == expect_traced
        if fresh is not None:
            assert fresh.trace_id != TRACE_ID
            assert int(fresh.traceparent[-2:], 16) & 1  # sampled (the SDK may add "random")
        followed = tracer.incoming(SAMPLED, "")
        assert followed is not None and followed.span is not None  # whatever the ratio
        assert followed.trace_id == TRACE_ID
        carried = tracer.incoming(UNSAMPLED, "")
        assert carried is not None and carried.span is None and carried.traceparent == UNSAMPLED
        tracing.stop(tracer)
