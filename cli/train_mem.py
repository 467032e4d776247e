"""`moxkit train-mem`: parse, call moxkit.train.train_mem, print. Also holds the options every
training command shares (unlearn imports them), so the flags mean the same everywhere."""

from __future__ import annotations

import click

from moxkit.train.config import TrainConfig

_DEFAULTS = TrainConfig()


def training_options(fn):
    """Data, objective and hyperparameter flags shared by train-mem and unlearn."""
    options = [
        click.argument("model", type=click.Path(path_type=str)),
        click.option(
            "--forget",
            required=True,
            type=click.Path(path_type=str),
            help="Forget set: JSONL, JSON or Parquet (question/answer, "
            "prompt/completion or text rows).",
        ),
        click.option(
            "--retain",
            type=click.Path(path_type=str),
            default=None,
            help="Retain set, same formats (for the KL term and retain losses).",
        ),
        click.option(
            "-o",
            "--out",
            required=True,
            type=click.Path(path_type=str),
            help="Output model directory.",
        ),
        click.option(
            "--objective",
            type=click.Choice(["nll", "npo"]),
            default="nll",
            show_default=True,
            help="Memorization loss on the forget set.",
        ),
        click.option(
            "--kl-weight",
            type=float,
            default=1.0,
            show_default=True,
            help="λ: weight of KL(θ_ref ‖ θ) on retain answers.",
        ),
        click.option("--npo-beta", type=float, default=0.1, show_default=True, help="NPO β."),
        click.option(
            "--npo-floor",
            type=float,
            default=None,
            help="Floor of the per-row negated NPO loss (default: where the log "
            "likelihood ratio reaches 20).",
        ),
        click.option(
            "--target-answer",
            default=None,
            help="Targeted unlearning: one replacement answer for every forget row.",
        ),
        click.option(
            "--target-file",
            type=click.Path(path_type=str),
            default=None,
            help="Targeted unlearning: replacement answers, one row per forget row "
            "(answer, completion or text field).",
        ),
        click.option(
            "--init-from",
            type=click.Path(path_type=str),
            default=None,
            help="Continual unlearning: start from this θ_mem; θ_ref stays MODEL.",
        ),
        click.option(
            "--chat-template",
            is_flag=True,
            help="Format prompts with the tokenizer's chat template.",
        ),
        click.option("--epochs", type=float, default=_DEFAULTS.epochs, show_default=True),
        click.option(
            "--max-steps",
            type=int,
            default=None,
            help="Stop after this many optimizer steps (overrides --epochs).",
        ),
        click.option("--lr", type=float, default=_DEFAULTS.lr, show_default=True),
        click.option(
            "--batch-size",
            type=int,
            default=_DEFAULTS.batch_size,
            show_default=True,
            help="Effective (global) batch, whatever the number of processes.",
        ),
        click.option("--grad-accum", type=int, default=_DEFAULTS.grad_accum, show_default=True),
        click.option(
            "--weight-decay", type=float, default=_DEFAULTS.weight_decay, show_default=True
        ),
        click.option(
            "--warmup-epochs",
            type=float,
            default=_DEFAULTS.warmup_epochs,
            show_default=True,
            help="Linear warm-up, then linear decay.",
        ),
        click.option("--max-length", type=int, default=_DEFAULTS.max_length, show_default=True),
        click.option("--seed", type=int, default=_DEFAULTS.seed, show_default=True),
        click.option(
            "--bf16/--no-bf16",
            default=None,
            help="bf16 autocast (default: where the device supports it).",
        ),
        click.option("--gradient-checkpointing", is_flag=True),
        click.option(
            "--lora",
            type=int,
            default=None,
            help="Train LoRA adapters of this rank (needs peft); the reference is "
            "the base model with adapters disabled.",
        ),
        click.option("--force", is_flag=True, help="Replace OUT if it exists."),
        click.option("--quiet", "-q", is_flag=True, help="No progress and no summary line."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def config_from(kw: dict) -> TrainConfig:
    """Pop the hyperparameter flags out of the parsed options into a TrainConfig."""
    return TrainConfig(
        epochs=kw.pop("epochs"),
        lr=kw.pop("lr"),
        batch_size=kw.pop("batch_size"),
        grad_accum=kw.pop("grad_accum"),
        weight_decay=kw.pop("weight_decay"),
        warmup_epochs=kw.pop("warmup_epochs"),
        max_length=kw.pop("max_length"),
        seed=kw.pop("seed"),
        max_steps=kw.pop("max_steps"),
        chat_template=kw.pop("chat_template"),
        bf16=kw.pop("bf16"),
        gradient_checkpointing=kw.pop("gradient_checkpointing"),
        lora=kw.pop("lora"),
        progress=not kw["quiet"],
    )


def target_from(kw: dict):
    """--target-answer TEXT or --target-file PATH (one replacement answer per forget row)."""
    from moxkit.errors import MoxError
    from moxkit.text import load_answers

    text, path = kw.pop("target_answer"), kw.pop("target_file")
    if text is not None and path is not None:
        raise MoxError("--target-answer and --target-file: give one, not both")
    return load_answers(path, "--target-file") if path is not None else text


def summary(result, what: str) -> str:
    steps = [r for r in result.log if "event" not in r]
    first, last = (steps[0], steps[-1]) if steps else ({}, {})
    terms = ", ".join(
        f"{k} {first[k]:.4g} → {last[k]:.4g}" for k in last if k not in ("step", "epoch", "lr")
    )
    return f"wrote {what} {result.out} ({result.steps} steps; {terms})"


@click.command("train-mem")
@training_options
def command(**kw) -> None:
    """Train the memorization model θ_mem of MODEL on the forget set (MOX step 1).

    Runs data-parallel unchanged under `accelerate launch` or `torchrun -m moxkit.cli.main`."""
    from moxkit.train import train_mem

    config = config_from(kw)
    target = target_from(kw)
    result = train_mem(
        kw["model"],
        kw["forget"],
        kw["retain"],
        kw["out"],
        config=config,
        objective=kw["objective"],
        kl_weight=kw["kl_weight"],
        npo_beta=kw["npo_beta"],
        npo_floor=kw["npo_floor"],
        target_answer=target,
        init_from=kw["init_from"],
        force=kw["force"],
    )
    if not kw["quiet"] and result.out is not None:
        click.echo(summary(result, "θ_mem"))
