"""Submit and wait: one ``SubmitCommands`` that also answers with the final records.

A round trip "run this and tell me how it ended" is otherwise two RPCs (``SubmitCommands``
then ``WaitCommands``), each a full gRPC call on the client's critical path. With
``wait_ms`` the submit reply waits, bounded by :data:`MAX_SUBMIT_WAIT_MS`, for the batch's
commands to become final through the same waiters ``WaitCommands`` uses, so a final record
is sent only once its final state is durable (the order commit -> reply stays). Commands
not final by then come back as submitted: waiting never turns a durable submission into
an error.
"""

from __future__ import annotations

from typing import Final

from nexus_fast.core.commands import CommandService
from nexus_fast.errors import Unavailable
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.telemetry.trace_context import TraceContext

__all__ = ["MAX_SUBMIT_WAIT_MS", "submit_and_wait"]

# The longest a submit reply waits; a larger wait_ms waits this long (documented in
# fabric.proto). Long waits belong to WaitCommands, which streams each record when final.
MAX_SUBMIT_WAIT_MS: Final = 30_000


async def submit_and_wait(
    commands: CommandService,
    specs: list[pb.CommandSpec],
    actor: str,
    wait_ms: int,
    trace: TraceContext | None = None,
) -> pb.SubmitCommandsResponse:
    """``commands.submit`` (durable first), then up to ``wait_ms`` for final records."""
    response = await commands.submit(specs, actor, trace)
    if wait_ms <= 0:
        return response
    ids = list(dict.fromkeys(result.id for result in response.results))
    finals: dict[str, pb.CommandRecord] = {}
    try:
        async for record in commands.wait(ids, min(wait_ms, MAX_SUBMIT_WAIT_MS) / 1000.0):
            if record.id:  # the timeout marker has none
                finals[record.id] = record
    except Unavailable:
        pass  # the server stops: answer with what is final so far, the batch is durable
    for result in response.results:
        final = finals.get(result.id)
        if final is not None:
            result.state = final.state
            result.node_id = final.node_id
            result.reason = final.reason
    response.final.extend(finals[i] for i in ids if i in finals)
    return response
