"""Command bookkeeping (``nexus_fast.commands``): both twins, fed the same records, agree with
each other and with the reference encodings (protobuf's own event bytes, the state machine's
rules)."""

from __future__ import annotations

import struct

from hypothesis import given
from hypothesis import strategies as st

from nexus_fast.codec import protowire
from nexus_fast.core.command_states import FINAL_STATES, STATE_NAMES
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store.base import Put

from ..conftest import IMPLEMENTATIONS, _load_twin

TWINS = [_load_twin("commands", impl) for impl in IMPLEMENTATIONS]
STATES = sorted(STATE_NAMES)
LIMIT = protowire.EVENT_PAYLOAD_LIMIT


def test_transition_table_is_the_same_in_both_twins() -> None:
    reference = TWINS[-1].TRANSITIONS
    for twin in TWINS:
        assert reference == twin.TRANSITIONS
        for old in range(-1, 12):
            for new in range(-1, 12):
                assert twin.can_move(old, new) == ((old, new) in reference)
    py = TWINS[-1]
    assert not any(py.can_move(f, s) for f in FINAL_STATES for s in STATES)  # final is final
    assert py.can_move(pb.COMMAND_STATE_DISPATCHED, pb.COMMAND_STATE_ACKED)
    assert not py.can_move(pb.COMMAND_STATE_ACKED, pb.COMMAND_STATE_DISPATCHED)


records = st.builds(
    lambda rid, state, node, payload, finished, attempt: _record(
        rid, state, node, payload, finished, attempt
    ),
    st.text(min_size=1, max_size=40),
    st.sampled_from(STATES),
    st.text(max_size=12),
    st.one_of(st.binary(max_size=40), st.binary(min_size=LIMIT - 2, max_size=LIMIT + 3)),
    st.integers(0, 2**63 - 1),
    st.integers(0, 5),
)


def _record(
    rid: str, state: int, node: str, payload: bytes, finished: int, attempt: int
) -> pb.CommandRecord:
    record = pb.CommandRecord(
        id=rid, state=state, node_id=node, finished_ms=finished, attempt=attempt, updated_ms=7
    )
    record.spec.kind = "echo"
    record.spec.payload = payload
    return record


@given(st.lists(records, max_size=8), st.integers(0, 2**50), st.text(max_size=10))
def test_transition_writer_twins_write_protobufs_bytes(
    batch: list[pb.CommandRecord], ts: int, actor: str
) -> None:
    encoder = protowire.CommandEvents()
    time_field = encoder.time_field(ts)
    actor_bytes = protowire.actor_field(actor)
    outputs = []
    for twin in TWINS:
        writer = twin.TransitionWriter(
            "commands",
            Put,
            protowire.COMMAND_EVENT_HEADS,
            FINAL_STATES,
            LIMIT,
            encoder.encode,
        )
        ops: list[Put] = []
        events: list[bytes] = []
        final: list[pb.CommandRecord] = []
        writer.stage(batch, ops, events, final, time_field, actor_bytes)
        outputs.append((ops, events, [r.id for r in final]))
    assert all(out == outputs[0] for out in outputs)
    ops, events, final_ids = outputs[0]
    expected_ops = []
    for record, event in zip(batch, events, strict=True):
        body = record.SerializeToString()
        rid = record.id.encode()
        expected_ops.append(Put("commands", b"c/" + rid, body))
        if record.state in FINAL_STATES:
            key = b"x/" + struct.pack(">Q", record.finished_ms) + b"/" + rid
            expected_ops.append(Put("commands", key, b""))
        if len(record.spec.payload) > LIMIT:
            slim = pb.CommandRecord()
            slim.CopyFrom(record)
            slim.spec.payload = b""
            body = slim.SerializeToString()
        name = STATE_NAMES[record.state]
        assert event == protowire.event("command", f"command.{name}", record.id, body, ts, actor)
    assert ops == expected_ops
    assert final_ids == [r.id for r in batch if r.state in FINAL_STATES]


@given(
    st.lists(
        st.tuples(st.sampled_from(["a", "b", "c", "d"]), st.sampled_from(STATES), st.booleans()),
        max_size=6,
    ),
    st.lists(st.sampled_from(["a", "b", "c", "d", "zz"]), max_size=8),
)
def test_apply_acks_twins_agree(active_spec: list[tuple[str, int, bool]], acked: list[str]) -> None:
    results = []
    for twin in TWINS:
        active = {
            rid: pb.CommandRecord(id=rid, state=state, node_id="n1" if mine else "n2")
            for rid, state, mine in active_spec
        }
        changed: list[pb.CommandRecord] = []
        acks = [pb.CommandAck(command_id=i) for i in acked]
        stale = twin.apply_acks(active, acks, "n1", 42, changed)
        results.append(
            (
                stale,
                [r.id for r in changed],
                {k: (r.state, r.updated_ms) for k, r in active.items()},
            )
        )
    assert all(r == results[0] for r in results)
    stale, changed_ids, states = results[0]
    assert stale + len(changed_ids) == len(acked)
    for rid in changed_ids:
        assert states[rid] == (pb.COMMAND_STATE_ACKED, 42)


@given(st.lists(records, max_size=8), st.lists(records, max_size=8))
def test_transition_writer_twins_write_each_record_once_per_commit(
    first: list[pb.CommandRecord], second: list[pb.CommandRecord]
) -> None:
    """With an index, a record staged again (a later state before the commit) replaces its
    earlier put in place: one put per record key, holding its last state, where the key was
    first staged; every transition's event is still there."""
    encoder = protowire.CommandEvents()
    time_field = encoder.time_field(5)
    outputs = []
    for twin in TWINS:
        writer = twin.TransitionWriter(
            "commands", Put, protowire.COMMAND_EVENT_HEADS, FINAL_STATES, LIMIT, encoder.encode
        )
        ops: list[Put] = []
        events: list[bytes] = []
        final: list[pb.CommandRecord] = []
        index: dict[bytes, int] = {}
        writer.stage(first, ops, events, final, time_field, b"", index)
        writer.stage(second, ops, events, final, time_field, b"", index)
        outputs.append((ops, events, [r.id for r in final]))
    assert all(out == outputs[0] for out in outputs)
    ops, events, _ = outputs[0]
    assert len(events) == len(first) + len(second)
    last: dict[bytes, bytes] = {}
    order: list[bytes] = []
    expiry: list[Put] = []
    for record in first + second:
        key = b"c/" + record.id.encode()
        if key not in last:
            order.append(key)
        last[key] = record.SerializeToString()
        if record.state in FINAL_STATES:
            expiry.append(
                Put("commands", b"x/" + struct.pack(">Q", record.finished_ms) + b"/" + key[2:], b"")
            )
    record_puts = [op for op in ops if op.key.startswith(b"c/")]
    assert [op.key for op in record_puts] == order
    assert all(op.value == last[op.key] for op in record_puts)
    assert [op for op in ops if op.key.startswith(b"x/")] == expiry
