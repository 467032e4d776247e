"""Outputs appear whole or not at all: everything is built in a temporary path beside the
output, on the same file system, and renamed into place when complete."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from .errors import MoxError


def move_into_place(src: Path, dst: Path, force: bool) -> None:
    """Rename the finished `src` to `dst`. An existing `dst` is refused unless `force`, and is
    then removed only after the new output is in place, so an interruption never leaves the
    user with neither."""
    if not dst.exists():
        os.rename(src, dst)
        return
    if not force:
        raise MoxError(f"{dst}: appeared while writing; output left unfinished")
    trash = dst.with_name(f".{dst.name}.moxkit-old-{os.getpid()}")
    os.rename(dst, trash)
    os.rename(src, dst)
    if trash.is_dir():
        shutil.rmtree(trash)
    else:
        trash.unlink()
