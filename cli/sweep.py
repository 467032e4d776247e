"""`moxkit sweep`: parse, call moxkit.sweep.sweep, print the table and where the plot is."""

from __future__ import annotations

import click


@click.command("sweep")
@click.argument("ref", type=click.Path(path_type=str))
@click.argument("mem", type=click.Path(path_type=str))
@click.option("--alphas", default="0.5,1,2,4,8", show_default=True,
              help="Comma-separated α values to evaluate.")
@click.option("--data", "data_dir", required=True, type=click.Path(path_type=str),
              help="Evaluation directory (see `moxkit eval --help`).")
@click.option("--retain-model", default=None, type=click.Path(path_type=str),
              help="Retain-only model or its `moxkit eval` report: forget quality, and the "
                   "level the rule compares with.")
@click.option("--metric", default="forget_prob", show_default=True,
              type=click.Choice(["forget_prob", "forget_rouge_recall", "knowmem_forget",
                                 "verbmem_forget"]),
              help="Forget metric of the rule: pick the largest utility among the α whose "
                   "metric is at or below the retain-only model's.")
@click.option("-o", "--out", default=None, type=click.Path(path_type=str),
              help="Directory for sweep.json and sweep.png.")
@click.option("--on-disk/--in-memory", default=None,
              help="Extrapolate through the streaming engine into a scratch directory, or in "
                   "memory (default: in memory when three copies fit in 2 GiB).")
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--max-items", default=None, type=click.IntRange(min=1),
              help="Evaluate at most this many rows of each set but the forget set.")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda or auto.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def command(ref, mem, alphas, data_dir, retain_model, metric, out, on_disk, batch_size,
            max_items, device, quiet) -> None:
    """Evaluate the forget model (1+α)·REF − α·MEM at each α and pick one."""
    from moxkit.eval.evaluate import EvalConfig
    from moxkit.sweep import parse_alphas, sweep

    result = sweep(ref, mem, parse_alphas(alphas), data_dir, retain_model=retain_model, out=out,
                   cfg=EvalConfig(batch_size=batch_size, max_items=max_items), metric=metric,
                   on_disk=on_disk, device=device, progress=not quiet)
    click.echo(result.table())
    if result.picked is None:
        why = "no retain-only model given" if not retain_model else "no α qualifies"
        click.echo(f"picked: none ({why}; rule: {result.rule})")
    else:
        click.echo(f"picked: α = {result.picked:g} ({result.rule})")
    if result.plot:
        click.echo(f"plot: {result.plot}\nreport: {result.report}")
