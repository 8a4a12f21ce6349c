"""CommandQueue selector: the compiled twin unless NEXUS_NO_EXTENSIONS=1 (see STYLE.md)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._compat import NO_EXTENSIONS, REQUIRE_EXTENSIONS

__all__ = ("IMPLEMENTATION", "CommandQueue", "DuplicateKey", "QueueFull")

if TYPE_CHECKING or NO_EXTENSIONS:
    from ._queue_py import CommandQueue, DuplicateKey, QueueFull

    IMPLEMENTATION = "py"
else:
    try:
        from ._queue_c import CommandQueue, DuplicateKey, QueueFull

        IMPLEMENTATION = "c"
    except ImportError:  # pragma: no cover - depends on the build
        if REQUIRE_EXTENSIONS:
            raise
        from ._queue_py import CommandQueue, DuplicateKey, QueueFull

        IMPLEMENTATION = "py"
