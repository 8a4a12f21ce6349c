"""CommandLog against a real LmdbStore that refuses writes synchronously (closed store):
a refused commit is a failed write (one log line), never an exception out of the loop
callback that flushes; after halt() (a deposed cluster leader) failures are quiet."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from nexus_fast.core.command_log import CommandLog
from nexus_fast.pb import fabric_pb2 as pb
from nexus_fast.store import LmdbStore
from nexus_fast.store.base import StoreClosed


def _record(command_id: str) -> pb.CommandRecord:
    return pb.CommandRecord(id=command_id, state=pb.COMMAND_STATE_SUCCEEDED)


async def _with_closed_store(tmp_path: Path, halt: bool) -> tuple[list[Any], Exception | None]:
    loop_errors: list[Any] = []
    asyncio.get_running_loop().set_exception_handler(lambda _loop, ctx: loop_errors.append(ctx))
    store = LmdbStore(tmp_path / "db", map_size=1 << 20)
    await store.open()
    commands = CommandLog(store)
    await store.close()
    if halt:
        commands.halt()
    commands.save_later([_record("a")])  # flushed from a call_soon callback
    await asyncio.sleep(0.05)
    failed = None
    try:
        await commands.save([_record("b")])
    except StoreClosed as exc:
        failed = exc
    await commands.flush()
    return loop_errors, failed


def test_refused_commit_is_a_failed_write(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="nexus.commands"):
        loop_errors, failed = asyncio.run(_with_closed_store(tmp_path, halt=False))
    assert loop_errors == []
    assert isinstance(failed, StoreClosed)
    lines = [r for r in caplog.records if r.getMessage() == "command state write failed"]
    assert len(lines) == 2
    assert all(r.exc_info is None for r in lines)


def test_halted_log_fails_quietly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG):
        loop_errors, failed = asyncio.run(_with_closed_store(tmp_path, halt=True))
    assert loop_errors == []
    assert isinstance(failed, StoreClosed)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
