"""Everything in OUT besides the weights: provenance for the safetensors metadata, REF's model
files carried over (config, tokenizer, generation config, chat template: sources'
MODEL_FILE_PATTERNS, never moxkit's own run records), and a model card that says how the
model was made.

Carried files are read under sources' trust rules (sources.model_files: only regular files of
bounded size, and a link only where its target stays inside the model's tree, for a hub cache
snapshot its repository's blobs/). A file that breaks them is left out with a warning
(a tokenizer.json linking to /proc/self/environ or to a private file must never be copied
into an output that users publish)."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

from .. import __version__
from ..errors import InputError
from ..sources import ModelFile, model_files, open_checked, read_json
from .checkpoint import Checkpoint
from .dtypes import TABLE
from .formula import Coefficients

log = logging.getLogger("moxkit")


def provenance(
    ref: Checkpoint, mem: Checkpoint, prev: Checkpoint | None, coeffs: Coefficients
) -> dict[str, str]:
    meta = {
        "format": "pt",
        "moxkit_version": __version__,
        "moxkit_alpha": repr(coeffs.alpha),
        "moxkit_ref": _text(ref.path),
        "moxkit_mem": _text(mem.path),
        "moxkit_formula": "(1+alpha)*ref - alpha*mem",
    }
    if prev is not None:
        meta["moxkit_prev"] = _text(prev.path)
        meta["moxkit_eta"] = repr(coeffs.eta)
        meta["moxkit_formula"] = "eta*((1+alpha)*ref - alpha*mem) + (1-eta)*prev"
    return meta


def _text(path: Path) -> str:
    """An absolute path as metadata text: safetensors headers must be valid UTF-8, so a
    name that is not (bytes kept by surrogateescape) is written escaped."""
    text = os.path.abspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return ascii(text)
    return text


def carried_files(src: Path, budget: int | None = None) -> list[ModelFile]:
    """REF's model files that OUT carries over, checked (call before the work starts: a
    file that breaks the trust rules is reported once, here, and left out). config.json
    must be a JSON object within read_json's bounds (OUT's config may have to be rewritten,
    and a model whose config does not parse does not load): MoxError now, not after the
    weights are computed."""
    carried = model_files(src, "not carried over")
    for file in carried:
        if file.name == "config.json":
            read_json(file, "config", budget=budget)
    return carried


def carry_files(
    src: Path,
    dst: Path,
    out_dtype: str | None,
    files: list[ModelFile] | None = None,
    budget: int | None = None,
) -> list[str]:
    """Copy REF's model files (`files` from carried_files, or found now) into `dst`;
    config.json's dtype follows `out_dtype`. Returns the names copied."""
    files = carried_files(src) if files is None else files
    for file in files:
        if file.name == "config.json" and out_dtype is not None:
            config = read_json(file, "config", budget=budget)
            keys = [k for k in ("torch_dtype", "dtype") if k in config] or ["dtype"]
            for key in keys:
                config[key] = TABLE[out_dtype].torch
            (dst / file.name).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        else:
            _copy(file, dst / file.name)
    return [f.name for f in files]


def _copy(file: ModelFile, dst: Path) -> None:
    """Copy through the checked descriptor (never by path again), and refuse a file that
    changed size meanwhile."""
    fd = open_checked(file)
    with os.fdopen(fd, "rb") as source, open(dst, "xb") as target:
        shutil.copyfileobj(source, target, 1 << 20)
        copied = target.tell()
    if copied != file.size:
        raise InputError(f"{file}: changed while it was copied ({copied} of {file.size} bytes)")


def model_card(meta: dict[str, str]) -> str:
    """OUT's README.md, from its provenance: an extrapolation's (REF, MEM, PREV, α, η), or a
    LoRA merge's (moxkit_base and moxkit_adapters, moxkit.adapters.merge)."""
    if "moxkit_base" in meta:
        title, made = "Model made by moxkit", "merging LoRA adapters into a base model"
        rows = [f"| base model (base) | `{meta['moxkit_base']}` |"]
        rows += [f"| adapter | `{a}` |" for a in json.loads(meta["moxkit_adapters"])]
    else:
        title = "Forget model made by moxkit"
        made = "MOX unlearning (memorize to forget, by model extrapolation)"
        rows = [
            f"| reference (ref) | `{meta['moxkit_ref']}` |",
            f"| memorization model (mem) | `{meta['moxkit_mem']}` |",
        ]
        if "moxkit_prev" in meta:
            rows.append(f"| previous forget model (prev) | `{meta['moxkit_prev']}` |")
            rows.append(f"| eta | {meta['moxkit_eta']} |")
        rows.append(f"| alpha | {meta['moxkit_alpha']} |")
    lines = [
        "---",
        "tags:",
        "- moxkit",
        "- unlearning",
        "- model-extrapolation",
        "---",
        "",
        f"# {title}",
        "",
        f"This model was produced by {made}:",
        "",
        f"    {meta['moxkit_formula']}",
        "",
        "| | |",
        "|---|---|",
        *rows,
        f"| moxkit | {meta['moxkit_version']} |",
        f"| command | `{' '.join(sys.argv) if sys.argv and sys.argv[0] else 'Python API'}` |",
        "",
        "The same provenance is stored in every shard's safetensors `__metadata__`.",
        "",
    ]
    return "\n".join(lines)
