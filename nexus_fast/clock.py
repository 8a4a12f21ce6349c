"""The wall clock in the unit every record and event carries."""

from __future__ import annotations

import time


def now_ms() -> int:
    """Milliseconds since the epoch (wall clock, as stored in records and events)."""
    return time.time_ns() // 1_000_000
