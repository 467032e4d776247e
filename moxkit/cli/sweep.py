"""`moxkit sweep`: parse, call moxkit.apps.sweep.sweep, print the table and where the plot is."""

from __future__ import annotations

import click

from moxkit.apps.sweep import FORGET_METRICS, STUDY_ALPHAS
from moxkit.cli.evaluate import evaluation_options
from moxkit.cli.options import config_from, force_option, options_from, out_option
from moxkit.eval.config import EvalConfig
from moxkit.train.config import MatchConfig


@click.command("sweep")
@click.argument("ref", type=click.Path(path_type=str))
@click.argument("mem", type=click.Path(path_type=str))
@click.option(
    "--alphas",
    default=STUDY_ALPHAS,
    show_default=True,
    help="α values: comma-separated numbers and START:STOP:STEP ranges (STOP "
    "included), e.g. 0.5,1:8:0.5.",
)
@click.option(
    "--metric",
    default="forget_prob",
    show_default=True,
    type=click.Choice(FORGET_METRICS),
    help="Forget metric of the rule: pick the largest utility among the α whose "
    "metric is at or below the retain-only model's.",
)
@out_option(required=False)
@force_option
@click.option(
    "--on-disk/--in-memory",
    default=None,
    help="Extrapolate through the streaming engine into a scratch folder, or in "
    "memory (default: in memory when three copies fit in 2 GiB).",
)
@options_from(MatchConfig)
@evaluation_options
def command(
    ref,
    mem,
    alphas,
    data_dir,
    retain_model,
    metric,
    out,
    force,
    on_disk,
    revision,
    device,
    quiet,
    **kw,
) -> None:
    """Evaluate the forget model (1+α)·REF − α·MEM at each α and pick one.

    With -o, sweep.json and sweep.png are written into the folder OUT (--force replaces
    them)."""
    from moxkit.apps.sweep import parse_alphas, sweep

    match = config_from(MatchConfig, kw)
    result = sweep(
        ref,
        mem,
        parse_alphas(alphas),
        data_dir,
        retain_model=retain_model,
        out=out,
        force=force,
        cfg=config_from(EvalConfig, kw),
        metric=metric,
        on_disk=on_disk,
        device=device,
        progress=not quiet,
        revision=revision,
        match=match,
    )
    click.echo(result.table())
    if result.match is not None:
        m = result.match
        click.echo(f"matched: α = {m['strength']:.6g}; level {m['level']:.4f} for target "
                   f"{m['target']:.4f} (gap {m['gap']:+.2g} nats, {m['evaluations']} "
                   "evaluations)")  # fmt: skip
    if result.picked is None:
        why = "no retain-only model given" if not retain_model else "no α qualifies"
        click.echo(f"picked: none ({why}; rule: {result.rule})")
    else:
        click.echo(f"picked: α = {result.picked:g} ({result.rule})")
    if result.plot:
        click.echo(f"plot: {result.plot}\nreport: {result.report}")
