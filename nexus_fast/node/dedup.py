"""A durable de-duplication record for ``nexus-node --state-dir``: exactly once per node,
across restarts of the proxy too.

The core delivers commands at least once (again after a reconnect or a restart of either
side) and expects the node to run each command id once. An in-memory record
(:class:`~nexus_fast.node.policy.DedupCache`) keeps that only while the process lives: a
proxy restarted with results it never reported would run those commands again. This
journal keeps it across restarts. The order of writes is the whole point:

1. ``started``: before a command runs, a line naming it (node, id, attempt) is written and
   fsync'd. Commands arriving in one ControlMessage share one fsync.
2. ``finished``: when it ends, a line with its outcome; fsync'd before the result is sent.
3. On start-up the journal is read back into the in-memory cache: a command seen again is
   answered from its ``finished`` line and not run. One with a ``started`` line and no
   ``finished`` line was running when the proxy died: whether it took effect is unknown,
   so it is answered ``failed`` ("interrupted ...") and never run again in that attempt;
   the core retries it (a higher attempt number) where its policy says.

The file is ``<state-dir>/dedup.jsonl``, one JSON object per line; a torn last line (the
crash came mid-write) is ignored. It is rewritten with only what the cache still holds
when it grows past :data:`COMPACT_FACTOR` times the cache size. A lock file keeps a second
process off the same directory. The fsyncs run on the event loop: this is the reference
proxy, and an fsync per ControlMessage is its price of the guarantee.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path
from typing import IO, Final

from nexus_fast.node.policy import DedupCache

__all__ = ["INTERRUPTED", "JOURNAL_NAME", "DurableDedup", "StateDirLocked"]

JOURNAL_NAME: Final = "dedup.jsonl"
COMPACT_FACTOR: Final = 4
INTERRUPTED: Final = "interrupted: nexus-node restarted while it ran; outcome unknown"


class StateDirLocked(RuntimeError):
    """Another process holds the state directory."""


class DurableDedup:
    """The journal of one ``--state-dir``, feeding a :class:`DedupCache`."""

    def __init__(self, state_dir: str | os.PathLike[str], cache: DedupCache) -> None:
        self.dir = Path(state_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cache = cache
        self._lock_fp = open(self.dir / "lock", "a+")  # noqa: SIM115 (held until close)
        try:
            fcntl.flock(self._lock_fp, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._lock_fp.close()
            raise StateDirLocked(f"state dir {self.dir} is in use by another nexus-node") from None
        self.path = self.dir / JOURNAL_NAME
        self._lines = 0
        self._cut_short: dict[str, int] = {}
        self.syncs = 0
        self._running: dict[str, int] = {}  # started, not finished: kept by compaction
        self.interrupted = self._load()
        if self._lines > COMPACT_FACTOR * cache.capacity:
            self._compact()
            self._lines = len(cache)
        self._fp: IO[str] = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
        self._pending: list[str] = []
        # Their verdict is final: written down, so the next start does not count them again.
        for key, attempt in self._cut_short.items():
            node_id, _, command_id = key.partition("\x00")
            self.finished(node_id, command_id, attempt, False, b"", INTERRUPTED)
        self.sync()

    def _load(self) -> int:
        """Read the journal into the cache; returns how many commands were interrupted."""
        started: dict[str, int] = {}
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return 0
        if text and not text.endswith("\n"):
            # A torn last line (the crash came mid-write): cut it, so appends start clean.
            keep = text.rfind("\n") + 1
            os.truncate(self.path, len(text[:keep].encode("utf-8")))
            text = text[:keep]
        for line in text.splitlines():
            self._lines += 1
            try:
                entry = json.loads(line)
                key = DedupCache.key(entry["n"], entry["c"])
                attempt = int(entry["a"])
                if entry["s"] == "started":
                    started[key] = attempt
                else:
                    started.pop(key, None)
                    self.cache.put(
                        key, (bool(entry["ok"]), bytes.fromhex(entry["o"]), entry["e"], attempt)
                    )
            except (ValueError, KeyError, TypeError):
                continue  # a torn last line after a crash
        for key, attempt in started.items():
            self.cache.put(key, (False, b"", INTERRUPTED, attempt))
        self._cut_short = started
        return len(started)

    def _compact(self) -> None:
        """Rewrite the journal with the cache's entries and the running commands only
        (atomic rename, fsync'd)."""
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as out:
            for key, (ok, output, error, attempt) in self.cache.items():
                node_id, _, command_id = key.partition("\x00")
                out.write(_finished_line(node_id, command_id, attempt, ok, output, error))
            for key, attempt in self._running.items():
                node_id, _, command_id = key.partition("\x00")
                out.write(_started_line(node_id, command_id, attempt))
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.dir, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def started(self, node_id: str, command_id: str, attempt: int) -> None:
        """A command is about to run: durable at the next :meth:`sync`, which must come first."""
        self._running[DedupCache.key(node_id, command_id)] = attempt
        self._pending.append(_started_line(node_id, command_id, attempt))

    def finished(
        self, node_id: str, command_id: str, attempt: int, ok: bool, output: bytes, error: str
    ) -> None:
        """A command ended: durable at the next :meth:`sync`, before its result is sent."""
        key = DedupCache.key(node_id, command_id)
        self._running.pop(key, None)
        self.cache.put(key, (ok, output, error, attempt))  # compaction copies the cache
        self._pending.append(_finished_line(node_id, command_id, attempt, ok, output, error))

    @property
    def dirty(self) -> bool:
        """Lines wait for :meth:`sync`."""
        return bool(self._pending)

    def sync(self) -> None:
        """Write and fsync what is pending (one fsync for all of it)."""
        if not self._pending:
            return
        self._fp.write("".join(self._pending))
        self._lines += len(self._pending)
        self._pending.clear()
        self._fp.flush()
        os.fsync(self._fp.fileno())
        self.syncs += 1
        if self._lines > COMPACT_FACTOR * max(self.cache.capacity, 1):
            self._fp.close()
            self._compact()
            self._fp = open(self.path, "a", encoding="utf-8")  # noqa: SIM115
            self._lines = len(self.cache) + len(self._running)

    def close(self) -> None:
        """Sync, close the journal and release the directory."""
        self.sync()
        self._fp.close()
        self._lock_fp.close()


def _started_line(node_id: str, command_id: str, attempt: int) -> str:
    return json.dumps({"s": "started", "n": node_id, "c": command_id, "a": attempt}) + "\n"


def _finished_line(
    node_id: str, command_id: str, attempt: int, ok: bool, output: bytes, error: str
) -> str:
    return (
        json.dumps(
            {
                "s": "finished",
                "n": node_id,
                "c": command_id,
                "a": attempt,
                "ok": ok,
                "o": output.hex(),
                "e": error,
            }
        )
        + "\n"
    )
