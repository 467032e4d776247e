"""Which precision training computes in, and what the frozen reference θ_ref is held in.

bf16 autocast (fp32 master weights, bf16 matmuls) is the default on a CUDA device that supports
it. On a CPU it is opt-in (--bf16), and allowed only where the CPU computes bf16 natively
(AVX512-BF16 or AMX-BF16; elsewhere it would be emulated, slower than fp32). Measured on
SmolLM2-135M with AVX512-BF16 (docs/performance.md, Training): 1.4–1.6× the tokens/s, but the
same short memorization reached a forget level 4 nats (5% of its gain) short of fp32's, 15–20×
the spread between seeds, so it does not hold well enough to be the CPU default
(CPU_BF16_DEFAULT).

The reference only ever runs forward. Held as "stored" it is a copy in MODEL's stored dtype
(fp32 for an fp32 checkpoint: 4 bytes per parameter); as "bf16" its linear layers' weights
are bf16 (2 bytes) and its forward runs under bf16 autocast. Under bf16 autocast the trained
model's linear layers compute from the same bf16-rounded weights, so a "bf16" reference gives
the same logits as an fp32 one there, at about half its memory: "auto" picks it then.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch

from moxkit.errors import InputError, ResourceError

CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")  # /proc/cpuinfo names of native bf16 arithmetic
REFERENCE_MODES = ("auto", "stored", "bf16")
CPU_BF16_DEFAULT = False  # measured: faster, but memorizes less (the module docstring)


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
    """bf16 autocast by default: on CUDA where supported; on a CPU that computes it natively
    only if CPU_BF16_DEFAULT (see the module docstring)."""
    if use_cuda:
        return torch.cuda.is_bf16_supported()
    return CPU_BF16_DEFAULT and cpu_has_bf16(flags)


def check_bf16(bf16: bool, use_cuda: bool, flags: Iterable[str] | None = None) -> None:
    """Refuse bf16 on a CPU that would emulate it."""
    if bf16 and not use_cuda and not cpu_has_bf16(flags):
        raise ResourceError("bf16=True: this CPU has neither AVX512-BF16 nor AMX-BF16, so "
                            "bf16 autocast would be emulated and slower than fp32",
                            params=("bf16",))  # fmt: skip


def reference_mode(mode: str, *, bf16: bool, separate_copy: bool, targeted: bool) -> str:
    """ "stored" or "bf16" for a requested mode. auto: bf16 when training runs under bf16
    autocast and the reference is a copy made for the run (with init_from, MODEL itself is
    the reference and stays as stored, since the extrapolation reads it exactly). Targeted
    MOX builds (1+α)·θ_ref − α·θ from the reference's weights, which need every bit."""
    if mode not in REFERENCE_MODES:
        raise InputError(f"reference {mode!r}: expected one of {', '.join(REFERENCE_MODES)}",
                         params=("reference",))  # fmt: skip
    if mode == "bf16" and targeted:
        raise InputError("reference='bf16': targeted MOX extrapolates the reference's weights; "
                         "use reference='stored'", params=("reference",))  # fmt: skip
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
