"""Write training results atomically: into a partial directory beside the output, renamed into
place when complete."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from moxkit.atomic import move_into_place
from moxkit.errors import MoxError
from moxkit.hf import no_transformers_bars

LOG_FILE = "moxkit_log.jsonl"
ARGS_FILE = "moxkit_args.json"


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
