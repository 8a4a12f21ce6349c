"""Loop time per command in the core, without gRPC: submit, dispatch, ack, result.

Drives the core in process (``nexus_fast.core.assembly.CoreFabric`` on a real LmdbStore): 1,000 nodes, batches of 1,000, every command acked and succeeded, until all its
writes are durable. With the server's GC setting (``performance.gc_threshold`` 20000 and
``gc.freeze()`` after start-up). ``EVENTS=1`` also publishes every committed event to an
``EventBus`` (ring of 65,536) as the server does. ``PROF=1`` prints a cProfile of the run;
``TOTAL=N`` sets the count (e.g. a small one under ``valgrind --tool=callgrind``, whose
instruction counts do not depend on what else the machine is doing: per command =
(count at TOTAL=N - count at TOTAL=0) / N).

``TRACE`` measures tracing (docs/performance.md, "Cost of tracing"): ``off`` (default, the
submit call as before), ``carry`` (tracing off, every batch with a client traceparent:
carried to records and nodes), ``on`` (tracing on at ``TRACE_RATIO``, default 0.01, batches
without a traceparent, spans exported over OTLP/gRPC to ``TRACE_ENDPOINT``, e.g. a
``bench/otlp_sink.py`` in another process).

    NEXUS_REQUIRE_EXTENSIONS=1 .venv/bin/python bench/core_commands.py
"""

from __future__ import annotations

import asyncio
import cProfile
import gc
import os
import pstats
import tempfile
import time
from pathlib import Path

import uvloop

from nexus_fast.config import EventsConfig
from nexus_fast.core.assembly import CoreFabric
from nexus_fast.core.events import EventBus
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store import LmdbStore

TRACE = os.environ.get("TRACE", "off")
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


async def main(
    total: int = 20_000, batch: int = 1_000, nodes: int = 1_000, quiet: bool = False
) -> float:
    """Run the loop; returns seconds of loop time per command."""
    fab = await CoreFabric(
        LmdbStore(Path(tempfile.mkdtemp()), map_size=1 << 24),
        queue_capacity=200_000,
        max_batch_size=batch,
        default_timeout=300,
    ).start()
    tracer = None
    if TRACE != "off":
        from nexus_fast.config import TracingConfig
        from nexus_fast.telemetry import trace_context, tracing

        settings = TracingConfig(
            enabled=TRACE == "on",
            endpoint=os.environ.get("TRACE_ENDPOINT", "http://127.0.0.1:4317"),
            sample_ratio=float(os.environ.get("TRACE_RATIO", "0.01")),
        )
        tracer = tracing.start(settings, fab.commands.on_final)
    if os.environ.get("EVENTS"):
        bus = EventBus(fab.store, EventsConfig(), 65536)
        fab.store.on_commit = bus.publish_committed
    sessions = [await fab.node(f"n{i:04d}") for i in range(nodes)]
    for session in sessions:
        assert session is not None
        while not session.outbound.empty():
            session.outbound.get_nowait()
    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, *gc.get_threshold()[1:])
    profile = cProfile.Profile() if os.environ.get("PROF") else None
    if profile is not None:
        profile.enable()
    started = time.perf_counter()
    cpu_started = time.process_time()  # loop thread + LMDB writer thread
    done = 0
    for _ in range(total // batch):
        specs = [pb.CommandSpec(kind="run") for _ in range(batch)]
        if TRACE == "off":
            await fab.commands.submit(specs)
        else:
            header = TRACEPARENT if TRACE == "carry" else None
            await fab.commands.submit(specs, "", trace_context.incoming(header))
        await asyncio.sleep(0)  # let the dispatch callback run
        for session in sessions:
            assert session is not None
            acks, results = [], []
            while not session.outbound.empty():
                message = session.outbound.get_nowait()
                assert message is not None
                for command in message.commands:
                    acks.append(pb.CommandAck(command_id=command.id, attempt=command.attempt))
                    results.append(
                        pb.CommandResult(
                            command_id=command.id, attempt=command.attempt, success=True
                        )
                    )
            if acks:  # as a node answers: acks first, results in a later message
                fab.commands.handle_reports(session.node_id, pb.NodeMessage(acks=acks))
                fab.commands.handle_reports(session.node_id, pb.NodeMessage(results=results))
                done += len(results)
    await fab.flush()
    if tracer is not None:
        tracing.stop(tracer)  # the export thread's CPU of the run is counted
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    if profile is not None:
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    if not quiet:
        print(
            f"[TRACE={TRACE}] {done} commands in {elapsed:.2f}s: {done / elapsed:,.0f}/s, "
            f"{1e6 * elapsed / done:.1f} us of loop time and {1e6 * cpu / done:.1f} us of CPU "
            "(both threads) per command"
        )
    await fab.stop()
    return elapsed / done


if __name__ == "__main__":
    total, batch = int(os.environ.get("TOTAL", "20000")), int(os.environ.get("BATCH", "1000"))
    uvloop.run(main(total=total, batch=batch, nodes=int(os.environ.get("NODES", "1000"))))
