"""Saving what training produced so that it pairs with MODEL by tensor name.

transformers may load a checkpoint stored in another key layout than the one it saves (GPT-2
on the hub has no `transformer.` prefix and keeps `h.N.attn.bias` buffers): saved as is, θ_mem
would not pair with MODEL in `moxkit extrapolate`. Outputs therefore keep MODEL's own names,
and tensors MODEL's checkpoint holds that the model does not train (such buffers) are carried
over unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from moxkit.hf import no_transformers_bars

LOG_FILE = "moxkit_log.jsonl"
ARGS_FILE = "moxkit_args.json"


class CheckpointNames:
    """The tensor names of MODEL's checkpoint folder, and the map from the loaded model's
    state-dict names to them (equal, or differing by the model's base prefix)."""

    def __init__(self, directory: Path, base_prefix: str):
        from moxkit.engine.checkpoint import open_checkpoint

        self.checkpoint = open_checkpoint(directory)
        self.names = set(self.checkpoint.tensors)
        self.prefix = f"{base_prefix}." if base_prefix else ""

    def name_of(self, key: str) -> str:
        if key in self.names or not self.prefix:
            return key
        if key.startswith(self.prefix) and key[len(self.prefix) :] in self.names:
            return key[len(self.prefix) :]
        if self.prefix + key in self.names:
            return self.prefix + key
        return key

    def rename(self, state: dict[str, Any]) -> dict[str, Any]:
        """`state` under MODEL's names, plus MODEL's tensors it lacks (read from MODEL)."""
        renamed = {self.name_of(k): v for k, v in state.items()}
        missing = self.names - renamed.keys()
        if missing:
            from safetensors import safe_open

            by_file: dict[Path, list[str]] = {}
            for name in missing:
                by_file.setdefault(self.checkpoint.tensors[name].file, []).append(name)
            for file, names in by_file.items():
                with safe_open(os.fspath(file), "pt") as f:
                    renamed.update({n: f.get_tensor(n) for n in names})
        return renamed


def save_model(model: Any, tokenizer: Any, directory: Path, state_dict=None,
               names: CheckpointNames | None = None) -> None:  # fmt: skip
    """save_pretrained (safetensors, sharded at transformers' default) plus the tokenizer
    (None: weights and config only, e.g. a scratch θ_mem for the engine), under MODEL's
    tensor names when they are known."""
    if names is not None:
        state_dict = names.rename(state_dict if state_dict is not None else model.state_dict())
    with no_transformers_bars():
        model.save_pretrained(directory, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
