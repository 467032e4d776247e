"""What a training run is told, as three dataclasses with the paper's defaults, shared by every
method so that MOX and the baselines are compared under the same settings. Each field carries
its help and bounds (moxkit.fields): the library checks values by these names and the CLI
generates its options from them, so no setting is declared twice."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

from moxkit.engine.formula import PAPER_ETA, check_alpha, check_eta
from moxkit.errors import InputError
from moxkit.fields import check, setting


@dataclass
class TrainConfig:
    """How to train. `batch_size` is the effective (global) batch: one optimizer step sees
    `batch_size` forget rows whatever the number of processes, each process taking
    batch_size / (world_size × grad_accum) rows per forward pass, so the same command gives the
    same run on one device or eight."""

    epochs: float = setting(10.0, "Training epochs over the forget set.", above=0)
    lr: float = setting(1e-5, "Peak learning rate (AdamW).", above=0)
    batch_size: int = setting(
        32, "Effective (global) batch, whatever the number of processes.", minimum=1
    )
    grad_accum: int = setting(1, "Gradient accumulation steps per optimizer step.", minimum=1)
    weight_decay: float = setting(0.01, "AdamW weight decay.", minimum=0)
    warmup_epochs: float = setting(1.0, "Linear warm-up, then linear decay.", minimum=0)
    max_length: int = setting(512, "Rows are cut to this many tokens.", minimum=2)
    seed: int = setting(0, "Seed of the data order (and of LoRA's initialisation).")
    max_steps: int | None = setting(
        None, "Stop after this many optimizer steps (overrides --epochs).", minimum=1
    )
    chat_template: bool = setting(False, "Format prompts with the tokenizer's chat template.")
    bf16: bool | None = setting(
        None,
        "bf16 autocast, fp32 master weights (default: on CUDA where supported; on a CPU "
        "only if asked, and only with AVX512-BF16 or AMX-BF16).",
    )
    reference: Literal["auto", "stored", "bf16"] = setting(
        "auto",
        "How the frozen reference θ_ref is held: a copy in MODEL's stored dtype, or with its "
        "linear weights in bf16 under bf16 autocast (half an fp32 copy; the same logits when "
        "training under bf16 autocast, so auto picks it then). With --lora the reference is "
        "the base model with adapters disabled (no copy).",
    )
    gradient_checkpointing: bool = setting(False, "Recompute activations to save memory.")
    lora: int | None = setting(
        None,
        "Train LoRA adapters of this rank (needs peft); the reference is the base model "
        "with adapters disabled.",
        minimum=1,
    )
    merge: bool = setting(
        False,
        "With --lora: hand back a full model (train-mem: θ_mem merged; unlearn: the forget "
        "model, base + forget adapter streamed) instead of the adapter (default: θ_mem's "
        "adapter, or the forget adapter θ_ref − α·s·B·A).",
    )
    progress: bool = setting(True, "Show progress.", cli=False)

    def validate(self) -> None:
        check(self)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LossConfig:
    """The loss terms' knobs. Which terms a method uses is the METHODS table's business
    (moxkit.train.methods); a knob a method does not use is refused there."""

    objective: Literal["nll", "npo"] = setting(
        "nll", "Memorization loss on the forget set: NLL, or the negated (floored) NPO loss."
    )
    kl_weight: float = setting(
        1.0, "λ: weight of KL(θ_ref ‖ θ) on retain rows (MOX's memorization).", minimum=0
    )
    kl_positions: Literal["all", "answer"] = setting(
        "all",
        "Retain positions the KL averages over: every token of the row, as TOFU and "
        "open-unlearning do (the question's names are protected too), or the answer only.",
    )
    retain_weight: float = setting(
        1.0, "Weight of the retain NLL of graddiff, npo and simnpo.", minimum=0
    )
    npo_beta: float = setting(0.1, "NPO β.", above=0)
    npo_floor: float | None = setting(
        None,
        "Floor of the per-row negated NPO loss (default: where the log likelihood ratio "
        "reaches 20).",
    )
    simnpo_beta: float = setting(4.5, "SimNPO β.", above=0)
    simnpo_gamma: float = setting(0.0, "SimNPO margin γ.", minimum=0)
    target_weight: float = setting(
        1.0,
        "Targeted MOX: weight of the replacement answers' NLL at the extrapolated model.",
        above=0,
    )

    def validate(self) -> None:
        check(self)


@dataclass
class ExtrapolationConfig:
    """θ_for = (1+α)·θ_ref − α·θ_mem, and its momentum form (MOX-Mo)."""

    alpha: float = setting(4.0, "Extrapolation strength α.", above=0)
    eta: float | None = setting(
        None,
        f"MOX-Mo: weight η of the newest extrapolation, in (0, 1] (paper: {PAPER_ETA}); "
        "none: plain MOX.",
        above=0,
        maximum=1,
    )
    extrapolate_every: int | None = setting(
        None,
        "MOX-Mo: extrapolate every K optimizer steps (default: a quarter of the run, "
        "so four ticks).",
        minimum=1,
    )
    extrapolate_on: Literal["auto", "memory", "disk"] = setting(
        "auto",
        "Hold θ_ref/θ_for in RAM, or stream them through `moxkit extrapolate` on disk "
        "(auto: disk when two fp32 copies do not fit, or under FSDP/DeepSpeed).",
    )

    def validate(self) -> None:
        check(self)
        check_alpha(self.alpha, "alpha")
        if self.eta is not None:
            check_eta(self.eta, "eta")


@dataclass
class MatchConfig:
    """Matched forgetting (moxkit.matching): instead of a strength chosen by hand, the point
    where the forget model's level on validation forget rows reaches a target. MOX: α, by
    bisection; a baseline: training stops at the first optimizer step at or past the target
    and the output lies between that step and the one before."""

    match_rows: str | None = setting(  # the API also takes rows given directly
        None,
        "Validation forget rows (JSONL/JSON/Parquet, as --forget); their mean answer "
        "log-probability is the forget level. With --match-target: MOX's α, or where a "
        "baseline stops, is found to reach it (--alpha is then not given).",
    )
    match_target: str | None = setting(
        None,
        "The level to reach: a number (nats), model:PATH (that model's level on the rows, "
        "e.g. a retain-only model) or unknown:FILE (MODEL's own level on rows it does not "
        "know).",
    )

    @property
    def active(self) -> bool:
        return self.match_rows is not None or self.match_target is not None

    def validate(self) -> None:
        check(self)
        if self.active and (self.match_rows is None or self.match_target is None):
            raise InputError("match_rows and match_target: give both, or neither",
                             params=("match_rows", "match_target"))  # fmt: skip
        if self.match_target is not None:
            parse_target(self.match_target)


def parse_target(spec: str) -> tuple[str, float | str]:
    """("level", x), ("model", PATH) or ("unknown", FILE) from a match_target."""
    kind, sep, rest = spec.partition(":")
    if sep and kind in ("model", "unknown"):
        if not rest:
            raise InputError(
                f"match_target {spec!r}: {kind}: needs a path", params=("match_target",)
            )
        return kind, rest
    try:
        level = float(spec)
    except ValueError:
        raise InputError(
            f"match_target {spec!r}: expected a number, model:PATH or unknown:FILE",
            params=("match_target",),
        ) from None
    if not math.isfinite(level):
        raise InputError(
            f"match_target {spec!r}: must be a finite number", params=("match_target",)
        )
    return "level", level
