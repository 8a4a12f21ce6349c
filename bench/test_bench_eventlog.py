"""Catch-up from the durable event log: compiled walk vs pure twin vs a bare py-lmdb scan.

Scenario: an LMDB ``events`` database of 20,000 command transition events (~160 bytes, as
the command log writes them); each round reads all of them: ours in batches of 500 (one
``buffers=True`` read txn each, as ``LmdbStore.event_batch``), producing the serialized
``EventBatch`` a gRPC watcher is sent; the baseline is the bare scan a py-lmdb user writes
(one read txn, ``for key, value in txn.cursor()``), which produces nothing. ``nexus-bench
catchup`` runs the same comparison over 1M events.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lmdb
import pytest

from nexus_fast._compat import NO_EXTENSIONS
from nexus_fast.codec.frames import decode_event
from nexus_fast.codec.protowire import CommandEvents
from nexus_fast.pb import fabric_pb2 as pb

TWINS = ["py"] if NO_EXTENSIONS else ["c", "py"]
EVENTS = 20_000
BATCH = 500


@pytest.fixture(scope="module")
def log(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[lmdb.Environment, Any]]:
    encoder = CommandEvents()
    record = pb.CommandRecord(node_id="node-00042", attempt=1, created_ms=1, updated_ms=2)
    record.spec.kind = "echo"
    record.spec.payload = b"x" * 64
    time_field = encoder.time_field(1_764_000_000_000)
    path: Path = tmp_path_factory.mktemp("eventlog")
    env = lmdb.open(str(path), map_size=1 << 28, max_dbs=2)
    db = env.open_db(b"events")
    pairs = []
    for i in range(1, EVENTS + 1):
        record.id = f"19a8c0ffee12345678-{i // 4:08x}"
        record.state = pb.COMMAND_STATE_DISPATCHED
        pairs.append(
            (struct.pack(">Q", i), encoder.encode(record, record.SerializeToString(), time_field))
        )
    with env.begin(write=True) as txn:
        txn.cursor(db=db).putmulti(pairs, append=True)
    yield env, db
    env.close()


@pytest.mark.parametrize("impl", [*TWINS, "bare"])
def test_catch_up(benchmark: Any, load_twin: Any, log: tuple[Any, Any], impl: str) -> None:
    env, db = log

    def walk() -> int:
        twin = load_twin("eventlog", impl)
        after = events = 0
        while after < EVENTS:
            with env.begin(db=db, buffers=True) as txn:
                _batch, count, after = twin.collect_batch(
                    txn.cursor(), after, EVENTS, BATCH, 1 << 20, BATCH, None, None, decode_event
                )
            events += count
        return events

    def bare() -> int:
        events = 0
        with env.begin(db=db) as txn:
            for _key, _value in txn.cursor():
                events += 1
        return events

    assert benchmark(bare if impl == "bare" else walk) == EVENTS
