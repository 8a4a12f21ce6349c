"""Command bookkeeping selector: the compiled twin unless NEXUS_NO_EXTENSIONS=1 (see STYLE.md).

The transition table, ack application and each transition's record write and event
(``nexus_fast._commands_py`` is the typed source of truth; ``core/commands.py`` and
``core/command_log.py`` use them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ._compat import NO_EXTENSIONS, REQUIRE_EXTENSIONS

__all__ = ("IMPLEMENTATION", "TRANSITIONS", "TransitionWriter", "apply_acks", "can_move")

if TYPE_CHECKING or NO_EXTENSIONS:
    from ._commands_py import TRANSITIONS, TransitionWriter, apply_acks, can_move

    IMPLEMENTATION = "py"
else:
    try:
        from ._commands_c import TRANSITIONS, TransitionWriter, apply_acks, can_move

        IMPLEMENTATION = "c"
    except ImportError:  # pragma: no cover - depends on the build
        if REQUIRE_EXTENSIONS:
            raise
        from ._commands_py import TRANSITIONS, TransitionWriter, apply_acks, can_move

        IMPLEMENTATION = "py"
