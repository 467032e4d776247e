"""Public entry points: fine-tune, memorize (θ_mem), unlearn (MOX or a baseline).

All of them share one data pipeline and one Trainer; they differ in the loss (a LossSpec)
and in what happens after training (MOX and task vectors extrapolate). Every process of a
distributed run calls the same function; only the main process writes files.
"""

from __future__ import annotations

import copy
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil
import torch

from moxkit.errors import MoxError

from .config import TrainConfig
from .data import Collator, PairDataset, PairSampler, Row, encode, load_rows
from .models import ARGS_FILE, LOG_FILE, Loaded, OutputDir, ensure_pad_token, load_model, save_model
from .momentum import (
    DiskExtrapolator,
    InMemoryExtrapolator,
    MomentumCallback,
    cpu_fp32_state,
)
from .objectives import LossSpec
from .trainer import MoxTrainer, StepLog, quiet_callbacks, steps_per_epoch, training_arguments

Rows = Sequence[dict]  # rows given directly, as a JSONL file would hold them
Data = str | os.PathLike | Rows
ModelArg = Any  # a model directory, or a transformers PreTrainedModel (then pass tokenizer=)
METHODS = ("mox", "ga", "graddiff", "npo", "task-vector")


@dataclass
class TrainResult:
    """A trained model, held in memory, and where it was written (None if not written)."""

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
    base = load_model(model, tokenizer, "MODEL")
    examples = encode(
        load_rows(rows, "ROWS"), base.tokenizer, config.max_length, config.chat_template
    )
    spec = LossSpec(forget="nll", primary="train")
    with _Session(out, force, config, base.model, len(examples)) as session:
        session.write_args("finetune", arguments)
        trainer, log = session.train(
            base, PairDataset(examples, primary="train"), spec, None, callbacks
        )
        trained = _unwrap(trainer)
        session.save_trained(trainer, base.tokenizer)
        session.commit()
    trained.eval()
    return TrainResult(
        trained, base.tokenizer, session.result_path, trainer.state.global_step, log.records
    )


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
    amplifies, and bf16 rounding would drown it."""
    return unlearn(
        model,
        forget,
        retain,
        out,
        method="memorize",
        config=config,
        tokenizer=tokenizer,
        objective=objective,
        kl_weight=kl_weight,
        npo_beta=npo_beta,
        npo_floor=npo_floor,
        target_answer=target_answer,
        init_from=init_from,
        force=force,
        callbacks=callbacks,
        _arguments=_describe(locals()),
    )


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
    _arguments: dict | None = None,
) -> UnlearnResult:
    """Unlearn the forget set from MODEL.

    mox: train θ_mem (as train_mem), then θ_for = (1+α)·θ_ref − α·θ_mem; with momentum_eta,
    θ_for is updated every `extrapolate_every` optimizer steps (default: once per epoch) and
    at the last step. task-vector: the same without the KL term. ga: gradient ascent on the
    forget NLL. graddiff: ascent on forget + NLL on retain. npo: NPO (β = npo_beta, reference
    θ_ref) + NLL on retain. Extrapolated models are saved in MODEL's dtype, trained ones in
    fp32. With init_from (continual unlearning), training starts from that model and θ_ref
    stays MODEL."""
    arguments = _arguments or _describe(locals())
    memorize = method == "memorize"
    if method not in METHODS and not memorize:
        raise MoxError(f"--method {method!r}: expected one of {', '.join(METHODS)}")
    extrapolates = method in ("mox", "task-vector")
    _check_options(method, alpha, momentum_eta, extrapolate_every, objective, kl_weight, npo_beta)
    if method in ("ga", "graddiff", "npo") and target_answer is not None:
        raise MoxError(f"--target-answer: only for MOX, not --method {method}")
    config.validate()

    ref = load_model(model, tokenizer, "MODEL")
    start = load_model(init_from, ref.tokenizer, "--init-from") if init_from is not None else ref
    _check_same_shapes(ref.model, start.model)
    tok = ref.tokenizer
    forget_rows = load_rows(forget, "--forget")
    forget_ex = encode(forget_rows, tok, config.max_length, config.chat_template)
    needs_retain = (memorize or method in ("mox", "graddiff", "npo")) and not (
        method in ("mox", "memorize") and kl_weight == 0
    )
    retain_ex = None
    if retain is not None:
        retain_ex = encode(
            load_rows(retain, "--retain"), tok, config.max_length, config.chat_template
        )
    elif needs_retain:
        raise MoxError(
            f"--retain: needed by --method {method}"
            + (" (or set --kl-weight 0)" if method in ("mox", "memorize") else "")
        )
    targets = _target_examples(target_answer, forget_rows, tok, config)

    spec = _loss_spec(method, objective, kl_weight, npo_beta, npo_floor, targets is not None)
    reference = None
    if spec.needs_reference and not config.lora:
        reference = copy.deepcopy(ref.model) if start is ref else ref.model
        reference.eval().requires_grad_(False)
    dataset = PairDataset(forget_ex, retain_ex if spec.retain else None, targets)

    with _Session(out, force, config, start.model, len(forget_ex)) as session:
        session.write_args("train-mem" if memorize else "unlearn", arguments)
        extrapolator, tick = None, None
        if extrapolates:
            every = extrapolate_every or steps_per_epoch(len(forget_ex), config)
            extrapolator = session.extrapolator(ref, alpha, momentum_eta, extrapolate_on)
            tick = session.momentum_tick(extrapolator) if momentum_eta is not None else None
        extra = [MomentumCallback(every, tick)] if tick is not None else []
        trainer, log = session.train(start, dataset, spec, reference, [*extra, *callbacks])
        steps = trainer.state.global_step
        if extrapolates:
            if save_mem is not None:
                session.save_elsewhere(trainer, tok, Path(save_mem), force)
            log.event(
                {
                    "step": steps,
                    "event": "extrapolate",
                    "alpha": alpha,
                    "eta": momentum_eta,
                    "tick": extrapolator.ticks + 1,
                }
            )
            forget_model = session.finish_extrapolation(extrapolator, tok, ref.dtype)
        else:
            forget_model = _unwrap(trainer)
            session.save_trained(trainer, tok)
            session.commit()
    if forget_model is not None:
        forget_model.eval()
    return UnlearnResult(
        forget_model,
        tok,
        session.result_path,
        steps,
        log.records,
        method=method,
        alpha=alpha if extrapolates else None,
        momentum_eta=momentum_eta if extrapolates else None,
    )


def extrapolate_model(ref: Any, mem: Any, alpha: float) -> Any:
    """θ_for = (1+α)·θ_ref − α·θ_mem for two in-memory models, with the streaming engine's
    arithmetic (fp32, one rounding); returns a new model, the inputs are untouched."""
    _check_options("mox", alpha, None, None, "nll", 0.0, 0.1)
    _check_same_shapes(ref, mem)
    ext = InMemoryExtrapolator(cpu_fp32_state(ref.named_parameters()), alpha, None)
    ext.update(mem.named_parameters())
    forget_model = copy.deepcopy(mem)
    ext.load_into(forget_model)
    return forget_model


# --- internals -------------------------------------------------------------------------------


class _Session:
    """One training run: arguments, the output directory (atomic), the trainer and the log."""

    def __init__(self, out, force: bool, config: TrainConfig, model, n_rows: int):
        config.validate()
        self.config, self.model, self.n_rows = config, model, n_rows
        self._scratch = tempfile.TemporaryDirectory(prefix="moxkit-trainer-")
        self.args = training_arguments(config, n_rows, Path(self._scratch.name))
        self.is_main = self.args.process_index == 0
        self.output = OutputDir(Path(out), force, self.is_main) if out is not None else None
        self.trainer: MoxTrainer | None = None
        self.log: StepLog | None = None
        self.result_path: Path | None = None

    def __enter__(self) -> _Session:
        if self.output is not None:
            self.output.check()
            self.output.start()
            self._barrier()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.output is not None:
            self.output.abort()
        self._scratch.cleanup()

    def _barrier(self) -> None:
        from accelerate import PartialState

        PartialState().wait_for_everyone()

    def write_args(self, command: str, arguments: dict) -> None:
        if self.output is not None:
            data = {"command": command, **arguments, "config": self.config.to_dict()}
            data["world_size"] = self.args.world_size
            self.output.write_json(ARGS_FILE, data)

    def train(self, loaded: Loaded, dataset, spec: LossSpec, reference, callbacks):
        model = loaded.model
        if self.config.lora:
            model = _with_lora(model, self.config.lora)
        sampler = PairSampler(len(dataset), len(dataset.retain), self.config.seed)
        trainer = MoxTrainer(
            model=model,
            args=self.args,
            train_dataset=dataset,
            data_collator=Collator(ensure_pad_token(loaded.tokenizer)),
            spec=spec,
            sampler=sampler,
            reference=reference,
        )
        quiet_callbacks(trainer)
        log_path = self.output.partial / LOG_FILE if self.output is not None else None
        log = StepLog(trainer, log_path, self.config.progress)
        for cb in (log, *callbacks):
            trainer.add_callback(cb)
        self.trainer, self.log = trainer, log
        trainer.train()
        if self.config.lora:
            merged = trainer.accelerator.unwrap_model(trainer.model).merge_and_unload()
            trainer.model = trainer.model_wrapped = merged
        return trainer, log

    def _state_dict(self, trainer):
        return trainer.accelerator.get_state_dict(trainer.model_wrapped)

    def save_trained(self, trainer, tokenizer) -> None:
        if self.output is None:
            return
        state = self._state_dict(trainer)
        if self.is_main:
            save_model(_unwrap(trainer), tokenizer, self.output.partial, state)
        self._barrier()

    def save_elsewhere(self, trainer, tokenizer, path: Path, force: bool) -> None:
        """θ_mem next to the forget model (--save-mem), atomically like any output."""
        other = OutputDir(path, force, self.is_main)
        other.check()
        other.start()
        self._barrier()
        state = self._state_dict(trainer)
        if self.is_main:
            save_model(_unwrap(trainer), tokenizer, other.partial, state)
            other.commit()
        self._barrier()

    def commit(self) -> None:
        if self.output is not None:
            self.output.commit()
            self.result_path = self.output.out
        self._barrier()

    # --- extrapolation ---

    def extrapolator(self, ref: Loaded, alpha, eta, where: str):
        where = self._where(ref, where)
        if where == "disk":
            return DiskExtrapolator(ref.directory, alpha, eta, self.output.work)
        state = cpu_fp32_state(ref.model.named_parameters()) if self.is_main else {}
        return InMemoryExtrapolator(state, alpha, eta)

    def _where(self, ref: Loaded, where: str) -> str:
        if where not in ("auto", "memory", "disk"):
            raise MoxError(f"--extrapolate-on {where!r}: expected auto, memory or disk")
        if where == "auto":
            from accelerate import PartialState
            from accelerate.utils import DistributedType

            sharded = PartialState().distributed_type in (
                DistributedType.FSDP,
                DistributedType.DEEPSPEED,
            )
            fp32_bytes = sum(p.numel() for p in ref.model.parameters()) * 4
            too_big = 2 * fp32_bytes > psutil.virtual_memory().available // 2
            where = "disk" if (sharded or too_big) else "memory"
            if where == "disk" and (ref.directory is None or self.output is None):
                where = "memory"
        if where == "disk" and (ref.directory is None or self.output is None):
            raise MoxError("--extrapolate-on disk: needs MODEL as a directory and an output")
        return where

    def momentum_tick(self, extrapolator):
        def tick(step: int) -> None:
            trainer = self.trainer
            if isinstance(extrapolator, DiskExtrapolator):
                state = self._state_dict(trainer)
                mem_dir = self.output.work / "mem"
                if self.is_main:
                    shutil.rmtree(mem_dir, ignore_errors=True)
                    save_model(_unwrap(trainer), None, mem_dir, state)
                    extrapolator.update(mem_dir)
            elif self.is_main:
                extrapolator.update(_unwrap(trainer).named_parameters())
            self._barrier()
            self.log.event({"step": step, "event": "momentum", "tick": extrapolator.ticks})

        return tick

    def finish_extrapolation(self, extrapolator, tokenizer, dtype: torch.dtype):
        """The final tick: into the trained model in memory, or through the engine on disk."""
        trainer = self.trainer
        model = _unwrap(trainer)
        if isinstance(extrapolator, DiskExtrapolator):
            state = self._state_dict(trainer)
            mem_dir = self.output.work / "mem"
            built = self.output.work / "forget"
            if self.is_main:
                shutil.rmtree(mem_dir, ignore_errors=True)
                save_model(model, None, mem_dir, state)
                extrapolator.update(mem_dir, out=built, final=True)
                self.output.commit(built)
            self._barrier()
            self.result_path = self.output.out
            return None
        if self.is_main:
            extrapolator.update(model.named_parameters())
            extrapolator.load_into(model)
        model.to(dtype)
        if self.output is not None:
            if self.is_main:
                save_model(model, tokenizer, self.output.partial)
            self.commit()
        return model


def _unwrap(trainer):
    return trainer.accelerator.unwrap_model(trainer.model)


def _describe(arguments: dict) -> dict:
    """The run's arguments as JSON-friendly values (rows and models given in memory are
    summarised, not dumped)."""
    out = {}
    for key, value in arguments.items():
        if key in ("_arguments", "callbacks") or key.startswith("__"):
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


def _check_options(method, alpha, eta, every, objective, kl_weight, npo_beta) -> None:
    if method in ("mox", "task-vector") and not (math.isfinite(alpha) and alpha > 0):
        raise MoxError(f"--alpha {alpha}: must be a positive number")
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
            f"--target-answer: {len(answers)} replacement answers"
            f" for {len(forget_rows)} forget rows"
        )
    if not all(isinstance(a, str) and a.strip() for a in answers):
        raise MoxError("--target-answer: replacement answers must be non-empty text")
    rows = [
        Row(r.prompt, a, f"{r.where} (target)") for r, a in zip(forget_rows, answers, strict=True)
    ]
    return encode(rows, tokenizer, config.max_length, config.chat_template)


def _check_same_shapes(ref, other) -> None:
    if ref is other:
        return
    a = {n: p.shape for n, p in ref.named_parameters()}
    b = {n: p.shape for n, p in other.named_parameters()}
    if a != b:
        diff = sorted(set(a) ^ set(b)) or [n for n in a if a[n] != b[n]]
        raise MoxError(f"--init-from: not the same architecture as MODEL (e.g. {diff[0]})")


def _with_lora(model, rank: int):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise MoxError("--lora needs PEFT: pip install 'moxkit[lora]'") from None
    config = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", lora_dropout=0.0)
    return get_peft_model(model, config)
