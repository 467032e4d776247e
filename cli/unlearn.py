"""`moxkit unlearn`: parse, call moxkit.train.unlearn, print."""

from __future__ import annotations

import click
from moxkit.cli.train_mem import config_from, summary, target_from, training_options

from moxkit.train.api import METHODS


@click.command("unlearn")
@training_options
@click.option("--method", type=click.Choice(METHODS), default="mox", show_default=True)
@click.option(
    "--alpha",
    type=float,
    default=4.0,
    show_default=True,
    help="Extrapolation strength α (mox, task-vector).",
)
@click.option(
    "--momentum",
    "eta",
    type=float,
    default=None,
    help="MOX-Mo: weight η of the newest extrapolation (paper: 0.675).",
)
@click.option(
    "--extrapolate-every",
    type=int,
    default=None,
    help="Momentum updates every K optimizer steps (default: each epoch).",
)
@click.option(
    "--extrapolate-on",
    type=click.Choice(["auto", "memory", "disk"]),
    default="auto",
    show_default=True,
    help="Hold θ_ref/θ_for in RAM, or stream them through `moxkit extrapolate` on "
    "disk (auto: disk when two fp32 copies do not fit, or under FSDP/DeepSpeed).",
)
@click.option(
    "--save-mem",
    type=click.Path(path_type=str),
    default=None,
    help="Also keep θ_mem here (mox, task-vector), e.g. for an α sweep.",
)
def command(**kw) -> None:
    """Unlearn the forget set from MODEL with MOX or a baseline (ga, graddiff, npo,
    task-vector), writing the forget model to OUT."""
    from moxkit.train import unlearn

    config = config_from(kw)
    target = target_from(kw)
    result = unlearn(
        kw["model"],
        kw["forget"],
        kw["retain"],
        kw["out"],
        method=kw["method"],
        alpha=kw["alpha"],
        momentum_eta=kw["eta"],
        extrapolate_every=kw["extrapolate_every"],
        config=config,
        objective=kw["objective"],
        kl_weight=kw["kl_weight"],
        npo_beta=kw["npo_beta"],
        npo_floor=kw["npo_floor"],
        target_answer=target,
        init_from=kw["init_from"],
        save_mem=kw["save_mem"],
        extrapolate_on=kw["extrapolate_on"],
        force=kw["force"],
    )
    if not kw["quiet"] and result.out is not None:
        click.echo(summary(result, f"forget model ({kw['method']})"))
