"""The baseline: what a user writes without moxkit. Load both checkpoints whole, compute each
tensor in fp32, save everything with one `save_file`.

Its peak memory is REF + MEM + OUT at once (about 3x the model), which is the reason moxkit
streams instead. Kept deliberately plain: this is the script the benchmark compares against,
not a tool.

    python benchmarks/plain_extrapolate.py REF MEM OUT --alpha 4
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

INDEX = "model.safetensors.index.json"


def load_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file or a Hugging Face directory, in memory."""
    if path.is_file():
        return load_file(path)
    index = path / INDEX
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(path / name))
    return state


def extrapolate(ref: dict, mem: dict, alpha: float) -> dict[str, torch.Tensor]:
    """(1+α)·ref − α·mem per tensor in fp32, rounded once to ref's dtype."""
    out = {}
    for name, r in ref.items():
        if r.is_floating_point():
            out[name] = ((1.0 + alpha) * r.float() - alpha * mem[name].float()).to(r.dtype)
        else:
            out[name] = r.clone()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", type=Path)
    parser.add_argument("mem", type=Path)
    parser.add_argument("out", type=Path, help="output directory")
    parser.add_argument("--alpha", type=float, default=4.0)
    args = parser.parse_args()

    ref = load_all(args.ref)
    mem = load_all(args.mem)
    out = extrapolate(ref, mem, args.alpha)
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(out, args.out / "model.safetensors", metadata={"format": "pt"})
    if args.ref.is_dir():
        for extra in args.ref.glob("*.json"):
            if extra.name != INDEX:
                shutil.copy2(extra, args.out / extra.name)


if __name__ == "__main__":
    main()
