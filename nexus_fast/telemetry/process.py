"""Process and page-cache gauges, computed at scrape time (never on a hot path).

* ``nexus_memory_usage_bytes``: resident set size, from ``/proc/self/statm``.
* ``nexus_cpu_usage_percent``: CPU time (user + system, all threads) over a sliding window
  of the last :data:`CPU_WINDOW_S` seconds, in percent of one core. Samples are taken at
  each scrape and by the JSON metrics sampler (every few seconds), at most one a second.
* ``nexus_db_cache_hit_rate``: LMDB has no cache of its own: every read is a load from
  its memory map, answered from the OS page cache when the page is resident and from the
  disk (a major page fault) when it is not. The gauge is the share of the data file's used
  pages that are resident right now (``mincore(2)`` on a read-only mapping of ``data.mdb``):
  the chance that a read of a uniformly chosen page needs no disk I/O. Not a count of
  past reads. Above :data:`MINCORE_FULL_PAGES` used pages it is estimated from
  :data:`MINCORE_SAMPLES` evenly spaced windows, to stay cheap.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

from prometheus_client import REGISTRY
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = [
    "CPU_WINDOW_S",
    "PROCESS",
    "PageCacheResidency",
    "ProcessCollector",
    "cpu_percent",
    "page_cache_residency",
    "rss_bytes",
]

CPU_WINDOW_S: Final = 60.0
_CPU_SAMPLE_EVERY_S: Final = 1.0
MINCORE_FULL_PAGES: Final = 1 << 18  # 1 GiB of 4 KiB pages: checked page by page
MINCORE_SAMPLES: Final = 256  # windows of MINCORE_WINDOW pages beyond that
MINCORE_WINDOW: Final = 1024
_PAGE: Final = mmap.PAGESIZE
_STARTED: Final = time.monotonic()


def rss_bytes() -> int:
    """Resident set size of this process (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def _cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


class _CpuWindow:
    """(monotonic, cpu seconds) samples of the last CPU_WINDOW_S, one a second at most."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, float]] = deque()

    def sample(self) -> tuple[float, float]:
        now, cpu = time.monotonic(), _cpu_seconds()
        samples = self._samples
        if not samples or now - samples[-1][0] >= _CPU_SAMPLE_EVERY_S:
            samples.append((now, cpu))
        # Keep one sample at or beyond the window's start: the baseline.
        while len(samples) > 2 and samples[1][0] <= now - CPU_WINDOW_S:
            samples.popleft()
        return now, cpu

    def percent(self) -> float:
        now, cpu = self.sample()
        then, cpu_then = self._samples[0]
        if now - then < 0.5:  # nothing older yet: the process's average so far
            then, cpu_then = _STARTED, 0.0
        elapsed = now - then
        return 100.0 * (cpu - cpu_then) / elapsed if elapsed > 0 else 0.0


_CPU: Final = _CpuWindow()


def cpu_percent() -> float:
    """CPU use over the sliding window, percent of one core (see the module docstring)."""
    return _CPU.percent()


class PageCacheResidency:
    """Resident pages of a file's first ``used`` bytes, by ``mincore(2)``."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._mmap = libc.mmap
        self._mmap.restype = ctypes.c_void_p
        self._mmap.argtypes = [
            ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
            ctypes.c_long,
        ]  # fmt: skip
        self._munmap = libc.munmap
        self._munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self._mincore = libc.mincore
        self._mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]

    def measure(self, path: Path, used: int) -> tuple[int, int]:
        """(resident pages, pages checked) of ``path``'s first ``used`` bytes."""
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            length = min(used, os.fstat(fd).st_size)
            pages = length // _PAGE
            if pages == 0:
                return 0, 0
            address = self._mmap(None, pages * _PAGE, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
            if address in (None, ctypes.c_void_p(-1).value):
                raise OSError(ctypes.get_errno(), "mmap failed")
        finally:
            os.close(fd)
        try:
            if pages <= MINCORE_FULL_PAGES:
                windows = [(0, pages)]
            else:
                step = pages // MINCORE_SAMPLES
                windows = [(i * step, MINCORE_WINDOW) for i in range(MINCORE_SAMPLES)]
            resident = checked = 0
            for first, count in windows:
                vector = ctypes.create_string_buffer(count)
                if self._mincore(address + first * _PAGE, count * _PAGE, vector) != 0:
                    raise OSError(ctypes.get_errno(), "mincore failed")
                resident += sum(byte & 1 for byte in vector.raw)
                checked += count
            return resident, checked
        finally:
            self._munmap(address, pages * _PAGE)


_residency: PageCacheResidency | None = None


def page_cache_residency(path: Path, used: int) -> tuple[int, int]:
    """(resident pages, pages checked) of ``path``'s first ``used`` bytes; (0, 0) on error."""
    global _residency
    try:
        if _residency is None:
            _residency = PageCacheResidency()
        return _residency.measure(path, used)
    except (OSError, AttributeError):  # no such file yet, no mincore on this platform
        return 0, 0


class ProcessCollector(Collector):
    """The three gauges; ``data_file`` says which LMDB file (and its used bytes) to check."""

    def __init__(self) -> None:
        self.data_file: Callable[[], tuple[Path, int]] | None = None

    def cache_hit_rate(self) -> tuple[float, int, int]:
        """(share of used data-file pages resident, resident pages, pages checked)."""
        source = self.data_file
        if source is None:
            return 0.0, 0, 0
        try:
            path, used = source()
        except Exception:  # the store is closed: nothing to say
            return 0.0, 0, 0
        resident, checked = page_cache_residency(path, used)
        return (resident / checked if checked else 0.0), resident, checked

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "nexus_memory_usage_bytes", "Resident set size of the server process.", rss_bytes()
        )
        yield GaugeMetricFamily(
            "nexus_cpu_usage_percent",
            f"CPU time of the server process (user + system, all threads) over a sliding "
            f"window of the last {CPU_WINDOW_S:g} s, in percent of one core (100 = one core "
            f"busy).",
            cpu_percent(),
        )
        yield GaugeMetricFamily(
            "nexus_db_cache_hit_rate",
            "Share (0..1) of the LMDB data file's used pages resident in the OS page cache "
            "at scrape time (mincore): the chance a read of a page needs no disk I/O. LMDB "
            "reads through its memory map and has no cache of its own.",
            self.cache_hit_rate()[0],
        )


PROCESS: Final = ProcessCollector()
REGISTRY.register(PROCESS)
