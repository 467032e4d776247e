"""Public entry points: fine-tune, memorize (θ_mem), unlearn (MOX or a baseline).

All of them share one data pipeline and one Trainer; they differ in the loss and in what
happens after training, both read from the METHODS table. A call is first turned into a
Request and checked without loading anything (moxkit.train.request); every process of a
distributed run calls the same function; only the main process writes files.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from moxkit.errors import InputError, MismatchError
from moxkit.hf import load_model
from moxkit.text import encode, load_rows

from .config import ExtrapolationConfig, LossConfig, MatchConfig, TrainConfig
from .data import PairDataset
from .methods import METHODS, get_method
from .momentum import InMemoryExtrapolator, cpu_fp32_state, default_every
from .objectives import LossSpec
from .request import Checked, Data, ModelArg, Request
from .session import Run
from .trainer import steps_per_epoch


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
    eta: float | None = None
    match: dict | None = None  # matched forgetting: strength, level, target, gap, evaluations


def finetune(
    model: ModelArg,
    rows: Data,
    out: str | os.PathLike | None = None,
    *,
    config: TrainConfig | None = None,
    tokenizer: Any = None,
    force: bool = False,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Plain NLL fine-tuning on `rows` (e.g. the demo's reference and retain-only models).
    The output keeps the training precision (fp32)."""
    config = config or TrainConfig()
    config.validate()
    train_rows = load_rows(rows, "rows")
    if out is not None:
        from moxkit.atomic import check_output, tree_inputs

        check_output(out, force=force, inputs=tree_inputs(*_paths(model, rows)))
    with Run(out, force, config, len(train_rows)) as run:
        run.write_args("finetune", {"model": _described(model), "rows": _described(rows)})
        base = load_model(model, "model", tokenizer=tokenizer)
        run.keep_names_of(base)
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
    config: TrainConfig | None = None,
    loss: LossConfig | None = None,
    target_answer: str | Sequence[str] | None = None,
    alpha: float = ExtrapolationConfig.alpha,
    init_from: ModelArg | None = None,
    revision: str | None = None,
    tokenizer: Any = None,
    force: bool = False,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    """Train the memorization model θ_mem (MOX step 1): NLL (or negated, floored NPO) on the
    forget set plus kl_weight × KL(θ_ref ‖ θ) on retain rows. With target_answer (targeted
    MOX), also the NLL of the replacement answers at the forget model (1+α)·θ_ref − α·θ,
    for the α θ_mem will be extrapolated with. Saved in fp32 under MODEL's tensor names: the
    difference θ_mem − θ_ref is what MOX amplifies, and bf16 rounding would drown it. With
    init_from (continual unlearning), training starts from that model and θ_ref stays MODEL.
    Models are folders, hub ids (org/name, at `revision`) or in-memory models."""
    request = Request(METHODS["memorize"], model, forget, retain, out,
                      config or TrainConfig(), loss or LossConfig(),
                      ExtrapolationConfig(alpha=alpha), target_answer, init_from,
                      force=force, revision=revision)  # fmt: skip
    return run(request, tokenizer=tokenizer, callbacks=callbacks)


def unlearn(
    model: ModelArg,
    forget: Data,
    retain: Data | None,
    out: str | os.PathLike | None = None,
    *,
    method: str = "mox",
    config: TrainConfig | None = None,
    loss: LossConfig | None = None,
    extrapolation: ExtrapolationConfig | None = None,
    target_answer: str | Sequence[str] | None = None,
    init_from: ModelArg | None = None,
    save_mem: str | os.PathLike | None = None,
    revision: str | None = None,
    tokenizer: Any = None,
    force: bool = False,
    callbacks: Sequence[Any] = (),
    match: MatchConfig | None = None,
) -> UnlearnResult:
    """Unlearn the forget set from MODEL with a method of METHODS (moxkit.train.methods).

    mox: train θ_mem (as train_mem), then θ_for = (1+α)·θ_ref − α·θ_mem; with
    extrapolation.eta (MOX-Mo), θ_for is updated every extrapolate_every optimizer steps and
    at the last step. Extrapolated models are saved in MODEL's dtype, trained ones (the
    baselines) in fp32; extrapolate_on="disk" streams θ_ref, θ_mem and θ_for through
    `moxkit.extrapolate` instead of holding two fp32 copies in RAM. With `match`
    (matched forgetting, moxkit.matching), MOX's α, or the point where a baseline's training
    stops, is found so that the level on match.match_rows reaches match.match_target;
    result.match says where and how close."""
    request = Request(get_method(method), model, forget, retain, out, config or TrainConfig(),
                      loss or LossConfig(), extrapolation or ExtrapolationConfig(),
                      target_answer, init_from, save_mem, force, revision,
                      match=match or MatchConfig())  # fmt: skip
    return run(request, tokenizer=tokenizer, callbacks=callbacks)


def extrapolate_model(ref: Any, mem: Any, alpha: float) -> Any:
    """θ_for = (1+α)·θ_ref − α·θ_mem for two in-memory models, with the streaming engine's
    arithmetic (fp32, one rounding); returns a new model, the inputs are untouched."""
    ExtrapolationConfig(alpha=alpha).validate()
    _check_same_shapes(ref, mem, "mem")
    ext = InMemoryExtrapolator(cpu_fp32_state(ref.named_parameters()), alpha, None)
    ext.update(mem.named_parameters())
    forget_model = copy.deepcopy(mem)
    ext.load_into(forget_model)
    return forget_model


def run(request: Request, checked: Checked | None = None, *, tokenizer: Any = None,
        callbacks: Sequence[Any] = ()) -> UnlearnResult:  # fmt: skip
    """Carry out a request: check it (unless `checked`, its check() result, is given), then
    load, train, and extrapolate if the method does."""
    rows = checked or request.check()
    method, config, ext = request.method, request.config, request.extrapolation
    spec = method.loss_spec(request.loss, ext.alpha, request.targeted)
    with Run(request.out, request.force, config, len(rows.forget)) as run:
        run.write_args("train-mem" if method.name == "memorize" else "unlearn",
                       _arguments(request))  # fmt: skip
        ref = load_model(rows.model, "model", tokenizer=tokenizer)
        run.keep_names_of(ref)
        start = ref
        if rows.init_from is not None:
            start = load_model(rows.init_from, "init_from", tokenizer=ref.tokenizer)
            _check_same_shapes(ref.model, start.model, "init_from")
        tok = ref.tokenizer
        forget_ex = encode(rows.forget, tok, config.max_length, config.chat_template)
        retain_ex = None
        if rows.retain is not None and spec.retain is not None:
            retain_ex = encode(rows.retain, tok, config.max_length, config.chat_template)
        targets = None
        if rows.targets is not None:
            targets = encode(rows.targets, tok, config.max_length, config.chat_template)
        reference = None
        if spec.needs_reference:  # frozen; as config.reference says (None with LoRA)
            reference = run.reference(ref, start, targeted=spec.target_weight > 0)
        dataset = PairDataset(forget_ex, retain_ex, targets)

        extra, extrapolator, level, target, stop = [], None, None, None, None
        if rows.match_rows is not None:
            level, target = _match_level(rows, ref, config, run)
            if not method.extrapolates:
                from moxkit.matching import stop_at_level

                stop = stop_at_level(level, target)
                extra.append(stop)
        if method.extrapolates:
            extrapolator = run.extrapolator(ref, ext.alpha, ext.eta, ext.extrapolate_on,
                                            reference)  # fmt: skip
            if ext.eta is not None:
                total = _total_steps(len(forget_ex), config)
                extra.append(run.momentum_callback(
                    extrapolator, ext.extrapolate_every or default_every(total)))  # fmt: skip
        trainer = run.train(start, dataset, spec, reference, [*extra, *callbacks])
        steps = trainer.state.global_step
        matched = None
        if not method.extrapolates:
            if stop is not None:
                matched = _match_baseline(stop, run, level, target, method, steps, request)
            run.save_trained(tok)
            result_model = run.model.eval()
        else:
            if request.save_mem is not None:
                run.save_elsewhere(tok, Path(request.save_mem))
            if level is not None:
                matched = _match_mox(extrapolator, run, level, target, request)
                ext = dataclasses.replace(ext, alpha=matched["strength"])
            run.log.event({"step": steps, "event": "extrapolate", "alpha": ext.alpha,
                           "eta": ext.eta, "tick": extrapolator.ticks + 1})  # fmt: skip
            result_model = run.finish_extrapolation(extrapolator, tok, ref.stored_dtype)
            if result_model is not None:
                result_model.eval()
    return UnlearnResult(
        result_model, tok, run.result_path, steps, run.log.records, method=method.name,
        alpha=ext.alpha if method.extrapolates else None,
        eta=ext.eta if method.extrapolates else None, match=matched,
    )  # fmt: skip


def _match_level(rows: Checked, ref, config: TrainConfig, run) -> tuple[Any, float]:
    """The level function of matched forgetting (mean answer log-probability of the match
    rows, encoded as for training) and the target level, from a number, another model's level
    on the same rows, or MODEL's own level on rows it does not know."""
    from moxkit.matching import answer_logprob, target_level

    if run.args.world_size > 1:
        raise InputError("matched forgetting: runs in one process (not under torchrun/FSDP) yet")

    tok = ref.tokenizer

    def level(model) -> float:
        with torch.no_grad():
            return answer_logprob(model, tok, rows.match_rows, chat_template=config.chat_template)

    target = target_level(
        rows.target_kind, rows.target, reference=ref.model, level=level,
        level_of_rows=lambda model, found: answer_logprob(
            model, tok, found, chat_template=config.chat_template),
        load=lambda folder: load_model(folder, "match_target", tokenizer=tok,
                                       device=next(ref.model.parameters()).device).model,
    )  # fmt: skip
    return level, target


def _match_mox(extrapolator, run, level, target: float, request: Request) -> dict:
    """α at which θ_for reaches the target (bisection, the engine's arithmetic); the
    extrapolator then builds the forget model at that α."""
    from moxkit.matching import match_alpha

    if not isinstance(extrapolator, InMemoryExtrapolator):
        raise InputError("match_rows: matched forgetting extrapolates in memory; this model "
                         "goes to disk (too large for RAM)", params=("match_rows",))  # fmt: skip
    match, _ = match_alpha(extrapolator.ref, run.model, level, target)
    if not match.reached:
        raise InputError(
            f"match_target: no α up to {match.evaluations[-1][0]:g} brings "
            f"the level to {target:.4g} (at that α: {match.level:.4g}); θ_mem may need more "
            "training",
            params=("match_target",),
        )
    extrapolator.alpha = match.strength
    return _matched(run, match)


def _match_baseline(stop, run, level, target: float, method, steps: int, request) -> dict:
    """The point between the last two optimizer steps where the level reaches the target."""
    from moxkit.matching import match_between

    if stop.after is None:
        last = f"{stop.path[-1][1]:.4g}" if stop.path else "unmeasured"
        raise InputError(
            f"match_target: {method.title} did not bring the level to "
            f"{target:.4g} in {steps} steps (last: {last}); train longer or at a higher lr",
            params=("match_target",),
        )
    match = match_between(run.model, stop.before, stop.after, level, target)
    return {**_matched(run, match), "step": stop.step}


def _matched(run, match) -> dict:
    out = {"strength": match.strength, "level": match.level, "target": match.target,
           "gap": match.gap, "evaluations": len(match.evaluations)}  # fmt: skip
    # the level reached and how close: the log and args of OUT say what "forgotten" meant
    run.log.event({"event": "match", **out})
    return out


def _total_steps(n_forget: int, config: TrainConfig) -> int:
    if config.max_steps:
        return config.max_steps
    return max(1, round(config.epochs * steps_per_epoch(n_forget, config)))


# --- small helpers ----------------------------------------------------------------------------


def _arguments(request: Request) -> dict:
    """The run's arguments as JSON-friendly values (rows and models given in memory are
    summarised, not dumped), for moxkit_args.json."""
    out = {"method": request.method.name, "model": _described(request.model),
           "forget": _described(request.forget), "retain": _described(request.retain),
           "init_from": _described(request.init_from), "save_mem": _described(request.save_mem),
           "target_answer": _described(request.target_answer),
           "target_file": _described(request.target_file),
           "loss": asdict(request.loss)}  # fmt: skip
    if request.method.extrapolates or request.targeted:
        out["extrapolation"] = asdict(request.extrapolation)
    return out


def _described(value: Any) -> Any:
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, os.PathLike):
        return str(value)
    if isinstance(value, Sequence):
        return f"<{len(value)} rows given in memory>"
    return f"<{type(value).__name__} given in memory>"


def _paths(*values: Any) -> list[Path]:
    return [Path(v) for v in values if isinstance(v, (str, os.PathLike))]


def _check_same_shapes(ref, other, what: str) -> None:
    if ref is other:
        return
    a = {n: p.shape for n, p in ref.named_parameters()}
    b = {n: p.shape for n, p in other.named_parameters()}
    if a != b:
        diff = sorted(set(a) ^ set(b)) or [n for n in a if a[n] != b[n]]
        raise MismatchError(f"{what}: not the same architecture as the model (e.g. {diff[0]})")
