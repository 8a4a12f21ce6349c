"""The codec package: wire formats live here, and the core holds none of its own."""

from __future__ import annotations

import ast
from pathlib import Path

from nexus_fast.codec.json import NODE_STATUS_NAMES, node_to_dict
from nexus_fast.core.nodes import STATUS_NAMES
from nexus_fast.pb import fabric_pb2 as pb

PACKAGE = Path(__file__).resolve().parents[2] / "nexus_fast"


def imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_codec_does_not_import_the_core() -> None:
    for path in sorted((PACKAGE / "codec").glob("*.py")):
        core = {m for m in imported_modules(path) if m.startswith("nexus_fast.core")}
        assert not core, f"{path.name} imports {core}"


def test_core_encodes_no_wire_format_itself() -> None:
    wire_libraries = {"orjson", "json", "base64"}
    for path in sorted((PACKAGE / "core").glob("*.py")):
        found = imported_modules(path) & wire_libraries
        assert not found, f"core/{path.name} imports {found}"


def test_node_status_names_match_the_core() -> None:
    assert NODE_STATUS_NAMES == STATUS_NAMES
    node = pb.Node(id="n1", status=pb.NODE_STATUS_DRAINING)
    assert node_to_dict(node)["status"] == "draining"
    assert node_to_dict(pb.Node(id="n2"))["status"] == "unknown"
