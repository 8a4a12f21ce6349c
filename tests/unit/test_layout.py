"""The layout keeps its shape: no import cycles, lower layers importing nothing above them,
no oversized files, integration tests marked.

These read the source tree (``ast``, line counts, pytest's own collection); none imports the
modules it checks, so a cycle is reported as a cycle, not as an ImportError.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Final

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "nexus_fast"
MAX_LINES = 800
# grpc_tools.protoc output (built from proto/, never edited by hand) may be as long as it likes.
GENERATED = re.compile(r"_pb2(_grpc)?\.pyi?$")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def package_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    # `if TYPE_CHECKING:` and `if typing.TYPE_CHECKING:`
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_imports(node: ast.AST) -> Iterator[ast.Import | ast.ImportFrom]:
    """Every import statement that can run, function-level ones included."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            # Only the else branch runs.
            for stmt in child.orelse:
                yield from _runtime_imports(ast.Module(body=[stmt], type_ignores=[]))
            continue
        if isinstance(child, ast.Import | ast.ImportFrom):
            yield child
        yield from _runtime_imports(child)


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The deepest module of ours that importing ``name`` executes, or None if not ours."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def _from_base(stmt: ast.ImportFrom, package: str) -> str:
    """The absolute module a ``from ... import`` statement in ``package`` imports from."""
    if not stmt.level:
        return stmt.module or ""
    base_parts = package.split(".")
    base_parts = base_parts[: len(base_parts) - (stmt.level - 1)]
    return ".".join([*base_parts, stmt.module] if stmt.module else base_parts)


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the modules of ours it imports (parent packages are not counted as edges)."""
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        package = name if is_package else name.rpartition(".")[0]
        edges: set[str] = set()
        for stmt in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(stmt, ast.Import):
                targets = [alias.name for alias in stmt.names]
            else:
                base = _from_base(stmt, package)
                # `from pkg import sub` imports the submodule when there is one, else a name of pkg.
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in stmt.names
                ]
            for target in targets:
                resolved = _resolve(target, modules)
                if resolved is not None and resolved != name:
                    edges.add(resolved)
        graph[name] = edges
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm (iterative): the components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
            if low[node] == index[node]:
                component: list[str] = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def a_cycle(graph: dict[str, set[str]], component: list[str]) -> list[str]:
    """One concrete cycle inside a strongly connected component, as a -> b -> ... -> a."""
    members = set(component)
    start = component[0]
    # Breadth-first from start back to start, staying inside the component.
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [start, *reversed(path[:-1]), start]
                if child not in previous:
                    previous[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"{component} is not strongly connected")


def test_no_import_cycles() -> None:
    graph = import_graph(package_modules())
    cycles = [" -> ".join(a_cycle(graph, c)) for c in strongly_connected(graph)]
    assert not cycles, "import cycles in nexus_fast:\n  " + "\n  ".join(cycles)


def test_the_cycle_finder_finds_cycles() -> None:
    # Guards the guard: a graph with a known cycle and a known acyclic part.
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert strongly_connected(graph) == [["a", "b", "c"]]
    assert a_cycle(graph, ["a", "b", "c"]) == ["a", "b", "c", "a"]


def test_relative_and_from_imports_are_edges() -> None:
    graph = import_graph(package_modules())
    # Spot checks of the three import forms on modules that are stable parts of the layout.
    assert "nexus_fast._compat" in graph["nexus_fast.ring"]  # `from ._compat import ...`
    assert "nexus_fast._scoring_py" in graph["nexus_fast.scoring"]
    assert all(not target.startswith("nexus_fast.pb.") for target in graph["nexus_fast._compat"])


# The README's layout: arrows point down (security -> api -> core -> store/codec). The lower
# layers hold no wire formats, sockets or security policy, so they import nothing above them.
LOWER_LAYERS: Final = ("nexus_fast.core", "nexus_fast.store", "nexus_fast.codec")
UPPER_LAYERS: Final = ("nexus_fast.security", "nexus_fast.api", "nexus_fast.server")


def _in_packages(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def imported_names(source: str, module: str, is_package: bool = False) -> set[str]:
    """Every absolute name ``module`` imports, ``TYPE_CHECKING`` and function-level ones too.

    ``from a import b`` gives both ``a`` and ``a.b`` (``b`` may be a submodule). Type-only
    imports count: a lower layer naming an upper layer's types depends on it all the same.
    """
    package = module if is_package else module.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _from_base(node, package)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def layering_violations(modules: dict[str, Path]) -> list[str]:
    """``"lower -> upper"`` for every import of an upper layer by a lower one."""
    found = []
    for name, path in modules.items():
        if not _in_packages(name, LOWER_LAYERS):
            continue
        imported = imported_names(path.read_text(), name, path.name == "__init__.py")
        found.extend(
            f"{name} -> {target}"
            for target in sorted(imported)
            if _in_packages(target, UPPER_LAYERS)
        )
    return found


def test_lower_layers_import_nothing_above_them() -> None:
    violations = layering_violations(package_modules())
    assert not violations, (
        "core/store/codec import security/api/server (arrows must point down):\n  "
        + "\n  ".join(violations)
    )


def test_the_layering_check_sees_every_import_form() -> None:
    # Guards the guard: relative, from-, plain, type-only and function-level imports.
    source = (
        "from typing import TYPE_CHECKING\n"
        "from ..security import auditing\n"
        "from nexus_fast import server\n"
        "import nexus_fast.api.grpc_api\n"
        "if TYPE_CHECKING:\n"
        "    from nexus_fast.security.principal import Principal\n"
        "def f() -> None:\n"
        "    from nexus_fast.api import ws_events\n"
        "from nexus_fast.serverless import x\n"  # a name that only starts like one
    )
    names = imported_names(source, "nexus_fast.core.example")
    upper = sorted(n for n in names if _in_packages(n, UPPER_LAYERS))
    assert upper == [
        "nexus_fast.api",
        "nexus_fast.api.grpc_api",
        "nexus_fast.api.ws_events",
        "nexus_fast.security",
        "nexus_fast.security.auditing",
        "nexus_fast.security.principal",
        "nexus_fast.security.principal.Principal",
        "nexus_fast.server",
    ]


def test_no_file_over_800_lines() -> None:
    too_long = []
    for path in sorted(PACKAGE.rglob("*")):
        if not path.is_file() or path.suffix not in {".py", ".pyi", ".html"}:
            continue
        if GENERATED.search(path.name):
            continue
        lines = len(path.read_text(errors="replace").splitlines())
        if lines > MAX_LINES:
            too_long.append(f"{path.relative_to(REPO)}: {lines} lines")
    assert not too_long, f"files over {MAX_LINES} lines (split them):\n  " + "\n  ".join(too_long)


def test_every_integration_test_is_marked_integration() -> None:
    # Collection only: starts nothing. `-m "not integration"` must leave no test under
    # tests/integration, and there must be some to deselect.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "not integration",
            str(REPO / "tests" / "integration"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout + proc.stderr
    unmarked = [line for line in out.splitlines() if line.startswith("tests/integration/")]
    assert not unmarked, "integration tests without the integration marker:\n" + "\n".join(unmarked)
    deselected = re.search(r"(\d+) deselected", out)
    assert proc.returncode == 5 and deselected and int(deselected.group(1)) > 0, out
