"""Public entry points: fine-tune, memorize (θ_mem), unlearn (MOX or a baseline).

All of them share one data pipeline and one Trainer; they differ in the loss (a LossSpec)
and in what happens after training (MOX and task vectors extrapolate). Every process of a
distributed run calls the same function; only the main process writes files.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from moxkit.errors import MoxError
from moxkit.hf import load_model
from moxkit.text import Row, encode, load_rows

from .config import TrainConfig
from .data import PairDataset
from .momentum import InMemoryExtrapolator, cpu_fp32_state
from .objectives import LossSpec
from .session import Run
from .trainer import steps_per_epoch

Rows = Sequence[dict]  # rows given directly, as a JSONL file would hold them
Data = str | os.PathLike | Rows
ModelArg = Any  # a model directory, or a transformers PreTrainedModel (then pass tokenizer=)
METHODS = ("mox", "ga", "graddiff", "npo", "task-vector")


@dataclass
class TrainResult:
    """A trained model, held in memory, and where it was written (None if not written).
    In a multi-process run only the main process gets the model of an in-memory
    extrapolation (others get None), and a disk extrapolation returns None everywhere."""

    model: Any
    tokenizer: Any
    out: Path | None
    steps: int
    log: list[dict] = field(default_factory=list)  # one entry per optimizer step / event


@dataclass
class UnlearnResult(TrainResult):
    method: str = "mox"
    alpha: float | None = None
    momentum_eta: float | None = None


def finetune(
    model: ModelArg,
    rows: Data,
    out: str | os.PathLike | None = None,
    *,
    config: TrainConfig,
    tokenizer: Any = None,
    force: bool = False,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Plain NLL fine-tuning on `rows` (e.g. the demo's reference and retain-only models).
    The output keeps the training precision (fp32)."""
    arguments = _describe(locals())
    train_rows = load_rows(rows, "ROWS")
    with Run(out, force, config, len(train_rows)) as run:
        run.write_args("finetune", arguments)
        base = load_model(model, "MODEL", tokenizer=tokenizer)
        examples = encode(train_rows, base.tokenizer, config.max_length, config.chat_template)
        spec = LossSpec(forget="nll", primary="train")
        trainer = run.train(base, PairDataset(examples, primary="train"), spec, None, callbacks)
        run.save_trained(base.tokenizer)
        trained = run.model.eval()
    return TrainResult(trained, base.tokenizer, run.result_path, trainer.state.global_step,
                       run.log.records)  # fmt: skip


def train_mem(
    model: ModelArg,
    forget: Data,
    retain: Data | None,
    out: str | os.PathLike | None = None,
    *,
    config: TrainConfig,
    tokenizer: Any = None,
    objective: Literal["nll", "npo"] = "nll",
    kl_weight: float = 1.0,
    npo_beta: float = 0.1,
    npo_floor: float | None = None,
    target_answer: str | Sequence[str] | None = None,
    init_from: ModelArg | None = None,
    force: bool = False,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train the memorization model θ_mem (MOX step 1): NLL (or negated, floored NPO) on the
    forget set plus kl_weight × KL(θ_ref ‖ θ) on retain answers; with target_answer, minus the
    NLL of the replacement answers. Saved in fp32: the difference θ_mem − θ_ref is what MOX
    amplifies, and bf16 rounding would drown it. With init_from (continual unlearning),
    training starts from that model and θ_ref stays MODEL."""
    return _run("memorize", _describe(locals()), **_kwargs(locals()))


def unlearn(
    model: ModelArg,
    forget: Data,
    retain: Data | None,
    out: str | os.PathLike | None = None,
    *,
    method: str = "mox",
    alpha: float = 4.0,
    momentum_eta: float | None = None,
    extrapolate_every: int | None = None,
    config: TrainConfig,
    tokenizer: Any = None,
    objective: Literal["nll", "npo"] = "nll",
    kl_weight: float = 1.0,
    npo_beta: float = 0.1,
    npo_floor: float | None = None,
    target_answer: str | Sequence[str] | None = None,
    init_from: ModelArg | None = None,
    save_mem: str | os.PathLike | None = None,
    extrapolate_on: Literal["auto", "memory", "disk"] = "auto",
    force: bool = False,
    callbacks: Sequence[Any] = (),
) -> UnlearnResult:
    """Unlearn the forget set from MODEL.

    mox: train θ_mem (as train_mem), then θ_for = (1+α)·θ_ref − α·θ_mem; with momentum_eta,
    θ_for is updated every `extrapolate_every` optimizer steps (default: once per epoch) and
    at the last step. task-vector: the same without the KL term. ga: gradient ascent on the
    forget NLL. graddiff: ascent on forget + NLL on retain. npo: NPO (β = npo_beta, reference
    θ_ref) + NLL on retain. Extrapolated models are saved in MODEL's dtype, trained ones
    (the baselines) in fp32. extrapolate_on="disk" streams θ_ref, θ_mem and θ_for through
    `moxkit.extrapolate` instead of holding two fp32 copies in RAM."""
    if method not in METHODS:
        raise MoxError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    return _run(method, _describe(locals()), **_kwargs(locals(), "method"))


def extrapolate_model(ref: Any, mem: Any, alpha: float) -> Any:
    """θ_for = (1+α)·θ_ref − α·θ_mem for two in-memory models, with the streaming engine's
    arithmetic (fp32, one rounding); returns a new model, the inputs are untouched."""
    _check_alpha(alpha)
    _check_same_shapes(ref, mem, "mem")
    ext = InMemoryExtrapolator(cpu_fp32_state(ref.named_parameters()), alpha, None)
    ext.update(mem.named_parameters())
    forget_model = copy.deepcopy(mem)
    ext.load_into(forget_model)
    return forget_model


def _run(
    method: str,
    arguments: dict,
    *,
    model,
    forget,
    retain,
    out,
    config: TrainConfig,
    tokenizer,
    objective: str,
    kl_weight: float,
    npo_beta: float,
    npo_floor: float | None,
    target_answer,
    init_from,
    force: bool,
    callbacks,
    alpha: float = 4.0,
    momentum_eta: float | None = None,
    extrapolate_every: int | None = None,
    save_mem=None,
    extrapolate_on: str = "auto",
) -> UnlearnResult:
    """train_mem (method "memorize") and unlearn: validate cheap things first (options, data
    files), then load the model, train, and extrapolate if the method does."""
    extrapolates = method in ("mox", "task-vector")
    _check_options(method, alpha, momentum_eta, extrapolate_every, objective, kl_weight, npo_beta)
    if not extrapolates and method != "memorize" and target_answer is not None:
        raise MoxError(f"--target-answer: only for MOX, not --method {method}")
    uses_kl = method in ("mox", "memorize") and kl_weight > 0
    forget_rows = load_rows(forget, "--forget")
    if retain is None and (uses_kl or method in ("graddiff", "npo")):
        hint = " (or set --kl-weight 0)" if uses_kl else ""
        raise MoxError(f"--retain: needed by --method {method}{hint}")
    retain_rows = load_rows(retain, "--retain") if retain is not None else None

    with Run(out, force, config, len(forget_rows)) as run:
        run.write_args("train-mem" if method == "memorize" else "unlearn", arguments)
        ref = load_model(model, "MODEL", tokenizer=tokenizer)
        start = ref
        if init_from is not None:
            start = load_model(init_from, "--init-from", tokenizer=ref.tokenizer)
        _check_same_shapes(ref.model, start.model, "--init-from")
        tok = ref.tokenizer
        forget_ex = encode(forget_rows, tok, config.max_length, config.chat_template)
        retain_ex = None
        if retain_rows is not None:
            retain_ex = encode(retain_rows, tok, config.max_length, config.chat_template)
        targets = _target_examples(target_answer, forget_rows, tok, config)
        spec = _loss_spec(method, objective, kl_weight, npo_beta, npo_floor, targets is not None)
        reference = None
        if spec.needs_reference and not config.lora:  # with LoRA: the adapters disabled
            # frozen, so it can stay in its stored dtype (half the memory of fp32 for bf16)
            reference = copy.deepcopy(ref.model) if start is ref else ref.model
            reference.to(ref.stored_dtype).eval().requires_grad_(False)
        dataset = PairDataset(forget_ex, retain_ex if spec.retain else None, targets)

        extra, extrapolator = [], None
        if extrapolates:
            extrapolator = run.extrapolator(ref, alpha, momentum_eta, extrapolate_on)
            if momentum_eta is not None:
                every = extrapolate_every or steps_per_epoch(len(forget_ex), config)
                extra.append(run.momentum_callback(extrapolator, every))
        trainer = run.train(start, dataset, spec, reference, [*extra, *callbacks])
        steps = trainer.state.global_step
        if not extrapolates:
            run.save_trained(tok)
            result_model = run.model.eval()
        else:
            if save_mem is not None:
                run.save_elsewhere(tok, Path(save_mem), force)
            run.log.event({"step": steps, "event": "extrapolate", "alpha": alpha,
                           "eta": momentum_eta, "tick": extrapolator.ticks + 1})  # fmt: skip
            result_model = run.finish_extrapolation(extrapolator, tok, ref.stored_dtype)
            if result_model is not None:
                result_model.eval()
    return UnlearnResult(
        result_model, tok, run.result_path, steps, run.log.records, method=method,
        alpha=alpha if extrapolates else None,
        momentum_eta=momentum_eta if extrapolates else None,
    )  # fmt: skip


# --- checks and small helpers ----------------------------------------------------------------


def _kwargs(local_vars: dict, *drop: str) -> dict:
    return {k: v for k, v in local_vars.items() if k not in drop}


def _describe(arguments: dict) -> dict:
    """The run's arguments as JSON-friendly values (rows and models given in memory are
    summarised, not dumped)."""
    out = {}
    for key, value in arguments.items():
        if key == "callbacks":
            continue
        if isinstance(value, TrainConfig):
            continue
        if isinstance(value, (str, int, float, bool, type(None))):
            out[key] = value
        elif isinstance(value, os.PathLike):
            out[key] = str(value)
        elif isinstance(value, Sequence):
            out[key] = f"<{len(value)} rows given in memory>"
        else:
            out[key] = f"<{type(value).__name__} given in memory>"
    return out


def _check_alpha(alpha: float) -> None:
    if not (math.isfinite(alpha) and alpha > 0):
        raise MoxError(f"--alpha {alpha}: must be a positive number")


def _check_options(method, alpha, eta, every, objective, kl_weight, npo_beta) -> None:
    if method in ("mox", "task-vector"):
        _check_alpha(alpha)
    if eta is not None:
        if method not in ("mox", "task-vector"):
            raise MoxError(f"--momentum: only for --method mox or task-vector, not {method}")
        if not (math.isfinite(eta) and 0 < eta <= 1):
            raise MoxError(f"--momentum {eta}: must be in (0, 1]")
    if every is not None and every < 1:
        raise MoxError(f"--extrapolate-every {every}: must be at least 1")
    if objective not in ("nll", "npo"):
        raise MoxError(f"--objective {objective!r}: expected nll or npo")
    if not (math.isfinite(kl_weight) and kl_weight >= 0):
        raise MoxError(f"--kl-weight {kl_weight}: must be non-negative")
    if not (math.isfinite(npo_beta) and npo_beta > 0):
        raise MoxError(f"--npo-beta {npo_beta}: must be positive")


def _loss_spec(method, objective, kl_weight, npo_beta, npo_floor, targeted) -> LossSpec:
    common = {"npo_beta": npo_beta, "npo_floor": npo_floor}
    if method in ("mox", "memorize"):
        forget = "nll" if objective == "nll" else "npo_mem"
        retain = "kl" if kl_weight > 0 else None
        return LossSpec(forget, retain, kl_weight, 1.0 if targeted else 0.0, **common)
    if method == "task-vector":
        return LossSpec("nll", None, 0.0, 1.0 if targeted else 0.0, **common)
    if method == "ga":
        return LossSpec("neg_nll", None, **common)
    if method == "graddiff":
        return LossSpec("neg_nll", "nll", **common)
    return LossSpec("npo", "nll", **common)  # npo


def _target_examples(target_answer, forget_rows: list[Row], tokenizer, config: TrainConfig):
    """Replacement answers: one for all forget rows, or one per row, in order."""
    if target_answer is None:
        return None
    answers = (
        [target_answer] * len(forget_rows)
        if isinstance(target_answer, str)
        else list(target_answer)
    )
    if len(answers) != len(forget_rows):
        raise MoxError(
            f"--target-answer/--target-file: {len(answers)} replacement answers"
            f" for {len(forget_rows)} forget rows"
        )
    if not all(isinstance(a, str) and a.strip() for a in answers):
        raise MoxError("--target-answer: replacement answers must be non-empty text")
    rows = [
        Row(r.prompt, a, f"{r.where} (target)") for r, a in zip(forget_rows, answers, strict=True)
    ]
    return encode(rows, tokenizer, config.max_length, config.chat_template)


def _check_same_shapes(ref, other, what: str) -> None:
    if ref is other:
        return
    a = {n: p.shape for n, p in ref.named_parameters()}
    b = {n: p.shape for n, p in other.named_parameters()}
    if a != b:
        diff = sorted(set(a) ^ set(b)) or [n for n in a if a[n] != b[n]]
        raise MoxError(f"{what}: not the same architecture as MODEL (e.g. {diff[0]})")
