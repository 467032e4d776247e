"""Public entry points: fine-tune, memorize (θ_mem), unlearn (MOX or a baseline)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .config import TrainConfig

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
    raise NotImplementedError("in progress")


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
    target_answer: str | Data | None = None,
    init_from: ModelArg | None = None,
    force: bool = False,
    callbacks: Sequence[Any] = (),
) -> TrainResult:
    raise NotImplementedError("in progress")


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
    target_answer: str | Data | None = None,
    init_from: ModelArg | None = None,
    save_mem: str | os.PathLike | None = None,
    force: bool = False,
    callbacks: Sequence[Any] = (),
) -> UnlearnResult:
    raise NotImplementedError("in progress")


def extrapolate_model(ref: Any, mem: Any, alpha: float) -> Any:
    raise NotImplementedError("in progress")
