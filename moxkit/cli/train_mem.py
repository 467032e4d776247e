"""`moxkit train-mem`: parse, check, call moxkit.train, print. Also holds the inputs every
training command shares (unlearn uses them), so the flags mean the same everywhere; the
settings' options are generated from the config dataclasses (moxkit.cli.options)."""

from __future__ import annotations

from dataclasses import fields

import click

from moxkit.cli.options import config_from, options_from, output_options, quiet_option
from moxkit.train.config import ExtrapolationConfig, LossConfig, TrainConfig
from moxkit.train.methods import METHODS


def data_options(fn):
    """MODEL, the data, the output and the targeted / continual inputs."""
    path = click.Path(path_type=str)
    options = [
        click.argument("model", type=path),  # a folder or a hub id
        click.option("--forget", required=True, type=path,
                     help="Forget set: JSONL, JSON or Parquet (question/answer, "
                     "prompt/completion or text rows)."),
        click.option("--retain", type=path, default=None,
                     help="Retain set, same formats (for the KL term and retain losses)."),
        output_options,
        click.option("--target-answer", default=None,
                     help="Targeted unlearning: one replacement answer for every forget row."),
        click.option("--target-file", type=path, default=None,
                     help="Targeted unlearning: replacement answers, one row per forget row "
                     "(answer, completion or text field)."),
        click.option("--init-from", type=path, default=None,
                     help="Continual unlearning: start from this θ_mem; θ_ref stays MODEL."),
        click.option("--revision", default=None,
                     help="Branch, tag or commit for MODEL / --init-from given as hub ids "
                     "(org/name; the local cache first, then a download when online)."),
        quiet_option,
    ]  # fmt: skip
    for option in reversed(options):
        fn = option(fn)
    return fn


# train-mem's loss options: those memorization reads (not the baselines' knobs)
MEMORIZE_UNUSED = tuple(
    f.name for f in fields(LossConfig) if f.name not in METHODS["memorize"].allows()
)
EXTRAPOLATION_UNUSED = ("eta", "extrapolate_every", "extrapolate_on")  # only α, for targets


def train_and_loss_options(loss_exclude: tuple[str, ...] = ()):
    def decorate(fn):
        return options_from(TrainConfig)(options_from(LossConfig, exclude=loss_exclude)(fn))

    return decorate


def request_inputs(kw: dict, loss_exclude: tuple[str, ...] = ()) -> dict:
    """The Request fields every training command takes from its parsed options."""
    return {
        "model": kw.pop("model"), "forget": kw.pop("forget"), "retain": kw.pop("retain"),
        "out": kw.pop("out"), "force": kw.pop("force"), "init_from": kw.pop("init_from"),
        "revision": kw.pop("revision"),
        "target_answer": kw.pop("target_answer"), "target_file": kw.pop("target_file"),
        "config": config_from(TrainConfig, kw, progress=not kw["quiet"]),
        "loss": config_from(LossConfig, kw, exclude=loss_exclude),
    }  # fmt: skip


def run_checked(request) -> object:
    """Check everything cheap (no torch yet), then train."""
    checked = request.check()
    from moxkit.train.api import run

    return run(request, checked)


def summary(result, what: str) -> str:
    steps = [r for r in result.log if "event" not in r]
    first, last = (steps[0], steps[-1]) if steps else ({}, {})
    terms = ", ".join(
        f"{k} {first[k]:.4g} → {last[k]:.4g}" for k in last if k not in ("step", "epoch", "lr")
    )
    return f"wrote {what} {result.out} ({result.steps} steps; {terms})"


@click.command("train-mem")
@data_options
@train_and_loss_options(MEMORIZE_UNUSED)
@options_from(ExtrapolationConfig, exclude=EXTRAPOLATION_UNUSED)
def command(**kw) -> None:
    """Train the memorization model θ_mem of MODEL on the forget set (MOX step 1).

    --alpha matters only for targeted memorization (--target-answer/--target-file): the
    replacement answers are learned at (1+α)·MODEL − α·θ_mem. Runs data-parallel unchanged
    under `accelerate launch` or `torchrun -m moxkit.cli.main`."""
    from moxkit.train.request import Request

    inputs = request_inputs(kw, MEMORIZE_UNUSED)
    extrapolation = config_from(ExtrapolationConfig, kw, exclude=EXTRAPOLATION_UNUSED)
    result = run_checked(Request(METHODS["memorize"], extrapolation=extrapolation, **inputs))
    if not kw["quiet"] and result.out is not None:
        click.echo(summary(result, "θ_mem"))
