"""Load a model for training (with clear errors for a user's bad directory) and write results
atomically: into a partial directory beside the output, renamed into place when complete."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moxkit.atomic import move_into_place
from moxkit.errors import MoxError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
LOG_FILE = "moxkit_log.jsonl"
ARGS_FILE = "moxkit_args.json"


@dataclass
class Loaded:
    model: Any  # fp32, ready to train
    tokenizer: Any
    directory: Path | None  # where it came from (None: given in memory)
    dtype: torch.dtype  # the dtype it was stored in; extrapolated outputs are saved in it


def load_model(model: Any, tokenizer: Any, name: str) -> Loaded:
    """A directory is loaded in fp32 (updates at lr 1e-5 would vanish in bf16 weights); an
    in-memory model is deep-copied, so the caller's model is never modified."""
    if not isinstance(model, (str, os.PathLike)):
        if tokenizer is None:
            raise MoxError(f"{name}: an in-memory model needs tokenizer=")
        dtype = next(model.parameters()).dtype
        return Loaded(copy.deepcopy(model).float(), tokenizer, None, dtype)

    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(model)
    if not path.is_dir():
        raise MoxError(f"{name} {path}: not a model directory")
    if not (path / "config.json").is_file():
        raise MoxError(f"{name} {path}: no config.json (not a transformers model directory)")
    if tokenizer is None:
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise MoxError(f"{name} {path}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:  # transformers raises many types for a broken tokenizer
            raise MoxError(
                f"{name} {path}: cannot load the tokenizer: {_first_line(exc)}"
            ) from None
    try:
        config = AutoConfig.from_pretrained(path)
        with no_transformers_bars():
            loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except Exception as exc:
        raise MoxError(f"{name} {path}: cannot load the model: {_first_line(exc)}") from None
    dtype = getattr(config, "dtype", None) or torch.float32
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return Loaded(loaded, tokenizer, path, dtype)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def ensure_pad_token(tokenizer: Any) -> int:
    """Padding id for batches (masked out everywhere); EOS stands in when there is none."""
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise MoxError("the tokenizer has neither a pad nor an eos token to pad batches with")
    return tokenizer.eos_token_id


class OutputDir:
    """The output being built: `partial` collects files; `commit()` renames it into place.
    The names are fixed (not random) so every process of a distributed run agrees on them;
    only the main process writes."""

    def __init__(self, out: Path, force: bool, is_main: bool):
        self.out, self.force, self.is_main = out, force, is_main
        self.partial = out.with_name(f".{out.name}.moxkit-partial")
        self.work = out.with_name(f".{out.name}.moxkit-work")

    def check(self) -> None:
        if self.out.exists() and not self.force:
            raise MoxError(f"{self.out}: already exists (use --force to replace it)")

    def start(self) -> None:
        if self.is_main:
            for d in (self.partial, self.work):
                shutil.rmtree(d, ignore_errors=True)
            self.partial.mkdir(parents=True)
            self.work.mkdir()

    def write_json(self, name: str, data: dict) -> None:
        if self.is_main:
            (self.partial / name).write_text(json.dumps(data, indent=2, default=str) + "\n")

    def commit(self, built: Path | None = None) -> None:
        """Move `built` (default: partial) to the output; extra files in partial go with it."""
        if not self.is_main:
            return
        if built is not None:
            for f in self.partial.iterdir():
                shutil.move(str(f), built / f.name)
            shutil.rmtree(self.partial)
        move_into_place(built or self.partial, self.out, self.force)
        shutil.rmtree(self.work, ignore_errors=True)

    def abort(self) -> None:
        if self.is_main:
            shutil.rmtree(self.partial, ignore_errors=True)
            shutil.rmtree(self.work, ignore_errors=True)


def save_model(model: Any, tokenizer: Any, directory: Path, state_dict=None) -> None:
    """save_pretrained (safetensors, sharded at transformers' default) plus the tokenizer
    (None: weights and config only, e.g. a scratch θ_mem for the engine)."""
    with no_transformers_bars():
        model.save_pretrained(directory, state_dict=state_dict)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)


@contextlib.contextmanager
def no_transformers_bars():
    """transformers' per-file load/save bars would interleave with the training progress."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()
