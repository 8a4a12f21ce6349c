"""EventRing selector: the compiled twin unless NEXUS_NO_EXTENSIONS=1 (see STYLE.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._compat import NO_EXTENSIONS, REQUIRE_EXTENSIONS

__all__ = ("IMPLEMENTATION", "EventRing", "RingIndexTooOld")

if TYPE_CHECKING or NO_EXTENSIONS:
    from ._ring_py import EventRing, RingIndexTooOld

    IMPLEMENTATION = "py"
else:
    try:
        from ._ring_c import EventRing, RingIndexTooOld

        IMPLEMENTATION = "c"
    except ImportError:  # pragma: no cover - depends on the build
        if REQUIRE_EXTENSIONS:
            raise
        from ._ring_py import EventRing, RingIndexTooOld

        IMPLEMENTATION = "py"
