"""Durations and byte sizes: parsing and rendering, shared by config, node specs and CLIs.

Sizes are binary (KB = KiB = Ki = 1024); durations are float seconds.
"""

from __future__ import annotations

import math
import re
from typing import Final

__all__ = [
    "GB",
    "KB",
    "MB",
    "PB",
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
PB: Final = 1024 * TB

_DURATION_RE: Final = re.compile(r"^\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+))\s*(ms|s|m|h|d)?\s*$")
_DURATION_UNITS: Final = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

_SIZE_RE: Final = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)\s*$", re.IGNORECASE)
# Node specs and ``nexusctl`` also take scientific notation (``1.5e3MB``); config files do not.
_SIZE_EXP_RE: Final = re.compile(
    r"^\s*((?:\d+(?:\.\d*)?|\.\d+)(?:e[+-]?\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE
)
_SIZE_UNITS: Final = {
    "": 1, "b": 1,
    "k": KB, "kb": KB, "ki": KB, "kib": KB,
    "m": MB, "mb": MB, "mi": MB, "mib": MB,
    "g": GB, "gb": GB, "gi": GB, "gib": GB,
    "t": TB, "tb": TB, "ti": TB, "tib": TB,
    "p": PB, "pb": PB, "pi": PB, "pib": PB,
}  # fmt: skip


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


def parse_size(value: object, *, exponent: bool = False) -> int:
    """Parse ``"512KB"``, ``"64MB"``, ``"1GB"``, ``"1024"`` (bytes) or an int of bytes.

    Units are binary (KB = KiB = Ki = 1024) up to ``PB``, case-insensitively; the trailing
    ``B`` is optional. ``exponent=True`` also accepts scientific notation (``"1.5e3MB"``),
    which config files refuse. Returns int bytes (fractions truncated). Raises ValueError
    for malformed, negative or non-finite input and TypeError for values of the wrong type
    (including bool and float).
    """
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise TypeError(f"expected a size, got {type(value).__name__}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"size {value!r} is negative")
        return value
    match = (_SIZE_EXP_RE if exponent else _SIZE_RE).match(value)
    if match is None:
        raise ValueError(f"malformed size {value!r}")
    unit = _SIZE_UNITS.get(match.group(2).lower())
    if unit is None:
        raise ValueError(f"unknown size unit in {value!r}")
    size = float(match.group(1)) * unit
    if not math.isfinite(size):
        # A 400-digit number is a float infinity; int() of it would raise OverflowError.
        raise ValueError(f"size {value!r} is not finite")
    return int(size)


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
