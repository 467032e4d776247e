"""`moxkit unlearn`: parse, check, call moxkit.train, print."""

from __future__ import annotations

import click

from moxkit.cli.options import config_from, deprecated_alias, options_from
from moxkit.cli.train_mem import (
    data_options,
    request_inputs,
    run_checked,
    summary,
    train_and_loss_options,
)
from moxkit.train.config import ExtrapolationConfig, MatchConfig
from moxkit.train.methods import METHODS, UNLEARN_METHODS


def _methods_help() -> str:
    return "; ".join(f"{name}: {METHODS[name].summary}" for name in UNLEARN_METHODS)


@click.command("unlearn")
@data_options
@click.option(
    "--method",
    type=click.Choice(UNLEARN_METHODS),
    default="mox",
    show_default=True,
    help=_methods_help(),
)
@train_and_loss_options()
@options_from(ExtrapolationConfig)
@deprecated_alias("--momentum", ExtrapolationConfig, "eta")
@options_from(MatchConfig)
@click.option(
    "--save-mem",
    type=click.Path(path_type=str),
    default=None,
    help="Also keep θ_mem here (mox, task-vector), e.g. for an α sweep.",
)
def command(**kw) -> None:
    """Unlearn the forget set from MODEL with MOX or a baseline, writing the forget model to
    OUT. Options a method does not use are refused."""
    from moxkit.train.methods import get_method
    from moxkit.train.request import Request

    match = config_from(MatchConfig, kw)
    source = click.get_current_context().get_parameter_source("alpha")
    if match.active and source is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError("--alpha and --match-rows: give one (matching finds α)")
    inputs = request_inputs(kw)
    request = Request(get_method(kw["method"]), extrapolation=config_from(ExtrapolationConfig, kw),
                      save_mem=kw["save_mem"], match=match, **inputs)  # fmt: skip
    result = run_checked(request)
    if not kw["quiet"] and result.out is not None:
        click.echo(summary(result, f"forget model ({kw['method']})"))
    if not kw["quiet"] and result.match is not None:
        m = result.match
        where = f"α = {m['strength']:.6g}"
        if "step" in m:
            where = f"steps {m['step'] - 1} to {m['step']} at s = {m['strength']:.4g}"
        click.echo(f"matched: {where}; level {m['level']:.4f} for target {m['target']:.4f} "
                   f"(gap {m['gap']:+.2g} nats, {m['evaluations']} evaluations)")  # fmt: skip
