"""How one configuration field is parsed and range-checked (shared by config.py and the
sections that live in their own modules, such as ``nexus_fast/cluster/config.py``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nexus_fast.units import format_size

__all__ = ["Spec", "spec_field"]


@dataclass(frozen=True)
class Spec:
    """How one field is parsed and range-checked."""

    kind: str  # str | bool | int | float | port | duration | size | enum | strlist | rbac | limits
    min: float | None = None
    max: float | None = None
    positive: bool = False  # durations: strictly > 0
    choices: tuple[str, ...] = ()

    def expected(self) -> str:
        """Human description of acceptable values, used in ConfigError."""
        if self.kind == "port":
            return "an integer port in 1..65535"
        if self.kind == "bool":
            return "a boolean (true/false)"
        if self.kind == "str":
            return "a string"
        if self.kind == "enum":
            return "one of " + ", ".join(self.choices)
        if self.kind == "strlist":
            if self.choices:
                return "a list of " + ", ".join(self.choices)
            return "a list of strings (or one comma-separated string)"
        if self.kind == "rbac":
            return (
                "a [security.rbac] table: enabled (bool), default_role (str), "
                "[[security.rbac.roles]] with name (str) and permissions (list of str)"
            )
        if self.kind == "limits":
            return "a [security.limits] table (see docs/security.md, Limits)"
        if self.kind == "int":
            return "an integer" + _bounds(self.min, self.max, str)
        if self.kind == "float":
            return "a number" + _bounds(self.min, self.max, str)
        if self.kind == "size":
            bounds = _bounds(self.min, self.max, lambda v: format_size(int(v)))
            return 'a size like "512KB", "64MB", "1GB" or bytes' + bounds
        sign = "a positive" if self.positive else "a non-negative"
        return f'{sign} duration like "250ms", "30s", "5m", "2h", "1d" or seconds'


def _bounds(lo: float | None, hi: float | None, fmt: Any) -> str:
    if lo is not None and hi is not None:
        return f" in {fmt(lo)}..{fmt(hi)}"
    if lo is not None:
        return f" >= {fmt(lo)}"
    if hi is not None:
        return f" <= {fmt(hi)}"
    return ""


def spec_field(default: Any, kind: str, **kw: Any) -> Any:
    """Declare a dataclass field carrying its parsing spec in metadata."""
    return field(default=default, metadata={"spec": Spec(kind, **kw)})
