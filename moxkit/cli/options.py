"""Click options generated from config dataclasses (moxkit.fields), so a setting is declared
once: its flag, type, default, choices, help and bounds all come from the field. A value out
of bounds is refused while parsing, before any heavy import, as one "moxkit: error:" line
naming the flag.

    @options_from(TrainConfig)              # one option per field (cli=False fields skipped)
    def command(**kw):
        config = config_from(TrainConfig, kw, progress=not kw["quiet"])
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable, Iterable

import click

from moxkit.errors import MoxError
from moxkit.fields import choices_of, flag_of, problem


def cli_fields(cls: type, exclude: Iterable[str] = ()) -> list[dataclasses.Field]:
    skip = set(exclude)
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli", True)
            and f.name not in skip]  # fmt: skip


def options_from(cls: type, *, exclude: Iterable[str] = ()) -> Callable:
    """A decorator adding one click option per field of the dataclass `cls`."""
    options = [_option(cls, f) for f in cli_fields(cls, exclude)]

    def decorate(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return decorate


def config_from(cls: type, kw: dict, *, exclude: Iterable[str] = (), **fixed):
    """An instance of `cls` from the parsed options (popped out of `kw`) and `fixed` values
    for fields that have no option."""
    values = {}
    for f in cli_fields(cls, exclude):
        values[f.name] = kw.pop(f.name)
        old = kw.pop(f.name + ALIAS, None)
        if old is not None:
            if values[f.name] != f.default:
                raise MoxError(f"{flag_of(f)}: given twice (once by its deprecated name)")
            values[f.name] = old
    return cls(**values, **fixed)


def _option(cls: type, field: dataclasses.Field):
    base = _base_type(cls, field.name)
    flag = flag_of(field)
    help_text = field.metadata.get("help", "")
    default = field.metadata.get("cli_default")
    default = field.default if default is None else default
    kwargs: dict = {"default": default, "help": help_text}
    if default is not None:
        kwargs["show_default"] = True
    choices = choices_of(cls, field)
    if choices is not None:
        kwargs["type"] = click.Choice([str(c) for c in choices])
    elif base is bool and default is None:
        flag = f"{flag}/--no-{flag[2:]}"
    elif base is bool:
        kwargs["is_flag"] = True
        kwargs.pop("show_default", None)
    else:
        kwargs["type"] = base
    kwargs["callback"] = _checker(cls, field, flag.split("/")[0])
    return click.option(flag, field.name, **kwargs)


def _base_type(cls: type, name: str) -> type:
    """X for a field annotated X or X | None; str for one that also takes a string (a size
    given as "1GiB" or as bytes: the command line gives strings)."""
    hint = typing.get_type_hints(cls)[name]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
        if str in args:
            return str
    return hint


def _checker(cls: type, field: dataclasses.Field, flag: str):
    def check(ctx, param, value):
        why = problem(cls, field, value)
        if why is not None:
            raise MoxError(f"{flag} {value}: {why}")
        return value

    return check


ALIAS = "__deprecated_alias"


def deprecated_alias(old: str, cls: type, name: str) -> Callable:
    """A hidden option `old` for the field `name` of `cls`, still working (config_from takes
    its value) with a one-line note that the field's flag replaces it."""
    field = next(f for f in dataclasses.fields(cls) if f.name == name)
    new, check = flag_of(field), _checker(cls, field, old)

    def use(ctx, param, value):
        if value is not None:
            click.echo(f"moxkit: warning: {old} is deprecated; use {new}", err=True)
        return check(ctx, param, value)

    base = _base_type(cls, name)
    return click.option(old, name + ALIAS, type=base, default=None, hidden=True,
                        callback=use)  # fmt: skip


# The options every command shares, declared once here with one help text each; what OUT is
# for a command, its description says.


def out_option(required: bool = True) -> Callable:
    """-o/--out OUT."""
    return click.option("-o", "--out", metavar="OUT", required=required,
                        type=click.Path(path_type=str),
                        help="Where the command writes (OUT: see its description).")  # fmt: skip


def force_option(fn):
    """--force."""
    return click.option("--force", is_flag=True, help="Replace OUT if it exists.")(fn)


def output_options(fn):
    """-o/--out and --force, as every command that writes a model has them."""
    return out_option()(force_option(fn))


def quiet_option(fn):
    """--quiet/-q."""
    return click.option("--quiet", "-q", is_flag=True, help="No progress and no summary.")(fn)
