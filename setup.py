"""Build steps that pyproject.toml cannot express.

1. Protobuf/gRPC code: every ``proto/nexus_fast/pb/*.proto`` is compiled with the
   grpc_tools bundled protoc into the SOURCE tree (``nexus_fast/pb/*_pb2*.py[i]``), both for
   wheel builds (``build_py``) and for editable installs (``build_py`` in editable mode, and
   the legacy ``develop`` command). Generated files are gitignored, never edited.
2. Cython hot paths: ``_ext/ring.pyx`` -> ``nexus_fast._ring_c``, ``_ext/queue.pyx`` ->
   ``nexus_fast._queue_c``, ``_ext/scoring.pyx`` -> ``nexus_fast._scoring_c``, ``_ext/eventlog.pyx`` ->
   ``nexus_fast._eventlog_c``, ``_ext/commands.pyx`` -> ``nexus_fast._commands_c``. A failing
   compile fails the build. ``NEXUS_NO_EXTENSIONS=1`` at build time asks for the
   pure-Python build by name (no extensions at all).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py as _build_py
from setuptools.command.develop import develop as _develop

ROOT = Path(__file__).resolve().parent
PROTO_ROOT = ROOT / "proto"
PB_PACKAGE = ROOT / "nexus_fast" / "pb"

NO_EXTENSIONS = os.environ.get("NEXUS_NO_EXTENSIONS", "").strip().lower() in {
    "1",
    "true",
    "yes",
    "on",
}

HOT_PATHS = {
    "nexus_fast._ring_c": "_ext/ring.pyx",
    "nexus_fast._queue_c": "_ext/queue.pyx",
    "nexus_fast._scoring_c": "_ext/scoring.pyx",
    "nexus_fast._eventlog_c": "_ext/eventlog.pyx",
    "nexus_fast._commands_c": "_ext/commands.pyx",
}


def generate_protos() -> None:
    """Run grpc_tools.protoc over proto/nexus_fast/pb/*.proto into the source tree."""
    protos = sorted((PROTO_ROOT / "nexus_fast" / "pb").glob("*.proto"))
    PB_PACKAGE.mkdir(parents=True, exist_ok=True)
    (PB_PACKAGE / "__init__.py").touch(exist_ok=True)
    if not protos:
        return
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={ROOT}",
        f"--grpc_python_out={ROOT}",
        f"--pyi_out={ROOT}",
        *(str(p) for p in protos),
    ]
    print("generating protobuf code:", " ".join(p.name for p in protos), file=sys.stderr)
    if protoc.main(args) != 0:
        raise SystemExit(f"grpc_tools.protoc failed on {[str(p) for p in protos]}")


class build_py(_build_py):
    """Generate the protobuf modules before collecting (or, editable, linking) sources."""

    def run(self) -> None:
        generate_protos()
        super().run()


class develop(_develop):
    """Legacy ``setup.py develop`` path of an editable install."""

    def run(self) -> None:
        generate_protos()
        super().run()


def extensions() -> list[Extension]:
    if NO_EXTENSIONS:
        print("NEXUS_NO_EXTENSIONS=1: building the pure-Python twins only", file=sys.stderr)
        return []
    from Cython.Build import cythonize

    exts = [Extension(name, [src], extra_compile_args=["-O2"]) for name, src in HOT_PATHS.items()]
    return cythonize(exts, compiler_directives={"language_level": "3"})


setup(ext_modules=extensions(), cmdclass={"build_py": build_py, "develop": develop})
