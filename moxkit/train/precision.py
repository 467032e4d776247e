"""Which precision training computes in, and what the frozen reference θ_ref is held in.

bf16 autocast (fp32 master weights, bf16 matmuls) is the default where the hardware computes
bf16 natively: a CUDA device that supports it, or a CPU with AVX512-BF16 or AMX-BF16 (oneDNN's
bf16 kernels). Elsewhere a CPU emulates bf16 and autocast is slower than fp32, so it stays off.
benchmarks/train_cost.py measures the speed both ways and benchmarks/train_bf16.py that a
memorization reaches the same forget NLL (docs/performance.md, Training).

The reference only ever runs forward. Held as "stored" it is a copy in MODEL's stored dtype
(fp32 for an fp32 checkpoint: 4 bytes per parameter); as "bf16" its linear layers' weights
are bf16 (2 bytes) and its forward runs under bf16 autocast. Under bf16 autocast the trained
model's linear layers compute from the same bf16-rounded weights, so a "bf16" reference gives
the same logits as an fp32 one there, at half its memory: "auto" picks it then.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch

from moxkit.errors import MoxError

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of native bf16 arithmetic
REFERENCE_MODES = ("auto", "stored", "bf16")


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them (empty where /proc/cpuinfo is missing)."""
    return flags_in(Path("/proc/cpuinfo"))


def flags_in(cpuinfo: Path) -> set[str]:
    """The first `flags` line of a /proc/cpuinfo-style file, as a set."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_bf16(flags: Iterable[str] | None = None) -> bool:
    """Whether this CPU computes bf16 natively: AVX512-BF16 or AMX-BF16 among its flags (or,
    where the kernel lists no flags, torch's own probe of the same instructions)."""
    found = set(cpu_flags() if flags is None else flags)
    if found:
        return bool(found & set(CPU_BF16_FLAGS))
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def default_bf16(use_cuda: bool, flags: Iterable[str] | None = None) -> bool:
    """bf16 autocast when the device computes bf16 natively (see the module docstring)."""
    if use_cuda:
        return torch.cuda.is_bf16_supported()
    return cpu_has_bf16(flags)


def reference_mode(mode: str, *, bf16: bool, separate_copy: bool, targeted: bool) -> str:
    """ "stored" or "bf16" for a requested mode. auto: bf16 when training runs under bf16
    autocast and the reference is a copy made for the run (with init_from, MODEL itself is
    the reference and stays as stored, since the extrapolation reads it exactly). Targeted
    MOX builds (1+α)·θ_ref − α·θ from the reference's weights, which need every bit."""
    if mode not in REFERENCE_MODES:
        raise MoxError(f"reference {mode!r}: expected one of {', '.join(REFERENCE_MODES)}")
    if mode == "bf16" and targeted:
        raise MoxError("reference bf16: targeted MOX extrapolates the reference's weights; "
                       "use reference stored")  # fmt: skip
    if mode == "auto":
        return "bf16" if bf16 and separate_copy and not targeted else "stored"
    return mode


def frozen_reference(model, stored: torch.dtype, mode: str, copy_it: bool):
    """θ_ref for the loss, frozen and in eval mode: as stored, a copy of `model` (or `model`
    itself when `copy_it` is false); as bf16, always a copy (`model` may be read exactly
    later, e.g. by the extrapolation) whose linear weights are made bf16 while copying, so
    that a second full fp32 copy never exists."""
    if mode == "bf16":
        memo = {}
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and not _shared(model, module.weight):
                memo[id(module.weight)] = torch.nn.Parameter(
                    module.weight.detach().to(torch.bfloat16), requires_grad=False
                )
        ref = copy.deepcopy(model, memo)
    else:
        ref = copy.deepcopy(model) if copy_it else model
        ref.to(stored)
    return ref.eval().requires_grad_(False)


def _shared(model, weight: torch.Tensor) -> bool:
    """A weight that a non-linear module uses too (tied embeddings): it stays as it is, or
    the embedding's output would change."""
    return any(
        weight is p
        for m in model.modules()
        if not isinstance(m, torch.nn.Linear)
        for p in m.parameters(recurse=False)
    )
