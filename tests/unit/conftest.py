"""Fixtures for the socket-free unit tests of the core services (see ``fabric.py``)."""

from __future__ import annotations

import pytest

from nexus_fast.core import agents as agents_mod
from nexus_fast.core import commands as commands_mod


@pytest.fixture
def fast_ticks(monkeypatch: pytest.MonkeyPatch) -> None:
    """The services' tickers run every 10 ms, so deadlines of 0.1-0.2 s are exact enough.

    Modules that drive ``CommandService`` / ``AgentService`` deadlines use it for every test
    with ``pytestmark = pytest.mark.usefixtures("fast_ticks")``.
    """
    monkeypatch.setattr(commands_mod, "_TICK", 0.01)
    monkeypatch.setattr(agents_mod, "_TICK", 0.01)
