"""transformers.Trainer with moxkit's losses. Everything distributed (DDP, FSDP, DeepSpeed,
mixed precision, gradient accumulation) is the Trainer's, so `accelerate launch` / `torchrun`
run the same code data-parallel unchanged."""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from moxkit.atomic import reached
from moxkit.errors import InputError

from .config import TrainConfig
from .data import PairSampler
from .objectives import (
    FORGET_TERMS,
    RETAIN_TERMS,
    LossSpec,
    kl_mask,
    sequence_kl,
    sequence_nll,
)
from .precision import check_bf16, default_bf16


class MoxTrainer(Trainer):
    """Computes the LossSpec's terms per micro-batch and keeps their running means for the
    step log. The reference (frozen θ_ref) is a second model in eval mode or, with LoRA, the
    trained model with its adapters disabled (reference=None)."""

    loss_is_scaled_for_ga = False  # our loss is a mean; let Trainer divide by grad_accum

    def __init__(self, *args, spec: LossSpec, sampler: PairSampler, reference=None,
                 reference_bf16: bool = False, **kwargs):  # fmt: skip
        super().__init__(*args, **kwargs)
        self.spec = spec
        self.sampler = sampler
        self.reference = reference
        # the reference's forward runs under the training's autocast (its logits are then
        # what θ's forward gives at θ = θ_ref), and always under bf16 autocast when its
        # linear weights are bf16 (moxkit.train.precision)
        self.reference_autocast = reference_bf16 or bool(self.args.bf16)
        self.running: dict[str, list[torch.Tensor]] = defaultdict(list)

    def _get_train_sampler(self, train_dataset=None):
        return self.sampler

    def _forward(self, model, inputs, group: str) -> torch.Tensor:
        return model(
            input_ids=inputs[f"{group}_input_ids"],
            attention_mask=inputs[f"{group}_attention_mask"],
            use_cache=False,
        ).logits

    @torch.no_grad()
    def _reference_logits(self, model, inputs, group: str) -> torch.Tensor:
        if self.reference is None:  # LoRA: the base model is the reference
            with self.accelerator.unwrap_model(model).disable_adapter():
                return self._forward(model, inputs, group)
        device = inputs[f"{group}_input_ids"].device
        if next(self.reference.parameters()).device != device:
            self.reference.to(device)
        if not self.reference_autocast:
            return self._forward(self.reference, inputs, group)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            return self._forward(self.reference, inputs, group)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The sum of the terms the method's row names (moxkit.train.objectives)."""
        spec = self.spec
        terms: dict[str, torch.Tensor] = {}
        loss = FORGET_TERMS[spec.forget](self, model, inputs, spec, terms)
        if spec.retain is not None and "retain_input_ids" in inputs:
            term = RETAIN_TERMS[spec.retain](self, model, inputs, spec, terms)
            loss = loss + spec.retain_weight * term
        if spec.target_weight and "target_input_ids" in inputs:
            loss = loss + spec.target_weight * self._targeted_terms(model, inputs, terms)
        terms["loss"] = loss
        for name, value in terms.items():  # kept on the device: no sync per micro-batch
            self.running[name].append(value.detach().float())
        return loss

    def _targeted_terms(self, model, inputs, terms: dict) -> torch.Tensor:
        """Targeted MOX, in forget-model space: the replacement answers' NLL at θ_for, plus
        (when retain rows and the KL are in use) kl_weight × KL(θ_ref ‖ θ_for) on retain. The
        target term alone is free to move θ_for anywhere on retain (measured: greedy retain
        accuracy falls to 0 on the tiny benchmark); the retain KL, which MOX applies to θ_mem,
        is applied where the target term acts too."""
        target_logits = self._forget_model_logits(model, inputs, "target")
        term = terms["target_nll_at_forget_model"] = sequence_nll(
            target_logits, inputs["target_labels"]
        ).mean()
        if self.spec.retain == "kl" and "retain_input_ids" in inputs:
            ref_logits = self._reference_logits(model, inputs, "retain")
            mask = kl_mask(inputs["retain_labels"], inputs["retain_attention_mask"],
                           self.spec.kl_positions)  # fmt: skip
            kl = sequence_kl(ref_logits, self._forget_model_logits(model, inputs, "retain"), mask)
            terms["retain_kl_at_forget_model"] = kl.mean()
            term = term + self.spec.retain_weight * kl.mean()
        return term

    def _forget_model_logits(self, model, inputs, group: str) -> torch.Tensor:
        """Logits of the extrapolated model θ_for = (1+α)·θ_ref − α·θ, differentiable in θ
        (targeted MOX): descending on a loss here is ordinary descent in forget-model space,
        with the gradient reaching θ_mem as −α times the gradient at θ_for. With LoRA,
        θ = θ_ref + s·B·A, so θ_for is the same model with every B scaled by −α."""
        core = self.accelerator.unwrap_model(model)
        a = self.spec.target_alpha
        trained = dict(core.named_parameters())
        if self.reference is None:
            params = {n: -a * p for n, p in trained.items() if ".lora_B." in n}
        else:
            device = next(iter(trained.values())).device
            if next(self.reference.parameters()).device != device:
                self.reference.to(device)
            ref = dict(self.reference.named_parameters())
            params = {n: (1 + a) * ref[n].to(p.dtype) - a * p for n, p in trained.items()}
        return torch.func.functional_call(
            core,
            params,
            args=(),
            kwargs={
                "input_ids": inputs[f"{group}_input_ids"],
                "attention_mask": inputs[f"{group}_attention_mask"],
                "use_cache": False,
            },
            strict=False,
        ).logits

    def pop_step_terms(self) -> dict[str, float]:
        """Means since the last optimizer step, averaged over processes."""
        names = sorted(self.running)
        local = torch.stack([torch.stack(self.running[n]).mean() for n in names]).to(
            self.args.device, torch.float64
        )
        self.running.clear()
        if self.accelerator.num_processes > 1:
            local = self.accelerator.reduce(local, reduction="mean")
        return dict(zip(names, local.tolist(), strict=True))


class StepLog(TrainerCallback):
    """One JSONL record per optimizer step (losses, learning rate) plus events such as a
    momentum extrapolation; the progress bar shows the current losses."""

    def __init__(self, trainer: MoxTrainer, path: Path | None, progress: bool):
        self.trainer = trainer
        self.path = path
        self.records: list[dict] = []
        self.progress = progress
        self._bar = None
        self._plain_every = 0

    def event(self, record: dict) -> None:
        self.records.append(record)
        if self.path is not None and self.trainer.is_world_process_zero():
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def on_train_begin(self, args, state, control, **kwargs):
        if not (self.progress and self.trainer.is_world_process_zero()):
            return
        if sys.stderr.isatty():
            self._bar = tqdm(total=state.max_steps, desc="train", dynamic_ncols=True)
        else:
            self._plain_every = max(1, state.max_steps // 10)

    def on_step_end(self, args, state, control, **kwargs):
        reached("train-step")  # tests deliver signals here
        terms = self.trainer.pop_step_terms()
        lr = self.trainer.lr_scheduler.get_last_lr()[0]
        self.event({"step": state.global_step, "epoch": round(state.epoch, 4), "lr": lr, **terms})
        shown = {k: f"{v:.4g}" for k, v in terms.items() if k != "loss"}
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(shown)
        elif self._plain_every and (
            state.global_step % self._plain_every == 0 or state.global_step == state.max_steps
        ):
            line = " ".join(f"{k}={v}" for k, v in shown.items())
            print(f"train: step {state.global_step}/{state.max_steps} {line}", file=sys.stderr)

    def on_train_end(self, args, state, control, **kwargs):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


SCRATCH_UNSET = "moxkit-trainer-scratch-unset"  # replaced by the run's scratch folder


def steps_per_epoch(n_rows: int, config: TrainConfig) -> int:
    return math.ceil(n_rows / config.batch_size)


def training_arguments(config: TrainConfig, n_rows: int) -> TrainingArguments:
    """TrainingArguments for this run; the per-device micro-batch follows from the global
    batch, the number of processes and the accumulation steps. Creating them sets up the
    process group (which process is the main one); the caller sets `output_dir`, the Trainer's
    scratch folder, before training."""
    use_cuda = torch.cuda.is_available()
    bf16 = config.bf16 if config.bf16 is not None else default_bf16(use_cuda)
    check_bf16(bf16, use_cuda)
    warmup = round(config.warmup_epochs * steps_per_epoch(n_rows, config))
    args = TrainingArguments(
        output_dir=SCRATCH_UNSET,
        per_device_train_batch_size=1,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps or -1,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        lr_scheduler_type="linear",
        warmup_steps=warmup,
        optim="adamw_torch",
        seed=config.seed,
        bf16=bf16,
        **_checkpointing(config.gradient_checkpointing),
        logging_strategy="no",
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        disable_tqdm=True,
        use_cpu=not use_cuda,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
    )
    per_step = args.world_size * config.grad_accum
    if config.batch_size % per_step:
        raise InputError(
            f"batch_size {config.batch_size}: must be a multiple of processes × grad_accum"
            f" = {args.world_size} × {config.grad_accum}",
            params=("batch_size", "grad_accum"),
        )
    args.per_device_train_batch_size = config.batch_size // per_step
    return args


def _checkpointing(enabled: bool) -> dict:
    """transformers 5 renamed gradient_checkpointing to activation_checkpointing."""
    fields = TrainingArguments.__dataclass_fields__
    key = (
        "activation_checkpointing"
        if "activation_checkpointing" in fields
        else "gradient_checkpointing"
    )
    return {key: enabled}


def quiet_callbacks(trainer: Trainer) -> None:
    """Trainer's own bar and printer would duplicate StepLog's output."""
    for cb in (ProgressCallback, PrinterCallback):
        trainer.remove_callback(cb)
