"""`moxkit data`: built-in data sets."""

from __future__ import annotations

import click


@click.group("data")
def command() -> None:
    """Built-in data sets."""


@command.command("tofu-mini")
@click.argument("out", type=click.Path(path_type=str))
@click.option("--authors", default=100, show_default=True, type=click.IntRange(min=10),
              help="Fictitious authors trained (a tenth as many more are held out).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def tofu_mini(out, authors, seed, force) -> None:
    """Write tofu-mini to OUT: TOFU-format QA about fictitious authors (forget01/05/10 splits,
    retain, holdout, general facts), MUSE-style bios, pretraining text and a word tokenizer."""
    import json

    from moxkit.tofu_mini import write

    path = write(out, n_authors=authors, seed=seed, force=force)
    manifest = json.loads((path / "tofu_mini.json").read_text())
    for split, counts in manifest["splits"].items():
        click.echo(f"{path / split}: forget {counts['forget']} rows "
                   f"({counts['forget_authors']} authors), retain {counts['retain']}, "
                   f"holdout {counts['holdout']}, general {counts['general']}")
