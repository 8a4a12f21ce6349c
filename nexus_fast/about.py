"""Versions of nexus-fast and of the libraries it runs on (``--version``, metrics)."""

from __future__ import annotations

from importlib import metadata

import nexus_fast

_LIBRARIES = ("grpcio", "protobuf", "picows", "lmdb", "uvloop", "aiohttp", "numpy", "orjson")


def versions() -> dict[str, str]:
    """``{"nexus_fast": ..., "grpcio": ..., ...}``; "missing" for absent libraries."""
    found = {"nexus_fast": nexus_fast.__version__}
    for name in _LIBRARIES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def version_text() -> str:
    """What ``nexus-fast --version`` prints: versions, then the hot-path implementations."""
    lines = [f"nexus-fast {nexus_fast.__version__}"]
    lines += [f"  {name} {version}" for name, version in versions().items() if name != "nexus_fast"]
    impl = " ".join(f"{path}={kind}" for path, kind in nexus_fast.implementation().items())
    lines.append(f"  hot paths: {impl}")
    return "\n".join(lines)
