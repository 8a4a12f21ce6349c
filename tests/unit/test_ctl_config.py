"""nexusctl contexts: the config file, and what wins between flag, environment and context."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from nexus_fast.ctl.config import (
    DEFAULT_TARGET,
    ConfigError,
    CtlConfig,
    Settings,
    config_path,
    normalise_http,
    resolve,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    for name in ("NEXUS_TARGET", "NEXUS_HTTP", "NEXUS_TOKEN", "XDG_CONFIG_HOME"):
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "config.toml"
    monkeypatch.setenv("NEXUSCTL_CONFIG", str(path))
    return path


def write(path: Path, text: str) -> CtlConfig:
    path.write_text(text)
    return CtlConfig.load(path)


def test_config_path_env_then_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert config_path() == tmp_path / "config.toml"
    monkeypatch.delenv("NEXUSCTL_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    assert config_path() == tmp_path / "xdg" / "nexus" / "config.toml"


def test_missing_file_is_empty_and_defaults_apply(clean_env: Path) -> None:
    conn = resolve(Settings())
    assert conn.target == DEFAULT_TARGET
    assert conn.http is None and conn.context is None
    assert not conn.auth.tls and conn.auth.token is None
    assert conn.request_timeout == 10.0


def test_flag_beats_env_beats_context(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(
        clean_env,
        'current_context = "prod"\n[contexts.prod]\ntarget = "ctx:1"\nhttp = "8082"\n',
    )
    assert resolve(Settings()).target == "ctx:1"
    assert resolve(Settings()).http == "http://ctx:8082"  # a bare port: the target's host
    monkeypatch.setenv("NEXUS_TARGET", "env:2")
    assert resolve(Settings()).target == "env:2"
    assert resolve(Settings(target="flag:3")).target == "flag:3"
    assert resolve(Settings()).context == "prod"


def test_token_file_and_env_token(
    clean_env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    write(clean_env, f'[contexts.a]\ntarget = "h:1"\ntoken_file = "{token}"\n')
    assert resolve(Settings(context="a")).auth.token == "s3cret"
    monkeypatch.setenv("NEXUS_TOKEN", "from-env")
    assert resolve(Settings(context="a")).auth.token == "from-env"
    assert resolve(Settings(context="a", token="flag")).auth.token == "flag"


def test_unreadable_token_file_is_a_usage_error(clean_env: Path, tmp_path: Path) -> None:
    write(clean_env, f'[contexts.a]\ntoken_file = "{tmp_path / "nope"}"\n')
    with pytest.raises(ConfigError, match="token_file"):
        resolve(Settings(context="a"))


def test_tls_files_from_context_are_checked_like_nexus_node(clean_env: Path) -> None:
    write(clean_env, '[contexts.a]\ntls_cert = "/etc/hostname"\n')
    # The shared check_arguments reports through click, so the exit code is 2.
    with pytest.raises(click.UsageError, match="--tls-cert and --tls-key go together"):
        resolve(Settings(context="a"))


def test_tls_context_makes_https_http(clean_env: Path) -> None:
    write(clean_env, '[contexts.a]\ntarget = "h:1"\nhttp = "h:8082"\ntls_ca = "/etc/hostname"\n')
    conn = resolve(Settings(context="a"))
    assert conn.auth.tls and conn.auth.tls_ca == "/etc/hostname"
    assert conn.http == "https://h:8082"


@pytest.mark.parametrize(
    "text, message",
    [
        ("current_context = [", "config"),
        ("contexts = 3", "must be a table"),
        ("[contexts.a]\ntarget = 5\n", "must be a string"),
        ("[contexts.a]\ntargte = 'x'\n", "unknown key 'targte'"),
        ("current_context = 1\n", "current_context must be a string"),
    ],
)
def test_malformed_config_names_the_problem(clean_env: Path, text: str, message: str) -> None:
    clean_env.write_text(text)
    with pytest.raises(ConfigError, match=message):
        CtlConfig.load()


def test_unknown_context_lists_known_ones(clean_env: Path) -> None:
    write(clean_env, "[contexts.a]\n[contexts.b]\n")
    with pytest.raises(ConfigError, match=r"'c' not found .*\(a, b\)"):
        resolve(Settings(context="c"))


def test_save_round_trips_with_private_mode(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "config.toml"
    cfg = CtlConfig(path, "x", {"x": {"target": "h:1", "token_file": "~/t"}})
    cfg.save()
    assert path.stat().st_mode & 0o777 == 0o600
    again = CtlConfig.load(path)
    assert again.current_context == "x" and again.contexts == cfg.contexts


@pytest.mark.parametrize(
    "http, target, tls, expected",
    [
        ("8082", "10.0.0.1:50053", False, "http://10.0.0.1:8082"),
        ("8082", "[::1]:50053", True, "https://[::1]:8082"),
        ("h:8082/", "x:1", False, "http://h:8082"),
        ("https://h:9", "x:1", False, "https://h:9"),
    ],
)
def test_normalise_http(http: str, target: str, tls: bool, expected: str) -> None:
    assert normalise_http(http, target, tls) == expected
