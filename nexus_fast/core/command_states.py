"""Command states: ``pending -> placed -> dispatched -> acked -> succeeded | failed |
timed_out | cancelled`` (shared by the state machine, the dispatcher and the log)."""

from __future__ import annotations

from typing import Final

from nexus_fast.pb import fabric_pb2 as pb

PENDING: Final = pb.COMMAND_STATE_PENDING
PLACED: Final = pb.COMMAND_STATE_PLACED
DISPATCHED: Final = pb.COMMAND_STATE_DISPATCHED
ACKED: Final = pb.COMMAND_STATE_ACKED
SUCCEEDED: Final = pb.COMMAND_STATE_SUCCEEDED
FAILED: Final = pb.COMMAND_STATE_FAILED
TIMED_OUT: Final = pb.COMMAND_STATE_TIMED_OUT
CANCELLED: Final = pb.COMMAND_STATE_CANCELLED
FINAL_STATES: Final = frozenset({SUCCEEDED, FAILED, TIMED_OUT, CANCELLED})
STATE_NAMES: Final[dict[int, str]] = {
    PENDING: "pending",
    PLACED: "placed",
    DISPATCHED: "dispatched",
    ACKED: "acked",
    SUCCEEDED: "succeeded",
    FAILED: "failed",
    TIMED_OUT: "timed_out",
    CANCELLED: "cancelled",
}
