"""EngineOptions: how the engine writes a model, as opposed to what it computes (the inputs,
α, η). One object travels from the command line into every entry point that writes through
the engine (extrapolate, the adapters' merge and forget adapters), so an option is declared,
documented and defaulted once; the CLI generates its flags from these fields
(moxkit.cli.options)."""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass

from ..fields import setting


@dataclass(frozen=True)
class EngineOptions:
    """`dtype` also takes a torch dtype. Sizes are bytes or strings such as "1GiB" or "5GB".
    max_memory=None (the library's default; the CLI's is 1 GiB) bounds only the engine's own
    buffers, for callers embedding the engine in a process that holds other things."""

    dtype: str | None = setting(
        None, "Output dtype of floating tensors: bf16, fp16, fp32 (default: REF's)."
    )
    max_memory: str | int | None = setting(
        None, "Peak resident memory of the process.", cli_default="1GiB"
    )
    max_shard_size: str | int = setting(
        "5GB", "Largest output shard (decimal units, like transformers)."
    )
    device: str = setting("auto", "cpu, cuda, or auto (CUDA when present).")
    max_gpu_memory: str | int | None = setting(None, "GPU memory budget for --device cuda.")
    # --force is the CLI's shared option (moxkit.cli.options.output_options)
    force: bool = setting(False, "Replace OUT if it exists.", cli=False)
    fsync: bool = setting(
        False, "Flush OUT to disk before reporting it written (survives a power loss; slower)."
    )
    allow_nonfinite: bool = setting(False, "Keep NaN/inf results instead of failing.")
    dry_run: bool = setting(False, "Validate and print the plan; write nothing.")
    progress: bool = setting(True, "Show a progress bar.", cli=False)

    @classmethod
    def of(cls, options: EngineOptions | None, overrides: dict, caller: str) -> EngineOptions:
        """`options` (or the defaults) with `overrides`, the entry point's keyword arguments
        named as the fields are; an unknown keyword is a TypeError, as Python would raise."""
        names = {f.name for f in dataclasses.fields(cls)}
        for key in overrides:
            if key not in names:
                raise TypeError(f"{caller}() got an unexpected keyword argument {key!r}")
        return dataclasses.replace(options or cls(), **overrides)


def alpha_and_out(alpha, out, caller: str) -> tuple:
    """(alpha, out) of an entry point that takes (ref, mem, alpha, out, ...), the order of
    every extrapolate function; a call in the old order (ref, mem, out, alpha), told apart by
    the types, still works and warns."""
    if isinstance(alpha, (str, os.PathLike)) and not isinstance(out, (str, os.PathLike)):
        warnings.warn(
            f"{caller}(ref, mem, out, alpha) is deprecated: pass {caller}(ref, mem, alpha, out)",
            DeprecationWarning,
            3,
        )
        return out, alpha
    return alpha, out
