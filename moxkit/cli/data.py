"""`moxkit data`: built-in data sets."""

from __future__ import annotations

import click

from moxkit.cli.options import force_option


@click.group("data")
def command() -> None:
    """Built-in data sets."""


@command.command("tofu-mini")
@click.argument("out", type=click.Path(path_type=str))
@click.option(
    "--authors",
    default=100,
    show_default=True,
    type=click.IntRange(min=10),
    help="Fictitious authors trained (a tenth as many more are held out).",
)
@click.option("--seed", default=0, show_default=True, type=int)
@force_option
def tofu_mini(out, authors, seed, force) -> None:
    """Write tofu-mini to OUT: TOFU-format QA about fictitious authors (forget01/05/10 splits,
    each with test and validation forget authors, retain, holdout, general facts), MUSE-style
    bios, pretraining text and a BPE tokenizer."""
    import json

    from moxkit.apps.tofu_mini import write

    path = write(out, n_authors=authors, seed=seed, force=force)
    manifest = json.loads((path / "tofu_mini.json").read_text())
    for split, counts in manifest["splits"].items():
        test, val = counts["test"], counts["val"]
        click.echo(
            f"{path / split}: test forget {test['forget']} facts "
            f"({test['forget_authors']} authors), validation (val/) forget {val['forget']} "
            f"facts ({val['forget_authors']} authors); unlearning trains on "
            f"{counts['unlearn_forget']} forget and {counts['unlearn_retain']} retain rows"
        )
