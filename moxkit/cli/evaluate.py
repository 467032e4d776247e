"""`moxkit eval`: parse, call moxkit.eval.evaluate, print the table, write the JSON report."""

from __future__ import annotations

import click

from moxkit.cli.options import config_from, force_option, options_from, out_option, quiet_option
from moxkit.eval.config import EvalConfig

_DATA_HELP = (
    "Evaluation folder: TOFU's released files (forget10_perturbed.json, retain_perturbed.json, "
    "...), MUSE's data/<corpus> folder (knowmem, verbmem, privleak), or a moxkit/tofu-mini "
    "split (forget.jsonl, ...). The layout is detected and the files read are listed."
)
_RETAIN_HELP = (
    "The retain-only model (folder or hub id) or its `moxkit eval` report (.json): forget "
    "quality and PrivLeak compare with it."
)


def evaluation_options(fn):
    """The options of every command that evaluates (eval, sweep): the data, the retain-only
    model, every EvalConfig setting, hub revision, device and quiet."""
    decorators = [
        click.option("--data", "data_dir", required=True, type=click.Path(path_type=str),
                     help=_DATA_HELP),
        click.option("--retain-model", default=None, type=click.Path(path_type=str),
                     help=_RETAIN_HELP),
        options_from(EvalConfig),
        click.option("--revision", default=None,
                     help="Branch, tag or commit for models given as hub ids (org/name[@rev])."),
        click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto."),
        quiet_option,
    ]  # fmt: skip
    for decorate in reversed(decorators):
        fn = decorate(fn)
    return fn


@click.command("eval")
@click.argument("model", type=click.Path(path_type=str))
@out_option(required=False)
@force_option
@evaluation_options
def command(model, out, force, data_dir, retain_model, revision, device, quiet, **kw) -> None:
    """TOFU and MUSE metrics of MODEL (a folder or a hub id) on the sets in --data.

    With -o, the JSON report (per item and summary) is also written to the file OUT (never
    an input, never a folder)."""
    from moxkit.eval.data import preflight

    cfg = config_from(EvalConfig, kw)
    # before torch is imported: the inputs, and that -o can be written and touches none
    preflight(model, data_dir, retain_model, cfg, revision, out=out, force=force)

    from moxkit.eval.evaluate import evaluate
    from moxkit.eval.report import summary_table

    report = evaluate(
        model,
        data_dir,
        retain_model=retain_model,
        cfg=cfg,
        device=device,
        progress=not quiet,
        revision=revision,
        out=out,
        force=force,
    )
    click.echo(summary_table(report))
    if out:
        click.echo(f"report: {out}")
