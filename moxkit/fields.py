"""Settings declared once: a config dataclass field carries its help text, its bounds and its
command-line flag, so the library checks values by field name (the Python API's words) and
the CLI generates its options from the same fields (moxkit.cli.options) with the flag's name.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any

from .errors import InputError


def setting(
    default: Any,
    help: str,
    *,
    minimum: float | None = None,
    above: float | None = None,
    maximum: float | None = None,
    flag: str | None = None,
    cli: bool = True,
    cli_default: Any = None,
) -> Any:
    """A dataclass field. minimum/maximum are inclusive bounds, above an exclusive lower one;
    flag overrides the default --field-name; cli=False keeps the field off the command line;
    cli_default (when not None) is the option's default where the library's differs."""
    meta = {"help": help, "minimum": minimum, "above": above, "maximum": maximum,
            "flag": flag, "cli": cli, "cli_default": cli_default}  # fmt: skip
    return dataclasses.field(default=default, metadata=meta)


def flag_of(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def choices_of(cls: type, field: dataclasses.Field) -> tuple | None:
    """The allowed values of a Literal[...] field (None for any other type)."""
    hint = typing.get_type_hints(cls)[field.name]
    for arg in (hint, *typing.get_args(hint)):
        if typing.get_origin(arg) is typing.Literal:
            return typing.get_args(arg)
    return None


def problem(cls: type, field: dataclasses.Field, value: Any) -> str | None:
    """What is wrong with `value` for `field` of `cls`, or None when it is acceptable."""
    if value is None:
        return None
    choices = choices_of(cls, field)
    if choices is not None:
        return None if value in choices else f"expected one of {', '.join(map(str, choices))}"
    meta = field.metadata
    bounded = any(meta.get(k) is not None for k in ("minimum", "above", "maximum"))
    if not bounded:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "must be a number"
    if not math.isfinite(value):
        return "must be a finite number"
    low, above, high = meta.get("minimum"), meta.get("above"), meta.get("maximum")
    if above is not None and not value > above:
        return "must be positive" if above == 0 else f"must be greater than {above:g}"
    if low is not None and value < low:
        return "must not be negative" if low == 0 else f"must be at least {low:g}"
    if high is not None and value > high:
        return f"must be at most {high:g}"
    return None


def check(obj: Any) -> None:
    """MoxError naming the first field of the dataclass instance `obj` out of its bounds."""
    for field in dataclasses.fields(obj):
        value = getattr(obj, field.name)
        why = problem(type(obj), field, value)
        if why is not None:
            raise InputError(f"{field.name} {_shown(value)}: {why}", params=(field.name,))


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
