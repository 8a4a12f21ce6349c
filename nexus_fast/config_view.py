"""The effective configuration as ``GET /api/v1/config`` shows it: values and their origin.

Every key of every section, with where its value came from: ``default``, ``file`` (the
config file), ``env`` (a ``NEXUS_*`` variable, named) or ``command line``. Secrets are
never shown: a key whose name says it holds one (a token, a secret, a password) answers
``"redacted"`` when set. File paths are shown (``jwt_secret_file`` names the file; its
contents are never read here).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any, Final

from nexus_fast.config import ENV_OVERRIDES, Config

__all__ = ["REDACTED", "effective_config", "is_secret_key", "source_kind"]

REDACTED: Final = "redacted"
# A key named like this holds a secret itself; `..._file` keys hold a path to one.
_SECRET_NAME: Final = re.compile(r"token|secret|password|passphrase|credential|private|api_key")


def is_secret_key(key: str) -> bool:
    """True when the value of dotted ``key`` is itself a secret (not a path to one)."""
    name = key.rpartition(".")[2]
    return bool(_SECRET_NAME.search(name)) and not name.endswith("_file")


def source_kind(source: str | None, config_file: str | None) -> tuple[str, str | None]:
    """``(kind, detail)``: kind is default, file, env or command line; detail names the
    file or the variable."""
    if source is None or source == "default":
        return "default", None
    if source in ENV_OVERRIDES:
        return "env", source
    if source == "command line":
        return "command line", None
    return "file", source if config_file is None else config_file


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    return value


def _redact(value: Any) -> Any:
    """Redact secret-named fields inside a table value (``[security.limits]`` and friends)."""
    if isinstance(value, dict):
        return {k: (REDACTED if is_secret_key(k) and v else _redact(v)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact(v) for v in value]
    return value


def effective_config(config: Config, config_file: str | None) -> dict[str, Any]:
    """``{"file": path, "config": {section: {key: {"value", "source"[, "from"]}}}}``.

    Durations are seconds and sizes bytes, as the server uses them.
    """
    sections: dict[str, dict[str, Any]] = {}
    for section_field in dataclasses.fields(config):
        section = getattr(config, section_field.name)
        if not dataclasses.is_dataclass(section):
            continue  # ``sources``
        entries: dict[str, Any] = {}
        for item in dataclasses.fields(section):
            key = f"{section_field.name}.{item.name}"
            value = _redact(_plain(getattr(section, item.name)))
            if is_secret_key(key) and value:
                value = REDACTED
            kind, detail = source_kind(config.sources.get(key), config_file)
            entry: dict[str, Any] = {"value": value, "source": kind}
            if detail is not None:
                entry["from"] = detail
            entries[item.name] = entry
        sections[section_field.name] = entries
    return {"file": config_file, "config": sections}
