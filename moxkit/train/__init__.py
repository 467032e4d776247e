"""The memorization trainer and MOX end to end.

    train_mem(model, forget, retain, out, config=TrainConfig(...))   θ_mem
    unlearn(model, forget, retain, out, method="mox", extrapolation=ExtrapolationConfig(...))
    unlearn(..., match=MatchConfig(match_rows=..., match_target=...))  α / stop at a level
    finetune(model, rows, out, config=...)                           plain NLL fine-tuning
    extrapolate_model(ref_model, mem_model, alpha)                   θ_for in memory
    METHODS                                                          what each method is

Models are a folder or an in-memory transformers model (then pass tokenizer=); data are a
JSONL/JSON/Parquet file or a list of row dicts; out=None keeps everything in memory.
Attributes are imported on first use, so reading METHODS or the configs costs no torch import.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "METHODS": "methods",
    "UNLEARN_METHODS": "methods",
    "Method": "methods",
    "TrainConfig": "config",
    "LossConfig": "config",
    "ExtrapolationConfig": "config",
    "MatchConfig": "config",
    "TrainResult": "api",
    "UnlearnResult": "api",
    "extrapolate_model": "api",
    "finetune": "api",
    "train_mem": "api",
    "unlearn": "api",
}
__all__ = list(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'moxkit.train' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
