"""Byte sizes in configuration: ``"512KB"``, ``"64MB"``, ``"1GB"`` (binary units).

A leaf module, so both ``nexus_fast.config`` and the table parsers it calls (e.g.
``security.limits``) can use it without importing each other.
"""

from __future__ import annotations

import re
from typing import Final

__all__ = ["GB", "KB", "MB", "TB", "parse_size"]

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
