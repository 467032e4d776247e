"""The memorization trainer and MOX end to end.

    train_mem(model, forget, retain, out, config=TrainConfig(...))   θ_mem
    unlearn(model, forget, retain, out, method="mox", alpha=4, ...)  θ_for (MOX or a baseline)
    finetune(model, rows, out, config=...)                           plain NLL fine-tuning
    extrapolate_model(ref_model, mem_model, alpha)                   θ_for in memory

Models are a directory or an in-memory transformers model (then pass tokenizer=); data are a
JSONL/JSON/Parquet file or a list of row dicts; out=None keeps everything in memory.
"""

from .api import (
    METHODS,
    TrainResult,
    UnlearnResult,
    extrapolate_model,
    finetune,
    train_mem,
    unlearn,
)
from .config import TrainConfig

__all__ = [
    "METHODS",
    "TrainConfig",
    "TrainResult",
    "UnlearnResult",
    "extrapolate_model",
    "finetune",
    "train_mem",
    "unlearn",
]
