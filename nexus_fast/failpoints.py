"""Failpoints: named places where an operator or a test makes the server fail on purpose.

Each site in the code is guarded by one module-level bool, so a server with no failpoint
set pays one global load and a branch per site (``bench/test_bench_failpoints.py``)::

    if failpoints.ACTIVE:
        failpoints.hit("store.after_commit")          # a thread (the LMDB writer)
    if failpoints.ACTIVE:
        await failpoints.hit_async("stream.send")    # the event loop

A spec sets them, ``;``-separated, from ``NEXUS_FAILPOINTS`` at start-up or the admin-only
``ControlService.SetFailpoints`` RPC (which replaces the whole set)::

    store.after_commit=crash@5%;stream.send=delay(50ms);store.commit=error*3

Actions: ``crash`` (``os._exit(CRASH_EXIT_CODE)`` after one line on stderr: no flush, no
cleanup, like ``kill -9`` at that line), ``error`` (raise the error the site would see
from a real fault: an ``lmdb.Error`` in the writer; ``error(enospc)`` an ENOSPC one, as a
full disk gives), ``delay(D)`` (``D`` a duration: ``50ms``, ``2s``; a thread sleeps, the
loop awaits ``asyncio.sleep``), ``pause`` (block until the failpoint is cleared or
replaced: a thread site blocks its thread, a loop site suspends only its task).

Triggers: none = every hit; ``@P%`` = each hit with probability P; ``@N`` = the Nth hit
only (once); ``*N`` = the first N hits. Hit and fire counts are listed by
``ListFailpoints`` and ``/health/detailed`` (``failpoints``).

A leaf module: any layer may import it; it imports nothing of ours but ``units``.
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import os
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

from nexus_fast.logs import get_logger
from nexus_fast.units import format_duration, parse_duration

__all__ = [
    "ACTIVE",
    "CRASH_EXIT_CODE",
    "SITES",
    "Failpoint",
    "configure",
    "describe",
    "hit",
    "hit_async",
    "parse",
    "snapshot",
]

log = get_logger("failpoints")

CRASH_EXIT_CODE: Final = 86
"""Exit status of a ``crash`` failpoint (distinct from 0/1/2 and from signals)."""

MAX_PAUSE_POLL_S: Final = 0.01  # how often a paused loop task looks whether it was released


def _lmdb_error(name: str, arg: str) -> BaseException:
    import lmdb  # only when an error fires: the module stays a leaf

    if arg == "enospc":
        return lmdb.DiskError(f"failpoint {name}: {os.strerror(errno.ENOSPC)}")
    return lmdb.Error(f"failpoint {name}: injected write error")


def _os_error(name: str, arg: str) -> BaseException:
    code = errno.ENOSPC if arg == "enospc" else errno.EIO
    return OSError(code, f"failpoint {name}: {os.strerror(code)}")


def _stream_error(name: str, arg: str) -> BaseException:
    # The stream ends UNAVAILABLE as when its peer vanished: the node reconnects and gets
    # its in-flight commands again.
    from nexus_fast.errors import Unavailable

    return Unavailable(f"failpoint {name}: stream reset")


@dataclass(frozen=True)
class Site:
    """One place in the code that checks a failpoint."""

    description: str
    thread: bool  # True: runs off the loop (hit); False: on the loop (hit_async)
    # The error a real fault raises there; None: no real fault raises one at that line
    # (an injected one would leave the state half-changed, which no real run can).
    error: Callable[[str, str], BaseException] | None


SITES: Final[dict[str, Site]] = {
    "store.before_commit": Site(
        "writer thread, a batch taken, before its write transaction begins", True, _lmdb_error
    ),
    "store.commit": Site(
        "writer thread, inside the write transaction just before commit+fsync "
        "(delay = a slow fsync; error fails the batch)",
        True,
        _lmdb_error,
    ),
    "store.after_commit": Site(
        "writer thread, the batch durable, before its results reach the loop "
        "(crash: durable but never answered)",
        True,
        _lmdb_error,
    ),
    "store.writer_stall": Site(
        "writer thread, before it takes the next batch (pause/delay = a stalled writer)",
        True,
        _lmdb_error,
    ),
    "store.map_grow": Site("writer thread, before the map is grown", True, _lmdb_error),
    "store.backup": Site(
        "backup thread, holding the resize lock, before the copy", True, _os_error
    ),
    "commands.before_dispatch": Site(
        "event loop, a submit durable, before its commands are queued for nodes", False, None
    ),
    "commands.before_reply": Site(
        "event loop, a submit durable and queued, before the answer is sent", False, None
    ),
    "stream.send": Site(
        "event loop, before a message is written to a node's Connect stream", False, _stream_error
    ),
}
"""Every failpoint name -> where it is. docs/reliability.md lists the same."""

_ACTIONS: Final = ("crash", "error", "delay", "pause")
_ITEM_RE: Final = re.compile(
    r"^(?P<name>[a-z_.]+)=(?P<action>[a-z]+)(?:\((?P<arg>[^)]*)\))?"
    r"(?:@(?P<pct>\d+(?:\.\d*)?)%|@(?P<nth>\d+)|\*(?P<times>\d+))?$"
)


@dataclass
class Failpoint:
    """One set failpoint: what it does and when. Counters are shared across threads."""

    name: str
    action: str
    arg: str = ""  # the error's kind ("enospc") for error
    delay_s: float = 0.0
    probability: float = 1.0  # @P%
    nth: int = 0  # @N: the Nth hit only
    times: int = 0  # *N: the first N hits
    released: threading.Event = field(default_factory=threading.Event)
    _hits: itertools.count[int] = field(default_factory=itertools.count)
    hits: int = 0
    fired: int = 0

    def spec(self) -> str:
        """The text that sets this failpoint again."""
        action = self.action
        if action == "delay":
            action += f"({format_duration(self.delay_s)})"
        elif self.arg:
            action += f"({self.arg})"
        if self.nth:
            action += f"@{self.nth}"
        elif self.times:
            action += f"*{self.times}"
        elif self.probability < 1.0:
            action += f"@{self.probability * 100:g}%"
        return f"{self.name}={action}"

    def should_fire(self) -> bool:
        # next() on itertools.count is atomic under the GIL: threads and the loop share it.
        n = next(self._hits) + 1
        self.hits = n
        if self.nth:
            fire = n == self.nth
        elif self.times:
            fire = n <= self.times
        else:
            fire = self.probability >= 1.0 or random.random() < self.probability
        if fire:
            self.fired += 1
        return fire


ACTIVE: bool = False
"""True while any failpoint is set: the one thing a site reads when none is."""

_points: dict[str, Failpoint] = {}
_lock = threading.Lock()  # configure() from the loop vs another configure()


def parse(spec: str) -> dict[str, Failpoint]:
    """Parse a spec (see the module docstring); ValueError names the bad item."""
    points: dict[str, Failpoint] = {}
    for raw in spec.split(";"):
        item = raw.strip()
        if not item:
            continue
        m = _ITEM_RE.match(item)
        if m is None:
            raise ValueError(
                f"failpoint {item!r}: expected name=action[(arg)][@P%|@N|*N], e.g. "
                "store.after_commit=crash@5%"
            )
        name, action, arg = m["name"], m["action"], m["arg"]
        if name not in SITES:
            raise ValueError(f"failpoint {item!r}: unknown name {name!r} (known: {_known()})")
        if action not in _ACTIONS:
            raise ValueError(
                f"failpoint {item!r}: unknown action {action!r} (known: {', '.join(_ACTIONS)})"
            )
        if name in points:
            raise ValueError(f"failpoint {name!r} is set twice")
        point = Failpoint(name, action)
        if action == "delay":
            if not arg:
                raise ValueError(f"failpoint {item!r}: delay needs a duration, e.g. delay(50ms)")
            try:
                point.delay_s = parse_duration(arg)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"failpoint {item!r}: {exc}") from None
        elif action == "error":
            if SITES[name].error is None:
                raise ValueError(f"failpoint {item!r}: {name} has no error to raise")
            if arg not in (None, "", "enospc"):
                raise ValueError(f"failpoint {item!r}: error takes no argument or (enospc)")
            point.arg = arg or ""
        elif arg is not None:
            raise ValueError(f"failpoint {item!r}: {action} takes no argument")
        if m["pct"] is not None:
            pct = float(m["pct"])
            if not 0 < pct <= 100:
                raise ValueError(f"failpoint {item!r}: probability must be in (0, 100]%")
            point.probability = pct / 100.0
        elif m["nth"] is not None:
            point.nth = int(m["nth"])
            if point.nth < 1:
                raise ValueError(f"failpoint {item!r}: @N counts hits from 1")
        elif m["times"] is not None:
            point.times = int(m["times"])
            if point.times < 1:
                raise ValueError(f"failpoint {item!r}: *N needs N >= 1")
        points[name] = point
    return points


def _known() -> str:
    return ", ".join(SITES)


def configure(spec: str) -> list[Failpoint]:
    """Replace every failpoint with those of ``spec`` ("" clears them all).

    Paused hits of the old set are released. Raises ValueError (nothing changes) for a
    bad spec. Returns the new set.
    """
    global ACTIVE, _points
    points = parse(spec)
    with _lock:
        old, _points = _points, points
        ACTIVE = bool(points)
    for point in old.values():
        point.released.set()
    if points:
        log.warning("failpoints set: %s", describe())
    elif old:
        log.warning("failpoints cleared")
    return list(points.values())


def describe() -> str:
    """The current set as a spec ("" when none)."""
    return ";".join(p.spec() for p in _points.values())


def snapshot() -> list[dict[str, object]]:
    """The current set with counters, for ``/health/detailed`` and ``ListFailpoints``."""
    return [
        {"name": p.name, "spec": p.spec(), "hits": p.hits, "fired": p.fired}
        for p in _points.values()
    ]


def _crash(name: str) -> None:
    # One line, unbuffered, then gone: no atexit, no flush, no LMDB close.
    os.write(2, f"nexus-fast: failpoint {name}: crash (exit {CRASH_EXIT_CODE})\n".encode())
    os._exit(CRASH_EXIT_CODE)


def _error(name: str, arg: str) -> BaseException:
    make = SITES[name].error
    assert make is not None  # parse() refuses error where there is none
    return make(name, arg)


def hit(name: str) -> None:
    """A thread site reached ``name``: fire its failpoint if set and triggered."""
    point = _points.get(name)
    if point is None or not point.should_fire():
        return
    action = point.action
    if action == "crash":
        _crash(name)
    elif action == "error":
        raise _error(name, point.arg)
    elif action == "delay":
        time.sleep(point.delay_s)
    else:  # pause: this thread only, until the failpoint is cleared or replaced
        point.released.wait()


async def hit_async(name: str) -> None:
    """A loop site reached ``name``: like :func:`hit`, never blocking the loop."""
    point = _points.get(name)
    if point is None or not point.should_fire():
        return
    action = point.action
    if action == "crash":
        _crash(name)
    elif action == "error":
        raise _error(name, point.arg)
    elif action == "delay":
        await asyncio.sleep(point.delay_s)
    else:
        while not point.released.is_set():
            await asyncio.sleep(MAX_PAUSE_POLL_S)
