"""Everything in OUT besides the weights: provenance for the safetensors metadata, REF's
non-weight files carried over (config, tokenizer, generation config, chat template), and a
model card that says how the model was made."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from . import __version__
from .backends import Coefficients
from .checkpoint import Checkpoint
from .errors import MoxError
from .plan import CONFIG_DTYPE_NAMES

# files of a model directory that hold weights (not carried over: the output has its own)
WEIGHT_SUFFIXES = (
    ".safetensors",
    ".bin",
    ".pt",
    ".pth",
    ".ckpt",
    ".h5",
    ".msgpack",
    ".gguf",
    ".onnx",
)
WEIGHT_INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")


def provenance(
    ref: Checkpoint, mem: Checkpoint, prev: Checkpoint | None, coeffs: Coefficients
) -> dict[str, str]:
    meta = {
        "format": "pt",
        "moxkit_version": __version__,
        "moxkit_alpha": repr(coeffs.alpha),
        "moxkit_ref": str(ref.path.resolve()),
        "moxkit_mem": str(mem.path.resolve()),
        "moxkit_formula": "(1+alpha)*ref - alpha*mem",
    }
    if prev is not None:
        meta["moxkit_prev"] = str(prev.path.resolve())
        meta["moxkit_eta"] = repr(coeffs.eta)
        meta["moxkit_formula"] = "eta*((1+alpha)*ref - alpha*mem) + (1-eta)*prev"
    return meta


def carry_files(src: Path, dst: Path, out_dtype: str | None) -> list[str]:
    """Copy REF's non-weight files (config, tokenizer, generation config, chat template);
    config.json's dtype follows --dtype."""
    carried = []
    for path in sorted(src.iterdir()):
        name = path.name
        if (
            not path.is_file()
            or name.startswith(".")
            or name == "README.md"
            or name.endswith(WEIGHT_SUFFIXES)
            or name.endswith(WEIGHT_INDEX_SUFFIXES)
        ):
            continue
        shutil.copy2(path, dst / name)
        carried.append(name)
    config = dst / "config.json"
    if out_dtype is not None and config.is_file():
        try:
            data = json.loads(config.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MoxError(
                f"{src / 'config.json'}: not valid JSON; cannot update its dtype"
            ) from None
        keys = [k for k in ("torch_dtype", "dtype") if k in data] or ["dtype"]
        for key in keys:
            data[key] = CONFIG_DTYPE_NAMES[out_dtype]
        config.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    return carried


def model_card(meta: dict[str, str]) -> str:
    lines = [
        "---",
        "tags:",
        "- moxkit",
        "- unlearning",
        "- model-extrapolation",
        "---",
        "",
        "# Forget model made by moxkit",
        "",
        "This model was produced by MOX unlearning (memorize to forget, by model extrapolation):",
        "",
        f"    {meta['moxkit_formula']}",
        "",
        "| | |",
        "|---|---|",
        f"| reference (ref) | `{meta['moxkit_ref']}` |",
        f"| memorization model (mem) | `{meta['moxkit_mem']}` |",
    ]
    if "moxkit_prev" in meta:
        lines.append(f"| previous forget model (prev) | `{meta['moxkit_prev']}` |")
        lines.append(f"| eta | {meta['moxkit_eta']} |")
    lines += [
        f"| alpha | {meta['moxkit_alpha']} |",
        f"| moxkit | {meta['moxkit_version']} |",
        f"| command | `{' '.join(sys.argv) if sys.argv and sys.argv[0] else 'Python API'}` |",
        "",
        "The same provenance is stored in every shard's safetensors `__metadata__`.",
        "",
    ]
    return "\n".join(lines)
