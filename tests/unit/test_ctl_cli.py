"""nexusctl's command line without a server: help, usage errors (exit 2), contexts,
shell completion. Everything that talks to a server is in tests/integration/test_nexusctl.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from nexus_fast.ctl import cli


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("NEXUS_TARGET", "NEXUS_HTTP", "NEXUS_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "nexus" / "config.toml"
    monkeypatch.setenv("NEXUSCTL_CONFIG", str(path))
    return path


def invoke(*args: str, **kw: object) -> Result:
    return CliRunner().invoke(cli, list(args), prog_name="nexusctl", **kw)  # type: ignore[arg-type]


def test_help_documents_exit_codes() -> None:
    for args in ((), ("commands", "submit"), ("commands", "wait")):
        result = invoke(*args, "--help")
        assert result.exit_code == 0, result.output
        assert "Exit codes:" in result.output
        assert "3  server or connection error" in result.output


def test_every_subcommand_has_help() -> None:
    groups = {
        "nodes": ["ls", "get", "drain", "eligibility", "rm"],
        "commands": ["submit", "get", "ls", "wait", "cancel"],
        "agents": ["deploy", "ls", "get", "stop"],
        "events": ["tail"],
        "config": ["use-context", "get-contexts", "current-context", "set-context"],
    }
    for group, names in groups.items():
        listing = invoke(group, "--help").output
        for name in names:
            assert name in listing
            assert invoke(group, name, "--help").exit_code == 0


@pytest.mark.parametrize(
    "args, message",
    [
        (("commands", "submit"), "Missing option '--kind'"),
        (
            ("commands", "submit", "--kind", "k", "--target-node", "n", "--label", "a=b"),
            "exclusive",
        ),
        (("commands", "submit", "--kind", "k", "--label", "novalue"), "is not key=value"),
        (("commands", "submit", "--kind", "k", "--payload", "@/nonexistent/x"), "/nonexistent/x"),
        (("commands", "submit", "--kind", "k", "--priority", "3"), "--priority"),
        (("commands", "submit", "--kind", "k", "--timeout", "soon"), "malformed duration"),
        (("nodes", "eligibility", "n1"), "--enable"),
        (("nodes", "ls", "-o", "xml"), "'xml' is not one of"),
        (("nodes", "ls", "--status", "sleepy"), "--status"),
        (("agents", "deploy", "--name", "a", "--cpu", "lots"), "invalid cpu"),
        (("events", "tail", "--topic", "weather"), "--topic"),
        (("--context", "nope", "nodes", "ls"), "context 'nope' not found"),
        (("nodes", "ls", "--tls-cert", "/etc/hostname"), "--tls-cert and --tls-key go together"),
        (("nodes", "ls", "--tls-ca", "/nonexistent/ca.pem"), "not a readable file"),
        (("completion", "tcsh"), "'tcsh' is not one of"),
    ],
)
def test_usage_errors_exit_2(args: tuple[str, ...], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_malformed_config_is_a_usage_error(isolated: Path) -> None:
    isolated.parent.mkdir(parents=True)
    isolated.write_text("contexts = [")
    result = invoke("nodes", "ls")
    assert result.exit_code == 2 and str(isolated) in result.output


def test_contexts_round_trip(isolated: Path) -> None:
    assert "No contexts" in invoke("config", "get-contexts").output
    assert invoke("config", "current-context").exit_code == 2
    result = invoke("config", "set-context", "dev", "--target", "127.0.0.1:1", "--http", "8082")
    assert result.exit_code == 0, result.output
    assert invoke("config", "set-context", "prod", "--target", "prod:50053").exit_code == 0
    assert invoke("config", "current-context").output.strip() == "dev"  # the first one
    listing = invoke("config", "get-contexts").output.splitlines()
    assert listing[0].split() == ["CURRENT", "NAME", "TARGET", "HTTP"]
    assert listing[1].split() == ["*", "dev", "127.0.0.1:1", "8082"]
    assert listing[2].split() == ["prod", "prod:50053", "-"]
    assert invoke("config", "use-context", "prod").exit_code == 0
    assert invoke("config", "current-context").output.strip() == "prod"
    bad = invoke("config", "use-context", "stage")
    assert bad.exit_code == 2 and "dev, prod" in bad.output
    import json

    doc = json.loads(invoke("config", "get-contexts", "-o", "json").output)
    assert doc["current_context"] == "prod" and doc["contexts"]["dev"]["http"] == "8082"


@pytest.mark.parametrize(
    "shell, marker", [("bash", "complete -o"), ("zsh", "compdef"), ("fish", "complete --no-files")]
)
def test_completion_scripts(shell: str, marker: str) -> None:
    result = invoke("completion", shell)
    assert result.exit_code == 0
    assert "_NEXUSCTL_COMPLETE" in result.output and marker in result.output


def test_completion_completes_subcommands_and_contexts(isolated: Path) -> None:
    invoke("config", "set-context", "alpha", "--target", "a:1")
    invoke("config", "set-context", "beta", "--target", "b:1")
    env = {"_NEXUSCTL_COMPLETE": "bash_complete", "COMP_WORDS": "nexusctl no", "COMP_CWORD": "1"}
    assert "plain,nodes" in invoke(env=env).output.split()
    env = {
        "_NEXUSCTL_COMPLETE": "bash_complete",
        "COMP_WORDS": "nexusctl --context ",
        "COMP_CWORD": "2",
    }
    assert invoke(env=env).output.split() == ["plain,alpha", "plain,beta"]
