"""The hot-path switch: compiled twins present when required, and the env var obeyed."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import nexus_fast
from nexus_fast._compat import NO_EXTENSIONS, REQUIRE_EXTENSIONS

COMPILED = [f"nexus_fast._{name}_c" for name in nexus_fast.HOT_PATHS]


def _run(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {
        k: v
        for k, v in os.environ.items()
        if k not in {"NEXUS_NO_EXTENSIONS", "NEXUS_REQUIRE_EXTENSIONS"}
    }
    return subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_implementation_obeys_this_process_switch() -> None:
    """Whichever way CI runs the suite, the twins in use are the ones asked for."""
    impl = nexus_fast.implementation()
    if NO_EXTENSIONS:
        assert set(impl.values()) == {"py"}
    elif REQUIRE_EXTENSIONS:
        assert set(impl.values()) == {"c"}
        for module in COMPILED:  # the guard: compiled modules present when required
            importlib.import_module(module)
    else:
        assert set(impl.values()) <= {"c", "py"}


def test_implementation_covers_every_hot_path() -> None:
    impl = nexus_fast.implementation()
    assert list(impl) == list(nexus_fast.HOT_PATHS)
    assert set(impl.values()) <= {"c", "py"}


def test_no_extensions_env_selects_pure_twins() -> None:
    code = (
        "import json, nexus_fast, nexus_fast.ring as r, nexus_fast.queue as q;"
        "print(json.dumps([nexus_fast.implementation(),"
        " r.EventRing.__module__, q.CommandQueue.__module__]))"
    )
    proc = _run(code, NEXUS_NO_EXTENSIONS="1", NEXUS_REQUIRE_EXTENSIONS="1")
    assert proc.returncode == 0, proc.stderr
    impl, ring_mod, queue_mod = json.loads(proc.stdout)
    assert impl and set(impl.values()) == {"py"}
    assert (ring_mod, queue_mod) == ("nexus_fast._ring_py", "nexus_fast._queue_py")


def test_require_extensions_turns_missing_twin_into_error() -> None:
    # A None entry in sys.modules makes `import nexus_fast._ring_c` raise ImportError.
    hide = "import sys; sys.modules['nexus_fast._ring_c'] = None;"
    proc = _run(hide + "import nexus_fast.ring", NEXUS_REQUIRE_EXTENSIONS="1")
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr or "ModuleNotFoundError" in proc.stderr
    # without the switch the selector falls back to the pure twin
    proc = _run(hide + "import nexus_fast.ring as r; print(r.IMPLEMENTATION)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "py"
