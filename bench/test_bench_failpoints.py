"""Failpoints off cost nothing measurable: the site guard, and the core with it compiled in.

Two groups, each with its baseline in the same run:

* ``failpoint-site``: 100,000 passes of a bare loop vs the same loop through the guard
  every site has (``if failpoints.ACTIVE: failpoints.hit(...)``) with nothing set, and
  with a failpoint set on another site (``ACTIVE`` true: one dict miss per pass).
* ``failpoint-core``: ``bench/core_commands.py`` (submit, dispatch, ack, result through
  the real core and a real LmdbStore, 10,000 commands), with failpoints off vs with one
  set that never fires on that path's sites (``store.commit=crash@1000000000``: every
  commit pays the look-up and the hit counter). The runs interleave, and the best loop
  time per command of each mode is compared (``extra_info``: ``ratio``).

    NEXUS_REQUIRE_EXTENSIONS=1 .venv/bin/python -m pytest bench/test_bench_failpoints.py \\
        --benchmark-only --benchmark-group-by=group -s
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from nexus_fast import failpoints

PASSES = 100_000
CORE_COMMANDS = 5_000
ROUNDS = 3  # pairs of runs; the best of each mode is compared


@pytest.fixture(autouse=True)
def cleared() -> Iterator[None]:
    failpoints.configure("")
    yield
    failpoints.configure("")


def bare() -> None:
    for _ in range(PASSES):
        pass


def guarded() -> None:
    for _ in range(PASSES):
        if failpoints.ACTIVE:
            failpoints.hit("store.after_commit")


@pytest.mark.benchmark(group="failpoint-site")
@pytest.mark.parametrize("mode", ["bare-loop", "guard-off", "guard-other-site-set"])
def test_site_guard(benchmark: Any, mode: str) -> None:
    if mode == "guard-other-site-set":
        failpoints.configure("store.backup=pause")  # never reached here
    benchmark(bare if mode == "bare-loop" else guarded)
    assert failpoints.snapshot() == ([] if mode != "guard-other-site-set" else
                                     [{"name": "store.backup", "spec": "store.backup=pause",
                                       "hits": 0, "fired": 0}])  # fmt: skip


def _core_main() -> Any:
    path = Path(__file__).with_name("core_commands.py")
    spec = importlib.util.spec_from_file_location("bench_core_commands", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.benchmark(group="failpoint-core")
def test_core_commands_off_vs_set(benchmark: Any) -> None:
    """Interleaved runs (off, set, off, set, ...): the ratio of the best loop time per
    command of each, in ``extra_info`` and printed (``-s``)."""
    main = _core_main()
    best = {"off": float("inf"), "set": float("inf")}

    def pair() -> None:
        for mode in ("off", "set"):
            failpoints.configure("store.commit=crash@1000000000" if mode == "set" else "")
            seconds = uvloop.run(main(total=CORE_COMMANDS, nodes=100, quiet=True))
            best[mode] = min(best[mode], seconds)
            if mode == "set":
                (point,) = failpoints.snapshot()
                assert point["hits"] and not point["fired"]  # reached, never fired

    benchmark.pedantic(pair, rounds=ROUNDS, iterations=1)
    ratio = best["set"] / best["off"]
    benchmark.extra_info.update(
        off_us_per_command=round(best["off"] * 1e6, 2),
        set_us_per_command=round(best["set"] * 1e6, 2),
        ratio=round(ratio, 3),
    )
    print(
        f"core loop time per command: off {best['off'] * 1e6:.2f} us, set-never-firing "
        f"{best['set'] * 1e6:.2f} us, ratio {ratio:.3f}"
    )
    assert 0 < best["off"] < 0.01 and 0 < best["set"] < 0.01
