"""nexusctl's contexts: a small TOML file naming servers and the credentials to reach them.

``~/.config/nexus/config.toml`` (or ``$NEXUSCTL_CONFIG``)::

    current_context = "prod"

    [contexts.prod]
    target = "nexus.example.com:50053"      # gRPC host:port; replicas: "h1:p,h2:p" or a list
    http = "https://nexus.example.com:8082" # for `nexusctl status` (/health/detailed)
    tls_ca = "/etc/nexus/ca.pem"
    tls_cert = "/etc/nexus/ops.pem"
    tls_key = "/etc/nexus/ops.key"
    tls_server_name = "nexus"
    token_file = "~/.config/nexus/prod.token"

Several targets (replicas) fail over: see :mod:`nexus_fast.ctl.client`.

What wins, highest first: a flag, the environment (``NEXUS_TARGET``, ``NEXUS_HTTP``,
``NEXUS_TOKEN``), the selected context (``--context`` or ``current_context``), the
built-in default (``127.0.0.1:50053``, plaintext, no token).
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

import click
import tomli_w

from nexus_fast.node.channel import TOKEN_ENV, ClientAuth, check_arguments
from nexus_fast.node.targets import parse_targets

CONFIG_ENV = "NEXUSCTL_CONFIG"
TARGET_ENV = "NEXUS_TARGET"
HTTP_ENV = "NEXUS_HTTP"
DEFAULT_TARGET = "127.0.0.1:50053"
CONTEXT_KEYS = ("target", "http", "tls_ca", "tls_cert", "tls_key", "tls_server_name", "token_file")
_PATH_KEYS = ("tls_ca", "tls_cert", "tls_key", "token_file")


class ConfigError(click.UsageError):
    """The config file or a context in it is unusable (exit code 2, like a bad flag)."""


def config_path() -> Path:
    """``$NEXUSCTL_CONFIG``, else ``$XDG_CONFIG_HOME/nexus/config.toml`` (``~/.config``)."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "nexus" / "config.toml"


@dataclass(slots=True)
class CtlConfig:
    """The parsed config file: named contexts and the current one."""

    path: Path
    current_context: str | None
    contexts: dict[str, dict[str, str]]

    @classmethod
    def load(cls, path: Path | None = None) -> CtlConfig:
        """Read the file; a missing file is an empty config, a malformed one an error."""
        path = path or config_path()
        try:
            with path.open("rb") as fp:
                doc = tomllib.load(fp)
        except FileNotFoundError:
            return cls(path, None, {})
        except (OSError, tomllib.TOMLDecodeError) as err:
            raise ConfigError(f"config {path}: {err}") from None
        raw = doc.get("contexts", {})
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path}: [contexts] must be a table of tables")
        contexts: dict[str, dict[str, str]] = {}
        for name, ctx in raw.items():
            if not isinstance(ctx, dict):
                raise ConfigError(f"config {path}: contexts.{name} must be a table")
            unknown = sorted(set(ctx) - set(CONTEXT_KEYS))
            if unknown:
                raise ConfigError(
                    f"config {path}: contexts.{name}: unknown key {unknown[0]!r} "
                    f"(expected some of {', '.join(CONTEXT_KEYS)})"
                )
            ctx = dict(ctx)
            target = ctx.get("target")
            if isinstance(target, list) and all(isinstance(t, str) for t in target):
                ctx["target"] = ",".join(target)  # replicas as a TOML list
            for key, value in ctx.items():
                if not isinstance(value, str):
                    raise ConfigError(f"config {path}: contexts.{name}.{key} must be a string")
            contexts[name] = ctx
        current = doc.get("current_context")
        if current is not None and not isinstance(current, str):
            raise ConfigError(f"config {path}: current_context must be a string")
        return cls(path, current, contexts)

    def save(self) -> None:
        """Write the file atomically (a rename), creating its directory, mode 0600."""
        doc: dict[str, Any] = {}
        if self.current_context:
            doc["current_context"] = self.current_context
        doc["contexts"] = self.contexts
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fp:
            tomli_w.dump(doc, fp)
        os.replace(tmp, self.path)

    def context(self, name: str | None) -> tuple[str | None, dict[str, str]]:
        """The named context (or the current one, or none); an unknown name is an error."""
        name = name or self.current_context
        if not name:
            return None, {}
        if name not in self.contexts:
            known = ", ".join(sorted(self.contexts)) or "none defined"
            raise ConfigError(f"context {name!r} not found in {self.path} ({known})")
        return name, self.contexts[name]


@dataclass(slots=True)
class Settings:
    """What the command line said; ``None`` means not given. Filled by click callbacks."""

    context: str | None = None
    target: str | None = None
    http: str | None = None
    output: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_server_name: str | None = None
    token: str | None = None
    request_timeout: float | None = None


SETTING_NAMES = frozenset(f.name for f in fields(Settings))


@dataclass(frozen=True, slots=True)
class Connection:
    """Where to connect and how: the result of flags + environment + context."""

    target: str  # as given: one HOST:PORT or several, comma separated
    http: str | None
    auth: ClientAuth
    context: str | None
    request_timeout: float
    targets: tuple[str, ...] = ()  # parsed from ``target``; filled by resolve()


class _ClickParser(argparse.ArgumentParser):
    """Lets :func:`check_arguments` (written for argparse) report through click."""

    def error(self, message: str) -> NoReturn:
        raise click.UsageError(message)


def _read_token(path: str) -> str:
    try:
        token = Path(path).expanduser().read_text().strip()
    except OSError as err:
        raise ConfigError(f"token_file {path}: {err.strerror or err}") from None
    if not token or "\n" in token:
        raise ConfigError(f"token_file {path}: must hold one non-empty line")
    return token


def resolve(settings: Settings, config: CtlConfig | None = None) -> Connection:
    """Combine flags, environment and context into a :class:`Connection`."""
    config = config if config is not None else CtlConfig.load()
    name, ctx = config.context(settings.context)
    ctx = {k: str(Path(v).expanduser()) if k in _PATH_KEYS else v for k, v in ctx.items()}
    target = settings.target or os.environ.get(TARGET_ENV) or ctx.get("target") or DEFAULT_TARGET
    http = settings.http or os.environ.get(HTTP_ENV) or ctx.get("http") or None
    token = settings.token
    if token is None and not os.environ.get(TOKEN_ENV) and ctx.get("token_file"):
        token = _read_token(ctx["token_file"])
    args = argparse.Namespace(
        tls_ca=settings.tls_ca or ctx.get("tls_ca"),
        tls_cert=settings.tls_cert or ctx.get("tls_cert"),
        tls_key=settings.tls_key or ctx.get("tls_key"),
        tls_server_name=settings.tls_server_name or ctx.get("tls_server_name"),
        token=token,
    )
    # The same checks and the same ClientAuth as nexus-node and nexus-bench.
    check_arguments(_ClickParser(), args)
    try:
        targets = tuple(parse_targets(target))
    except ValueError as err:
        raise click.UsageError(f"--target: {err}") from None
    return Connection(
        target=target,
        http=normalise_http(http, targets[0], ClientAuth.from_args(args).tls) if http else None,
        auth=ClientAuth.from_args(args),
        context=name,
        request_timeout=settings.request_timeout or 10.0,
        targets=targets,
    )


def normalise_http(http: str, target: str, tls: bool) -> str:
    """``8082`` -> ``http://<target host>:8082``; ``host:8082`` -> ``http://host:8082``."""
    http = http.strip().rstrip("/")
    if http.isdigit():
        host = target.rsplit(":", 1)[0] if ":" in target else target
        http = f"{host}:{http}"
    if "://" not in http:
        http = ("https://" if tls else "http://") + http
    return http
