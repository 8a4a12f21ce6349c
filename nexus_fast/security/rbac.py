"""The ``[security.rbac]`` schema: roles as configured, parsed from the TOML tables.

Kept apart from :mod:`nexus_fast.config` (which reads it through :func:`parse_rbac`) and
free of imports from it; :class:`~nexus_fast.security.permissions.Rbac` turns it into
granted permissions.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Final

__all__ = ["RbacConfig", "RbacError", "RoleConfig", "parse_rbac"]

_KEYS: Final = ("enabled", "default_role", "roles")
_ROLE_NAME: Final = re.compile(r"[a-z][a-z0-9_-]{0,63}")
_PATTERN: Final = re.compile(r"\*|(\*|[a-z_]+)\.(\*|[a-z_]+)")


@dataclass(frozen=True)
class RoleConfig:
    """One ``[[security.rbac.roles]]`` entry: a role name and its permission patterns."""

    name: str
    permissions: tuple[str, ...] = ()


@dataclass(frozen=True)
class RbacConfig:
    """``[security.rbac]``: role-based access control over the permission table.

    ``enabled = false`` lets every authenticated principal do everything (authentication
    only; nodes stay restricted). ``default_role`` is given to principals whose credential
    names no role (empty: such principals are refused). ``roles`` add roles or replace the
    built-in operator and viewer (admin and node are fixed).
    """

    enabled: bool = True
    default_role: str = ""
    roles: tuple[RoleConfig, ...] = ()


class RbacError(ValueError):
    """A bad ``[security.rbac]`` value; ``key`` is relative to the table (``roles[0].name``).

    ``unknown`` marks a key that does not exist (``guess`` is the closest known one).
    """

    def __init__(
        self,
        key: str,
        value: object,
        expected: str,
        *,
        unknown: bool = False,
        guess: str | None = None,
    ) -> None:
        super().__init__(f"{key}: expected {expected}")
        self.key = key
        self.value = value
        self.expected = expected
        self.unknown = unknown
        self.guess = guess


def parse_rbac(value: object) -> RbacConfig:
    """``[security.rbac]`` with its ``[[security.rbac.roles]]`` array of tables."""
    if not isinstance(value, dict):
        raise RbacError("", value, "a [security.rbac] table")
    for name in value:
        if name not in _KEYS:
            close = difflib.get_close_matches(name, _KEYS, n=1, cutoff=0.6)
            raise RbacError(name, value[name], "a known key", unknown=True,
                            guess=close[0] if close else None)  # fmt: skip
    enabled = value.get("enabled", True)
    default_role = value.get("default_role", "")
    raw_roles = value.get("roles", [])
    if not isinstance(enabled, bool):
        raise RbacError("enabled", enabled, "a boolean (true/false)")
    if not isinstance(default_role, str):
        raise RbacError("default_role", default_role, "a role name")
    if not isinstance(raw_roles, list):
        raise RbacError("roles", raw_roles, "[[security.rbac.roles]] tables")
    roles: list[RoleConfig] = []
    for i, role in enumerate(raw_roles):
        where = f"roles[{i}]"
        if not isinstance(role, dict) or set(role) - {"name", "permissions"}:
            raise RbacError(where, role, "a table with name and permissions")
        name, perms = role.get("name"), role.get("permissions", [])
        if not isinstance(name, str) or not _ROLE_NAME.fullmatch(name):
            raise RbacError(f"{where}.name", name, "a lower-case role name")
        if not isinstance(perms, list) or not all(
            isinstance(p, str) and _PATTERN.fullmatch(p) for p in perms
        ):
            raise RbacError(f"{where}.permissions", perms, 'a list like ["node.read", "command.*"]')
        roles.append(RoleConfig(name, tuple(perms)))
    names = [r.name for r in roles]
    if len(set(names)) != len(names):
        raise RbacError("roles", names, "distinct role names")
    return RbacConfig(enabled, default_role, tuple(roles))
