"""Training hyperparameters, with the paper's defaults, shared by every method so that MOX and
the baselines are compared under the same settings."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from moxkit.errors import MoxError


@dataclass
class TrainConfig:
    """How to train. `batch_size` is the effective (global) batch: one optimizer step sees
    `batch_size` forget rows whatever the number of processes, each process taking
    batch_size / (world_size × grad_accum) rows per forward pass, so the same command gives the
    same run on one device or eight."""

    epochs: float = 10.0
    lr: float = 1e-5
    batch_size: int = 32
    grad_accum: int = 1
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    max_length: int = 512
    seed: int = 0
    max_steps: int | None = None  # stop after this many optimizer steps (overrides epochs)
    chat_template: bool = False  # format prompts with the tokenizer's chat template
    bf16: bool | None = None  # None: bf16 autocast where the device supports it
    gradient_checkpointing: bool = False
    lora: int | None = None  # LoRA rank (PEFT); None trains all weights
    progress: bool = True

    def validate(self) -> None:
        checks = [
            (self.epochs > 0 and math.isfinite(self.epochs), "--epochs", "a positive number"),
            (self.lr > 0 and math.isfinite(self.lr), "--lr", "a positive number"),
            (self.batch_size >= 1, "--batch-size", "at least 1"),
            (self.grad_accum >= 1, "--grad-accum", "at least 1"),
            (self.weight_decay >= 0, "--weight-decay", "non-negative"),
            (self.warmup_epochs >= 0, "--warmup-epochs", "non-negative"),
            (self.max_length >= 2, "--max-length", "at least 2"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps", "at least 1"),
            (self.lora is None or self.lora >= 1, "--lora", "a rank of at least 1"),
        ]
        for ok, flag, want in checks:
            if not ok:
                raise MoxError(f"{flag} {getattr(self, _attr(flag))}: must be {want}")

    def to_dict(self) -> dict:
        return asdict(self)


def _attr(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")
