#!/usr/bin/env python3
"""Generate docs/api.md from the comments in proto/ (protoc-gen-doc style).

protoc (the one bundled with grpc_tools, so no extra tool) compiles the protos into a
descriptor set with source info, which keeps every comment next to the element it
belongs to; this script renders services, messages and enums as Markdown.

    python scripts/gen_api_docs.py            # write docs/api.md
    python scripts/gen_api_docs.py --check    # exit 1 if it is stale or an element lacks a comment

``make docs`` runs the first, ``make lint`` (and tests/unit/test_api_docs.py) the second.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import descriptor_pb2

ROOT = Path(__file__).resolve().parents[1]
PROTO_ROOT = ROOT / "proto"
OUT = ROOT / "docs" / "api.md"
# Compiled with ours but not our API: etcd's own protocol (a trimmed copy, etcd's comments
# and numbering), documented by etcd.
EXTERNAL = {"nexus_fast/pb/etcd_rpc.proto"}

# Field numbers in descriptor.proto, used in SourceCodeInfo.Location.path.
_FILE_MESSAGE, _FILE_ENUM, _FILE_SERVICE, _FILE_SYNTAX = 4, 5, 6, 12
_MSG_FIELD, _MSG_NESTED, _MSG_ENUM = 2, 3, 4
_ENUM_VALUE = 2
_SERVICE_METHOD = 2

_F = descriptor_pb2.FieldDescriptorProto
_SCALARS = {
    _F.TYPE_DOUBLE: "double",
    _F.TYPE_FLOAT: "float",
    _F.TYPE_INT64: "int64",
    _F.TYPE_UINT64: "uint64",
    _F.TYPE_INT32: "int32",
    _F.TYPE_FIXED64: "fixed64",
    _F.TYPE_FIXED32: "fixed32",
    _F.TYPE_BOOL: "bool",
    _F.TYPE_STRING: "string",
    _F.TYPE_BYTES: "bytes",
    _F.TYPE_UINT32: "uint32",
    _F.TYPE_SFIXED32: "sfixed32",
    _F.TYPE_SFIXED64: "sfixed64",
    _F.TYPE_SINT32: "sint32",
    _F.TYPE_SINT64: "sint64",
}


def protos(root: Path = PROTO_ROOT) -> list[Path]:
    """The API's .proto files, relative to ``root`` (proto/)."""
    return sorted(p.relative_to(root) for p in root.rglob("*.proto"))


def descriptor_set(root: Path = PROTO_ROOT) -> descriptor_pb2.FileDescriptorSet:
    """Compile the protos under ``root`` with comments kept (``--include_source_info``)."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).resolve().parent / "_proto"
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "api.pb"
        args = [
            "grpc_tools.protoc",
            f"-I{root}",
            f"-I{well_known}",
            "--include_source_info",
            f"--descriptor_set_out={out}",
            *(str(p) for p in protos(root)),
        ]
        if protoc.main(args) != 0:
            raise SystemExit("protoc failed; see the message above")
        return descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes())


def _clean(text: str) -> str:
    """A protoc comment (lines with their leading space) as trimmed lines."""
    return "\n".join(line.strip() for line in text.strip("\n").splitlines()).strip()


@dataclass
class Element:
    """One documented element: what it is, its full name and its comment."""

    kind: str
    name: str
    comment: str


class Comments:
    """Comments of one file by element path (leading, then trailing)."""

    def __init__(self, file: descriptor_pb2.FileDescriptorProto) -> None:
        self._by_path: dict[tuple[int, ...], str] = {}
        self.header = ""
        for loc in file.source_code_info.location:
            parts = [_clean(c) for c in (loc.leading_comments, loc.trailing_comments) if c]
            self._by_path[tuple(loc.path)] = "\n".join(p for p in parts if p)
            if tuple(loc.path) == (_FILE_SYNTAX,):
                # The file's opening comment: attached to `syntax`, or detached above it.
                blocks = [*loc.leading_detached_comments, loc.leading_comments]
                self.header = "\n\n".join(_clean(c) for c in blocks if c.strip())

    def get(self, *path: int) -> str:
        return self._by_path.get(path, "")


def _type_name(field: descriptor_pb2.FieldDescriptorProto) -> str:
    if field.type in _SCALARS:
        return _SCALARS[field.type]
    return field.type_name.rsplit(".", 1)[-1]


def _anchor(name: str) -> str:
    return name.lower().replace(".", "")


def _link(name: str, known: set[str]) -> str:
    return f"[{name}](#{_anchor(name)})" if name in known else f"`{name}`"


def _cell(text: str) -> str:
    """A comment inside a Markdown table cell: one line, pipes escaped."""
    return " ".join(text.replace("|", "\\|").split())


def _para(text: str) -> str:
    """A comment as Markdown paragraphs (blank lines kept, lines joined)."""
    paragraphs = [" ".join(p.split("\n")) for p in text.split("\n\n")]
    return "\n\n".join(p for p in paragraphs if p)


def elements(file: descriptor_pb2.FileDescriptorProto) -> Iterator[Element]:
    """Every service, method, message, field, enum and enum value, with its comment."""
    comments = Comments(file)

    def enum(
        e: descriptor_pb2.EnumDescriptorProto, path: tuple[int, ...], prefix: str
    ) -> Iterator[Element]:
        yield Element("enum", prefix + e.name, comments.get(*path))
        for i, v in enumerate(e.value):
            yield Element(
                "enum value", f"{prefix}{e.name}.{v.name}", comments.get(*path, _ENUM_VALUE, i)
            )

    def message(
        m: descriptor_pb2.DescriptorProto, path: tuple[int, ...], prefix: str
    ) -> Iterator[Element]:
        if m.options.map_entry:
            return  # synthetic: documented by its map field
        yield Element("message", prefix + m.name, comments.get(*path))
        for i, f in enumerate(m.field):
            yield Element("field", f"{prefix}{m.name}.{f.name}", comments.get(*path, _MSG_FIELD, i))
        for i, nested in enumerate(m.nested_type):
            yield from message(nested, (*path, _MSG_NESTED, i), f"{prefix}{m.name}.")
        for i, nested_enum in enumerate(m.enum_type):
            yield from enum(nested_enum, (*path, _MSG_ENUM, i), f"{prefix}{m.name}.")

    for i, s in enumerate(file.service):
        yield Element("service", s.name, comments.get(_FILE_SERVICE, i))
        for j, method in enumerate(s.method):
            yield Element(
                "rpc", f"{s.name}.{method.name}", comments.get(_FILE_SERVICE, i, _SERVICE_METHOD, j)
            )
    for i, m in enumerate(file.message_type):
        yield from message(m, (_FILE_MESSAGE, i), "")
    for i, e in enumerate(file.enum_type):
        yield from enum(e, (_FILE_ENUM, i), "")


def undocumented(fds: descriptor_pb2.FileDescriptorSet, root: Path = PROTO_ROOT) -> list[str]:
    """``kind name`` of every element without a comment."""
    return [
        f"{el.kind} {el.name}"
        for file in _api_files(fds, root)
        for el in elements(file)
        if not el.comment.strip()
    ]


def _api_files(
    fds: descriptor_pb2.FileDescriptorSet, root: Path = PROTO_ROOT
) -> list[descriptor_pb2.FileDescriptorProto]:
    ours = {str(p) for p in protos(root)} - EXTERNAL
    return [f for f in fds.file if f.name in ours]


def _field_rows(
    m: descriptor_pb2.DescriptorProto, path: tuple[int, ...], comments: Comments, known: set[str]
) -> list[str]:
    maps = {f".{m.name}.{n.name}": n for n in m.nested_type if n.options.map_entry}
    rows = ["| Field | Type | Label | Description |", "|---|---|---|---|"]
    for i, f in enumerate(m.field):
        entry = next((e for suffix, e in maps.items() if f.type_name.endswith(suffix)), None)
        label = ""
        if entry is not None:
            key, value = entry.field
            type_text = f"map<{_type_name(key)}, {_type_name(value)}>"
            type_cell = f"`{type_text}`"
        else:
            name = _type_name(f)
            type_cell = _link(name, known) if f.type_name else f"`{name}`"
            if f.label == _F.LABEL_REPEATED:
                label = "repeated"
            elif f.proto3_optional:
                label = "optional"
        desc = _cell(comments.get(*path, _MSG_FIELD, i))
        rows.append(f"| `{f.name}` | {type_cell} | {label} | {desc} |")
    return rows


def render(fds: descriptor_pb2.FileDescriptorSet, root: Path = PROTO_ROOT) -> str:
    """docs/api.md for the descriptor set."""
    files = _api_files(fds, root)
    known = {m.name for f in files for m in f.message_type} | {
        e.name for f in files for e in f.enum_type
    }
    out = [
        "# nexus_fast API reference",
        "",
        "<!-- Generated by scripts/gen_api_docs.py from proto/; do not edit by hand.",
        "     Change the comments in the .proto and run `make docs`. -->",
        "",
        "Errors are gRPC statuses mapped in one table (`nexus_fast/api/status.py`); the",
        "retryable ones carry trailers: `retry-after-ms` (RESOURCE_EXHAUSTED),",
        "`nexus-oldest-index` (OUT_OF_RANGE), `nexus-resume-after-index` (slow consumer).",
        "Event stream semantics: [events.md](events.md). Metrics: [metrics.md](metrics.md).",
        "Errors you will meet and their fixes: [troubleshooting.md](troubleshooting.md).",
        "",
    ]
    for file in files:
        comments = Comments(file)
        out += [f"## `{file.name}` (package `{file.package}`)", ""]
        if comments.header:
            out += [_para(comments.header), ""]
        out += ["**Contents**", ""]
        for s in file.service:
            out.append(f"- service [{s.name}](#{_anchor(s.name)})")
        for m in file.message_type:
            out.append(f"- message [{m.name}](#{_anchor(m.name)})")
        for e in file.enum_type:
            out.append(f"- enum [{e.name}](#{_anchor(e.name)})")
        out.append("")
        out += ["## Services", ""]
        for i, s in enumerate(file.service):
            out += [f"### {s.name}", "", _para(comments.get(_FILE_SERVICE, i)), ""]
            out += ["| Method | Request | Response | Description |", "|---|---|---|---|"]
            for j, method in enumerate(s.method):
                req = method.input_type.rsplit(".", 1)[-1]
                resp = method.output_type.rsplit(".", 1)[-1]
                req_cell = ("stream " if method.client_streaming else "") + _link(req, known)
                resp_cell = ("stream " if method.server_streaming else "") + _link(resp, known)
                desc = _cell(comments.get(_FILE_SERVICE, i, _SERVICE_METHOD, j))
                out.append(f"| `{method.name}` | {req_cell} | {resp_cell} | {desc} |")
            out.append("")
        out += ["## Messages", ""]
        for i, m in enumerate(file.message_type):
            path = (_FILE_MESSAGE, i)
            out += [f"### {m.name}", "", _para(comments.get(*path)), ""]
            if m.field:
                out += [*_field_rows(m, path, comments, known), ""]
            else:
                out += ["_No fields._", ""]
        out += ["## Enums", ""]
        for i, e in enumerate(file.enum_type):
            path = (_FILE_ENUM, i)
            out += [f"### {e.name}", "", _para(comments.get(*path)), ""]
            out += ["| Name | Number | Description |", "|---|---|---|"]
            for j, v in enumerate(e.value):
                desc = _cell(comments.get(*path, _ENUM_VALUE, j))
                out.append(f"| `{v.name}` | {v.number} | {desc} |")
            out.append("")
    return "\n".join(out).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="fail if stale or undocumented")
    parser.add_argument("--out", type=Path, default=OUT, help="default: docs/api.md")
    parser.add_argument("--proto-root", type=Path, default=PROTO_ROOT, help="default: proto/")
    args = parser.parse_args(argv)
    root = args.proto_root.resolve()
    fds = descriptor_set(root)
    missing = undocumented(fds, root)
    text = render(fds, root)
    if args.check:
        ok = True
        if missing:
            ok = False
            print(f"{len(missing)} proto elements have no comment:", file=sys.stderr)
            for name in missing:
                print(f"  {name}", file=sys.stderr)
        current = args.out.read_text() if args.out.exists() else ""
        if current != text:
            ok = False
            print(f"{os.path.relpath(args.out)} is stale: run `make docs`", file=sys.stderr)
        return 0 if ok else 1
    if missing:
        print(f"warning: {len(missing)} proto elements have no comment", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"wrote {os.path.relpath(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
