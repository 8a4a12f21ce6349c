"""docs/api.md is generated from the proto comments, complete, and checked fresh.

The checker runs the real protoc (grpc_tools) on the real proto/; the negative cases run it on
small protos written to a temporary directory.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "gen_api_docs.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_api_docs", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building
    spec.loader.exec_module(module)
    return module


gen = _load()


def test_every_element_of_the_real_proto_has_a_comment() -> None:
    fds = gen.descriptor_set()
    assert gen.undocumented(fds) == []
    names = {el.name for f in gen._api_files(fds) for el in gen.elements(f)}
    # The walk reaches every kind of element (so "nothing undocumented" means something).
    assert {"NodeService.Connect", "ControlService.WatchEvents", "Node.labels"} <= names
    assert {"CommandState.COMMAND_STATE_SUCCEEDED", "WatchEventsRequest.after_index"} <= names


def test_committed_api_md_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 0, result.stderr


def test_api_md_documents_every_rpc_with_its_errors() -> None:
    text = (REPO / "docs" / "api.md").read_text()
    fds = gen.descriptor_set()
    for file in gen._api_files(fds):
        for service in file.service:
            for method in service.method:
                assert f"| `{method.name}` |" in text
    # The comments carry limits, defaults and errors, not just names.
    assert "RESOURCE_EXHAUSTED" in text and "retry-after-ms" in text
    assert "| `page_size` | `uint32` |  | 0 = 500; max 5000 |" in text
    assert "`map<string, string>`" in text


def _write_proto(root: Path, body: str) -> None:
    (root / "t").mkdir(parents=True)
    (root / "t" / "t.proto").write_text('syntax = "proto3";\npackage t.v1;\n' + body)


def test_missing_comments_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _write_proto(
        tmp_path / "proto",
        "// A documented message.\nmessage M {\n  string a = 1;  // documented\n"
        "  int32 b = 2;\n  map<string, string> m = 3;\n}\n"
        "enum E {\n  E_UNSPECIFIED = 0;\n}\n"
        "service S {\n  rpc Do(M) returns (M);\n}\n",
    )
    out = tmp_path / "api.md"
    root = ["--proto-root", str(tmp_path / "proto"), "--out", str(out)]
    assert gen.main(root) == 0  # writing works, with a warning
    assert gen.main([*root, "--check"]) == 1
    err = capsys.readouterr().err
    for name in ("field M.b", "field M.m", "enum E", "enum value E.E_UNSPECIFIED"):
        assert name in err
    for name in ("service S", "rpc S.Do"):
        assert name in err
    assert "message M\n" not in err and "field M.a\n" not in err
    assert "MEntry" not in err  # a map's synthetic entry type is not an element


def test_stale_file_fails_the_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    proto = tmp_path / "proto"
    _write_proto(proto, "// Documented.\nmessage M {\n  string a = 1;  // documented\n}\n")
    out = tmp_path / "api.md"
    args = ["--proto-root", str(proto), "--out", str(out)]
    assert gen.main(args) == 0
    assert gen.main([*args, "--check"]) == 0
    assert "| `a` | `string` |  | documented |" in out.read_text()
    # A comment changes in the proto but the docs are not regenerated: stale.
    text = (proto / "t" / "t.proto").read_text().replace("// documented", "// changed")
    (proto / "t" / "t.proto").write_text(text)
    assert gen.main([*args, "--check"]) == 1
    assert "stale" in capsys.readouterr().err


# Messages docs/troubleshooting.md quotes: each must still be produced somewhere in nexus_fast/,
# so a reworded message fails here until the guide says the same.
QUOTED = (
    "cannot listen on",
    "(change it with",
    "nexus.lock",
    "is in use by pid",
    "one server per data directory",
    "store full: the database reached max_map_size (",
    "raise database.max_map_size or free space",
    "store full: no space left on the device (",
    "command queue full (",
    "slow consumer; resume after index",
    "is older than retention: the oldest event kept is",
    "superseded by session epoch",
    "superseded by a newer stream of the same session",
    "node stream fell behind; reconnect",
    "is not current",
    "request is not a valid",
    "with a different spec",
)


def test_troubleshooting_covers_each_error_with_the_real_message() -> None:
    guide = (REPO / "docs" / "troubleshooting.md").read_text()
    for heading in (
        "## Port in use",
        "## Data dir locked",
        "## Store full",
        "## Slow consumer cut off",
        "## Node superseded",
        "## Certificate refused",
        "## Idempotency key already used",
        "## UNAUTHENTICATED / PERMISSION_DENIED",
    ):
        assert heading in guide
        section = guide.split(heading, 1)[1].split("\n## ", 1)[0]
        assert "Fix" in section, f"{heading} has no fix"
    source = "\n".join(p.read_text() for p in (REPO / "nexus_fast").rglob("*.py"))
    for message in QUOTED:
        assert message in guide, f"troubleshooting.md does not quote {message!r}"
        assert message in source, f"nexus_fast/ no longer says {message!r}"
