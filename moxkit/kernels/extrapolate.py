"""The fused MOX extrapolation kernel: every input read once, the output written once.

It computes exactly the function fixed in moxkit.engine.formula (the fp32 operations in a set order,
no fused multiply-add, one round-to-nearest-even to the output dtype, NaN written as the
canonical quiet NaN), so the GPU, the Triton interpreter and the CPU backend agree bit for bit.
Two details make that hold:
- the output is stored as integer bits, and the bf16 rounding is done with integer operations,
  because the interpreter truncates fp32 -> bf16 casts where the GPU rounds to nearest even;
- the launch passes enable_fp_fusion=False, or LLVM would contract a·r − b·m into an FMA.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from moxkit.engine.dtypes import TABLE
from moxkit.engine.formula import PAPER_ETA, Coefficients
from moxkit.engine.torch_path import BITS_DTYPES, DTYPE_NAMES, FLOAT_DTYPES
from moxkit.errors import InputError, MismatchError

# BLOCK elements and NUM_WARPS warps per program. A starting point (16 elements a thread, four
# 16-byte fp32 loads), not yet a measurement: the GPU sweep of benchmarks/kernel_throughput.py
# picks the configuration (see benchmarks/results/kernel_throughput.md); set these from it.
BLOCK = 4096
NUM_WARPS = 8

# Output kinds, a compile-time constant of the kernel: how the result is rounded and stored
# (the C loop's numbering, from the dtype table).
_OUT_KIND = {dtype: TABLE[code].c_code for dtype, code in DTYPE_NAMES.items()}


@triton.jit
def _extrapolate_kernel(
    out_ptr,  # int32 (fp32 output) or int16 (bf16/fp16 output) view of the output
    ref_ptr,
    mem_ptr,
    prev_ptr,  # ignored unless HAS_PREV
    bad_ptr,  # int32[1], set to 1 when any output value is NaN or ±inf
    n,
    a,  # fp32(1+α)
    b,  # fp32(α)
    e,  # fp32(η)
    c,  # fp32(1−η)
    HAS_PREV: tl.constexpr,
    OUT_KIND: tl.constexpr,
    NAN_BITS: tl.constexpr,  # the output dtype's canonical NaN (moxkit.engine.formula)
    BLOCK: tl.constexpr,
):
    # int64 offsets: tensors past 2**31 elements must not wrap.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    r = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    m = tl.load(mem_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    x = r * a - m * b
    if HAS_PREV:
        p = tl.load(prev_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        x = x * e + p * c
    is_nan = x != x
    if OUT_KIND == 0:
        bits = tl.where(is_nan, NAN_BITS, x.to(tl.int32, bitcast=True))
        bad = (bits & 0x7F800000) == 0x7F800000
    elif OUT_KIND == 1:
        # bf16: round to nearest even on the upper 16 bits (no overflow: NaN is handled apart)
        u = x.to(tl.uint32, bitcast=True)
        rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        bits = tl.where(is_nan, NAN_BITS, rounded.to(tl.int32)).to(tl.int16)
        bad = (bits & 0x7F80) == 0x7F80
    else:
        # fp16: the cast rounds to nearest even on the GPU and in the interpreter alike
        h = x.to(tl.float16).to(tl.int16, bitcast=True).to(tl.int32)
        bits = tl.where(is_nan, NAN_BITS, h).to(tl.int16)
        bad = (bits & 0x7C00) == 0x7C00
    tl.store(out_ptr + offs, bits, mask=mask)
    if tl.sum((bad & mask).to(tl.int32), axis=0) > 0:
        tl.store(bad_ptr, 1)


def _check(name: str, t: torch.Tensor, shape: torch.Size, device: torch.device) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise InputError(
            f"moxkit.kernels.extrapolate: {name} has dtype {t.dtype}; "
            "expected float32, bfloat16 or float16"
        )
    if t.shape != shape:
        raise MismatchError(
            f"moxkit.kernels.extrapolate: {name} has shape {tuple(t.shape)}, ref has {tuple(shape)}"
        )
    if t.device != device:
        raise MismatchError(f"moxkit.kernels.extrapolate: {name} is on {t.device}, ref on {device}")
    if not t.is_contiguous():
        raise InputError(
            f"moxkit.kernels.extrapolate: {name} is not contiguous (call .contiguous() first)"
        )


def launch(
    out: torch.Tensor,
    ref: torch.Tensor,
    mem: torch.Tensor,
    prev: torch.Tensor | None,
    coeffs: Coefficients,
    bad: torch.Tensor,
    *,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
) -> None:
    """Enqueue the kernel on the current stream; `bad` (int32[1] on the same device) is set
    to 1 if any output value is not finite. Operands are checked by the caller."""
    n = out.numel()
    if n == 0:
        return
    if coeffs.momentum and prev is None:
        raise ValueError("launch: momentum needs prev")
    has_prev = coeffs.momentum
    grid = (triton.cdiv(n, block),)
    _extrapolate_kernel[grid](
        out.view(BITS_DTYPES[out.dtype]),
        ref,
        mem,
        prev if has_prev else ref,
        bad,
        n,
        coeffs.ref_scale,
        coeffs.mem_scale,
        coeffs.new_weight,
        coeffs.prev_weight,
        HAS_PREV=has_prev,
        OUT_KIND=_OUT_KIND[out.dtype],
        NAN_BITS=TABLE[DTYPE_NAMES[out.dtype]].nan_bits,
        BLOCK=block,
        num_warps=num_warps,
        enable_fp_fusion=False,
    )


def extrapolate(
    ref: torch.Tensor,
    mem: torch.Tensor,
    alpha: float,
    *,
    prev: torch.Tensor | None = None,
    eta: float = PAPER_ETA,
    out: torch.Tensor | None = None,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """out = (1+α)·ref − α·mem, or with prev: η·[(1+α)·ref − α·mem] + (1−η)·prev, η the
    weight of the newest extrapolation (the paper's by default, as moxkit.extrapolate).

    Contiguous tensors of one shape on one device, any mix of fp32/bf16/fp16; the result has
    out's dtype, or ref's when out is None. CPU tensors only under TRITON_INTERPRET=1."""
    if ref.dtype not in FLOAT_DTYPES:
        raise InputError(
            f"moxkit.kernels.extrapolate: ref has dtype {ref.dtype}; "
            "expected float32, bfloat16 or float16"
        )
    if ref.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise InputError(
            f"moxkit.kernels.extrapolate: ref is on {ref.device}; the kernel needs "
            "CUDA tensors (or TRITON_INTERPRET=1)"
        )
    if out is None:
        out = torch.empty_like(ref, memory_format=torch.contiguous_format)
    operands = {"ref": ref, "mem": mem, "out": out}
    if prev is not None:
        operands["prev"] = prev
    for name, t in operands.items():
        _check(name, t, ref.shape, ref.device)
    coeffs = Coefficients(alpha, eta if prev is not None else None)
    bad = torch.zeros(1, dtype=torch.int32, device=ref.device)
    launch(
        out.view(-1),
        ref.view(-1),
        mem.view(-1),
        None if prev is None else prev.view(-1),
        coeffs,
        bad,
        block=block,
        num_warps=num_warps,
    )
    return out
