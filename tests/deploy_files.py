"""Readers for the deployment files (Dockerfile, deploy/kubernetes, deploy/systemd).

Shared by tests/unit/test_deploy.py (what the files say) and
tests/integration/test_deploy.py (running what they say without Docker, a cluster or
systemd). Parsers for the subset these files use, strict about anything else.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from nexus_fast.config import Config, load_config

REPO = Path(__file__).resolve().parents[1]
DOCKERFILE = REPO / "Dockerfile"
K8S = REPO / "deploy" / "kubernetes"
UNIT = REPO / "deploy" / "systemd" / "nexus-fast.service"
INSTALL_SH = REPO / "deploy" / "install.sh"


@dataclass
class Instruction:
    keyword: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest of the instruction, continuation lines joined


def dockerfile_stages(path: Path = DOCKERFILE) -> list[list[Instruction]]:
    """Instructions grouped by stage (each list starts with its FROM); ARGs before it dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(
        line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")
    ))  # fmt: skip
    stages: list[list[Instruction]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        ins = Instruction(keyword.upper(), " ".join(args.split()))
        if ins.keyword == "FROM":
            stages.append([ins])
        elif stages:
            stages[-1].append(ins)
    return stages


def dockerfile_args(path: Path = DOCKERFILE) -> dict[str, str]:
    """The global ``ARG name=value`` lines (before the first FROM)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.startswith("FROM "):
            break
        if line.startswith("ARG ") and "=" in line:
            name, _, value = line[4:].partition("=")
            out[name.strip()] = value.strip()
    return out


def exec_form(args: str) -> list[str]:
    """``["a", "b"]`` of CMD / ENTRYPOINT / HEALTHCHECK CMD (JSON array form only)."""
    import json

    parsed = json.loads(args)
    assert isinstance(parsed, list) and all(isinstance(a, str) for a in parsed), args
    return parsed


@dataclass
class InstallStep:
    """One ``deploy/install.sh`` call of a RUN line: environment, script path, arguments."""

    env: dict[str, str]
    script: str
    args: list[str]


def install_steps(stage: list[Instruction]) -> list[InstallStep]:
    """The install.sh calls of a stage's RUN lines, in order (``--mount`` flags dropped)."""
    steps = []
    for ins in stage:
        if ins.keyword != "RUN":
            continue
        words = shlex.split(ins.args)
        while words and words[0].startswith("--"):
            words.pop(0)
        parts: list[list[str]] = [[]]
        for word in words:
            if word == "&&":
                parts.append([])
            else:
                parts[-1].append(word)
        for argv in parts:
            env = {}
            while argv and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", argv[0]):
                name, _, value = argv.pop(0).partition("=")
                env[name] = value
            if argv[:1] == ["sh"] and len(argv) > 1 and argv[1].endswith("install.sh"):
                steps.append(InstallStep(env, argv[1], argv[2:]))
    return steps


def k8s_documents() -> list[dict[str, Any]]:
    """Every document of every manifest the kustomization lists."""
    docs = []
    for name in kustomization()["resources"]:
        docs.extend(d for d in yaml.safe_load_all((K8S / name).read_text()) if d)
    return docs


def kustomization() -> dict[str, Any]:
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())  # type: ignore[no-any-return]


def k8s_one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in k8s_documents()
        if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]  # fmt: skip
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def k8s_config_path() -> Path:
    """The nexus.toml the kustomization turns into the ConfigMap."""
    (gen,) = kustomization()["configMapGenerator"]
    (name,) = gen["files"]
    return K8S / name


def load_k8s_config(env: dict[str, str] | None = None) -> Config:
    """The ConfigMap's nexus.toml through the server's own loader."""
    return load_config_text(k8s_config_path().read_text(), env)


def load_config_text(
    text: str, env: dict[str, str] | None = None, tmp: Path | None = None
) -> Config:
    """``load_config`` on TOML text; the Secrets' files (only in the pod) are empty stubs."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=tmp) as scratch:
        root = Path(scratch)
        for path in sorted(set(re.findall(r'"(/etc/nexus-fast-[^"]+)"', text))):
            stub = root / path.lstrip("/")
            stub.parent.mkdir(parents=True, exist_ok=True)
            stub.write_text("")
            text = text.replace(f'"{path}"', f'"{stub}"')
        cfg_file = root / "nexus.toml"
        cfg_file.write_text(text)
        return load_config(cfg_file, env=env or {})


def unit_entries(path: Path = UNIT) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment of a systemd unit, repeats kept."""
    entries = []
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not an assignment: {raw!r}"
        entries.append((section, key.strip(), value.strip()))
    return entries
