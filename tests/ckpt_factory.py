"""Builders for test checkpoints and the independent oracles the engine is held to."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

# numpy has no bfloat16: bf16 values are carried as float32 (exact) and rounded back with
# torch's own conversion, which is the round-to-nearest-even reference here.


def to_f32(t: torch.Tensor) -> np.ndarray:
    return t.to(torch.float32).numpy()


def emulate(ref, mem, alpha, prev=None, eta=None, out_dtype=torch.bfloat16) -> torch.Tensor:
    """The documented op order in numpy float32 (each op rounded to fp32, no FMA), then one
    rounding to the output dtype: what every backend must reproduce bit for bit."""
    f32 = np.float32
    r, m = to_f32(ref), to_f32(mem)
    base = (f32(1.0 + alpha) * r) - (f32(alpha) * m)
    if prev is not None:
        base = (f32(eta) * base) + (f32(1.0 - eta) * to_f32(prev))
    return torch.from_numpy(np.ascontiguousarray(base)).to(out_dtype)


def oracle64(ref, mem, alpha, prev=None, eta=None) -> torch.Tensor:
    """fp64 arithmetic: the value the fp32 pipeline approximates."""
    r, m = ref.double(), mem.double()
    out = (1.0 + alpha) * r - alpha * m
    if prev is not None:
        out = eta * out + (1.0 - eta) * prev.double()
    return out


def random_tensor(shape, dtype, seed: int, scale: float = 1.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float32) * scale).to(dtype)


def save_sharded(tensors: dict[str, torch.Tensor], directory: Path, per_shard: int) -> None:
    """A model directory in transformers' layout: `per_shard` tensors per shard + index."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(tensors)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    if len(groups) == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: tensors[n] for n in group}, directory / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in group})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


def write_raw_safetensors(path: Path, header: dict, data: bytes) -> None:
    """A safetensors file with a hand-made header, for corrupt-input tests."""
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)


def write_random_bf16_file(path: Path, name: str, numel: int, seed: int) -> None:
    """One large finite bf16 tensor written piece by piece, never held whole in memory."""
    header = {name: {"dtype": "BF16", "shape": [numel], "data_offsets": [0, 2 * numel]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    block = random_bf16_bits(1 << 22, seed).astype("<u2").tobytes()  # repeated: fast to write
    with open(path, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for start in range(0, numel, 1 << 22):
            n = min(1 << 22, numel - start)
            fh.write(block[: 2 * n])


def random_bf16_bits(n: int, seed: int) -> np.ndarray:
    """Bit patterns of finite bf16 values with |x| in [2^-15, 2^4)."""
    rng = np.random.default_rng(seed)
    exponent = rng.integers(112, 131, n, dtype=np.uint16)
    mantissa = rng.integers(0, 128, n, dtype=np.uint16)
    sign = rng.integers(0, 2, n, dtype=np.uint16)
    return (sign << 15) | (exponent << 7) | mantissa


def bf16_from_bits(bits: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(bits.astype(np.int16)).view(torch.bfloat16)
