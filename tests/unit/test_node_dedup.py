"""nexus_fast.node.dedup: the durable de-duplication record of ``nexus-node --state-dir``."""

from __future__ import annotations

from pathlib import Path

import pytest

from nexus_fast.node.dedup import INTERRUPTED, JOURNAL_NAME, DurableDedup, StateDirLocked
from nexus_fast.node.policy import DedupCache


def test_finished_and_interrupted_commands_survive_a_restart(tmp_path: Path) -> None:
    journal = DurableDedup(tmp_path, DedupCache(100))
    journal.started("n1", "done", 1)
    journal.started("n1", "running", 2)
    journal.sync()
    journal.finished("n1", "done", 1, True, b"\x00out", "")
    journal.sync()
    journal._fp.close()  # a crash: no close(), the lock goes with the process
    journal._lock_fp.close()
    with (tmp_path / JOURNAL_NAME).open("a") as fp:
        fp.write('{"s":"finished","n":"n1","c":"torn"')  # cut mid-line by the crash

    cache = DedupCache(100)
    again = DurableDedup(tmp_path, cache)
    assert again.interrupted == 1
    assert cache.get(DedupCache.key("n1", "done")) == (True, b"\x00out", "", 1)
    assert cache.get(DedupCache.key("n1", "running")) == (False, b"", INTERRUPTED, 2)
    assert cache.get(DedupCache.key("n1", "torn")) is None
    again.close()
    # The interrupted verdict was written down: a third start does not count it again.
    third = DurableDedup(tmp_path, DedupCache(100))
    assert third.interrupted == 0
    third.close()


def test_a_second_process_is_refused(tmp_path: Path) -> None:
    first = DurableDedup(tmp_path, DedupCache(10))
    with pytest.raises(StateDirLocked):
        DurableDedup(tmp_path, DedupCache(10))
    first.close()
    DurableDedup(tmp_path, DedupCache(10)).close()


def test_compaction_keeps_the_cache_and_the_running_commands(tmp_path: Path) -> None:
    cache = DedupCache(5)
    journal = DurableDedup(tmp_path, cache)
    journal.started("n", "long", 1)
    for i in range(40):
        journal.started("n", f"c{i}", 1)
        journal.finished("n", f"c{i}", 1, True, b"", "")
        journal.sync()
    lines = (tmp_path / JOURNAL_NAME).read_text().splitlines()
    assert len(lines) <= 4 * 5 + 2  # compacted, not 81 lines
    journal._fp.close()
    journal._lock_fp.close()
    cache2 = DedupCache(5)
    DurableDedup(tmp_path, cache2).close()
    assert cache2.get(DedupCache.key("n", "long")) == (False, b"", INTERRUPTED, 1)
    assert cache2.get(DedupCache.key("n", "c39")) == (True, b"", "", 1)
