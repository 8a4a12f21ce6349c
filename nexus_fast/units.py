"""Sizes and durations in configuration: ``"64MB"`` (binary units), ``"250ms"``, ``"5m"``.

A leaf module, so both ``nexus_fast.config`` and the table parsers it calls (e.g.
``security.limits``) can use it without importing each other.
"""

from __future__ import annotations

import math
import re
from typing import Final

__all__ = [
    "GB",
    "KB",
    "MB",
    "TB",
    "format_duration",
    "format_size",
    "parse_duration",
    "parse_size",
]

KB: Final = 1024
MB: Final = 1024 * KB
GB: Final = 1024 * MB
TB: Final = 1024 * GB

_SIZE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
_SIZE_UNITS: Final = {
    "": 1, "b": 1,
    "k": KB, "kb": KB, "kib": KB,
    "m": MB, "mb": MB, "mib": MB,
    "g": GB, "gb": GB, "gib": GB,
    "t": TB, "tb": TB, "tib": TB,
}  # fmt: skip


def parse_size(value: object) -> int:
    """Parse ``"512KB"``, ``"64MB"``, ``"1GB"``, ``"1024"`` (bytes) or an int of bytes.

    Units are binary (KB = KiB = 1024); ``B``, ``KiB``, ``MiB``, ``GiB``, ``TiB`` are accepted,
    case-insensitively. Returns int bytes. Raises ValueError for malformed or negative input
    and TypeError for values of the wrong type (including bool).
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"expected a size, got {type(value).__name__}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size {value!r} is negative")
        return value
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"malformed size {value!r}")
    unit = _SIZE_UNITS.get(match.group(2).lower())
    if unit is None:
        raise ValueError(f"unknown size unit in {value!r}")
    return int(float(match.group(1)) * unit)


_DURATION_RE: Final = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS: Final = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(value: object) -> float:
    """Parse ``"250ms"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"1d"`` or a number of seconds.

    Returns float seconds. Raises ValueError for malformed, negative or non-finite input and
    TypeError for values of the wrong type (including bool).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(f"expected a duration, got {type(value).__name__}")
    if isinstance(value, str):
        match = _DURATION_RE.match(value)
        if match is None:
            raise ValueError(f"malformed duration {value!r}")
        seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    else:
        seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"duration {value!r} is not finite")
    if seconds < 0:
        raise ValueError(f"duration {value!r} is negative")
    return seconds


def format_duration(seconds: float) -> str:
    """Render seconds compactly for humans (``30s``, ``250ms``, ``6h``)."""
    for unit, scale in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= scale and seconds % scale == 0:
            return f"{int(seconds // scale)}{unit}"
    if seconds == 0:
        return "0s"
    return f"{seconds * 1000:g}ms" if seconds < 1 else f"{seconds:g}s"


def format_size(size: int) -> str:
    """Render bytes compactly for humans (``64MB``, ``1GB``, ``1500`` -> ``1500B``)."""
    for unit, scale in (("TB", TB), ("GB", GB), ("MB", MB), ("KB", KB)):
        if size >= scale and size % scale == 0:
            return f"{size // scale}{unit}"
    return f"{size}B"
