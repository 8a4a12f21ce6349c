"""Loop time per command in the core, without gRPC: submit, dispatch, ack, result.

Drives the core in process (``nexus_fast.core.assembly.CoreFabric`` on a real LmdbStore): 1,000 nodes, batches of 1,000, every command acked and succeeded, until all its
writes are durable. ``PROF=1`` prints a cProfile of the run; ``TOTAL=N`` sets the count
(e.g. a small one under ``valgrind --tool=callgrind``, whose instruction counts do not
depend on what else the machine is doing).

    NEXUS_REQUIRE_EXTENSIONS=1 .venv/bin/python bench/core_commands.py
"""

from __future__ import annotations

import asyncio
import cProfile
import os
import pstats
import tempfile
import time
from pathlib import Path

import uvloop

from nexus_fast.core.assembly import CoreFabric
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store import LmdbStore


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
    sessions = [await fab.node(f"n{i:04d}") for i in range(nodes)]
    for session in sessions:
        assert session is not None
        while not session.outbound.empty():
            session.outbound.get_nowait()
    profile = cProfile.Profile() if os.environ.get("PROF") else None
    if profile is not None:
        profile.enable()
    started = time.perf_counter()
    cpu_started = time.process_time()  # loop thread + LMDB writer thread
    done = 0
    for _ in range(total // batch):
        await fab.commands.submit([pb.CommandSpec(kind="run") for _ in range(batch)])
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
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    if profile is not None:
        profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(25)
    if not quiet:
        print(
            f"{done} commands in {elapsed:.2f}s: {done / elapsed:,.0f}/s, "
            f"{1e6 * elapsed / done:.1f} us of loop time and {1e6 * cpu / done:.1f} us of CPU "
            "(both threads) per command"
        )
    await fab.stop()
    return elapsed / done


if __name__ == "__main__":
    uvloop.run(main(total=int(os.environ.get("TOTAL", "20000"))))
