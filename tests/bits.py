"""Shared pieces of the arithmetic tests (test_backends, test_fused_cpu, test_kernels): the
independent oracles, operands with the values where implementations differ, hand-made
rounding cases, and a way to force each path of the C loop.

The oracles do not use moxkit's arithmetic: numpy fp32 operations in the contract's order
(bit for bit), an fp64 round-to-nearest-even on each output grid, and an fp64 error bound."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import torch

from moxkit.engine import backends
from moxkit.engine.formula import FP32_TINY, Coefficients
from moxkit.engine.torch_path import CANONICAL_NAN_BITS

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (mantissa bits, minimum normal exponent, largest finite value) of each output grid
FORMAT = {
    torch.float32: (23, -126, float(np.finfo(np.float32).max)),
    torch.bfloat16: (7, -126, 3.3895313892515355e38),
    torch.float16: (10, -14, 65504.0),
}
U32 = 2.0**-24  # unit roundoff of fp32
# a = fp32(1 + 2**-126) = 1: with mem = 0 the result is RN_out(ref), the rounding alone
IDENTITY = Coefficients(FP32_TINY)

# NaNs of every sign and payload, quiet and signalling, as fp32 bits
NAN_PAYLOADS = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFC12345], dtype=np.uint32)

# RN_out(x) for hand-made x (hex = the output's bits): ties, overflow at rounding, subnormals.
ROUNDING_CASES = {
    torch.bfloat16: [
        (1 + 2**-8, 0x3F80),  # tie, even below
        (1 + 3 * 2**-8, 0x3F82),  # tie, even above
        (1 + 2**-8 + 2**-20, 0x3F81),  # just above the tie
        (3.4028234663852886e38, 0x7F80),  # fp32 max overflows bf16 to inf
        (-3.4028234663852886e38, 0xFF80),
        (2**-134, 0x0000),  # tie between 0 and the smallest bf16 subnormal, 2**-133
        (3 * 2**-134, 0x0002),
        (2**-133, 0x0001),  # the smallest subnormal is kept, not flushed
        (-(2**-127), 0x8040),  # a subnormal of both fp32 and bf16
    ],
    torch.float16: [
        (1 + 2**-11, 0x3C00),
        (1 + 3 * 2**-11, 0x3C02),
        (65519.0, 0x7BFF),  # below the overflow tie: max finite
        (65520.0, 0x7C00),  # the tie rounds to even: inf
        (2**-25, 0x0000),
        (3 * 2**-25, 0x0002),
        (2**-24, 0x0001),  # the smallest subnormal is kept, not flushed
        (-(2**-14) * (1 - 2**-11), 0x8400),  # rounds up into the normal range
    ],
    torch.float32: [
        (2.0**-149, 0x00000001),  # the smallest fp32 subnormal goes through unflushed
        (-(2.0**-130), 0x80080000),
    ],
}


def bits_of(t: torch.Tensor) -> torch.Tensor:
    """The integer view of a float tensor (same width)."""
    return t.view(CANONICAL_NAN_BITS[t.dtype][0])


def rne_fp64(v: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Round fp64 values (exact fp32 values here) to the dtype's grid, ties to even, computed
    from the grid spacing in fp64 (exact: every quantity is a power of two times a small int)."""
    if dtype == torch.float32:
        return v.astype(np.float32).astype(np.float64)
    mant, emin, top = FORMAT[dtype]
    out = np.array(v, dtype=np.float64)
    finite = np.isfinite(v) & (v != 0)
    a = np.abs(v[finite])
    exp = np.maximum(np.floor(np.log2(a)), emin)
    spacing = np.exp2(exp - mant)
    q = a / spacing
    lo = np.floor(q)
    frac = q - lo
    up = (frac > 0.5) | ((frac == 0.5) & (lo % 2 == 1))
    r = (lo + up) * spacing
    half_ulp_above_top = top + np.exp2(np.floor(np.log2(top)) - mant) / 2
    r[a >= half_ulp_above_top] = np.inf
    out[finite] = np.sign(v[finite]) * r
    return out


def fp32_oracle(ref, mem, prev, coeffs: Coefficients) -> np.ndarray:
    """The fixed fp32 operation order, in numpy (separate IEEE fp32 ops, never fused)."""
    f = np.float32
    r, m = ref.float().numpy(), mem.float().numpy()
    with np.errstate(all="ignore"):
        x = f(coeffs.ref_scale) * r - f(coeffs.mem_scale) * m
        if coeffs.momentum:
            x = f(coeffs.new_weight) * x + f(coeffs.prev_weight) * prev.float().numpy()
    return x


def expected_bits(x32: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """The output bits the contract asks for, from the fp32 result: RNE, canonical NaN."""
    int_dtype, nan_bits = CANONICAL_NAN_BITS[dtype]
    rounded = torch.from_numpy(rne_fp64(x32.astype(np.float64), dtype)).to(dtype)
    bits = rounded.view(int_dtype).clone()
    bits[torch.from_numpy(np.isnan(x32))] = nan_bits
    return bits


def check_fp64(out: torch.Tensor, ref, mem, prev, coeffs: Coefficients) -> None:
    """|out − y| ≤ 1 ulp(y) + 3·u32·Σ|terms|, y the exact result of the formula in fp64;
    beyond the largest finite value, ±inf; NaN where y is NaN; inf kept with its sign.
    Elements whose fp32 products may overflow (Σ|terms| ≥ fp32 max) are left out: there fp32
    gives inf or inf − inf where fp64 does not (the fp32 oracle holds those bit for bit)."""
    a, b, e, c = coeffs.ref_scale, coeffs.mem_scale, coeffs.new_weight, coeffs.prev_weight
    r, m = ref.double().numpy(), mem.double().numpy()
    with np.errstate(all="ignore"):
        y = a * r - b * m
        terms = base_terms = np.abs(a * r) + np.abs(b * m)
        if coeffs.momentum:
            p = prev.double().numpy()
            y, terms = e * y + c * p, e * terms + np.abs(c * p)
        big = np.maximum(base_terms, terms)
    keep = ~(np.isfinite(big) & (big >= FORMAT[torch.float32][2]))
    got, y, terms = out.double().numpy()[keep], y[keep], terms[keep]
    mant, emin, top = FORMAT[out.dtype]
    finite = np.isfinite(y) & np.isfinite(terms)
    ulp = np.exp2(np.maximum(np.floor(np.log2(np.abs(y[finite]) + 1e-300)), emin) - mant)
    tol = ulp + 3 * U32 * terms[finite]
    fits = np.abs(y[finite]) + tol < top  # beyond: the rounding may overflow to inf
    err = np.abs(got[finite] - y[finite])
    assert (err[fits] <= tol[fits]).all(), f"max error {err[fits].max()} ulps {(err / ulp).max()}"
    beyond = ~fits & (np.abs(y[finite]) > top * (1 + 2.0 ** -(mant + 1)))
    assert (got[finite][beyond] == np.sign(y[finite][beyond]) * np.inf).all()
    assert np.array_equal(np.isnan(got), np.isnan(y))
    inf = np.isinf(y)
    assert np.array_equal(got[inf], y[inf])


def random_operands(n: int, dtypes, seed: int, specials: bool = True) -> list[torch.Tensor]:
    """Normal-range values over 32 binades; with specials, a NaN, an inf of each sign and an
    inf in every operand at index 6 (inf − inf: NaN)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, dt in enumerate(dtypes):
        scale = torch.exp2(torch.randint(-20, 12, (n,), generator=g).float())
        t = torch.randn(n, generator=g) * scale
        if specials and n > 8:
            t[i] = float("nan")
            t[3 + i] = float("inf") * (-1) ** i
            t[6] = float("inf")
        out.append(t.to(dt))
    return out


def edge_operand(dtype: torch.dtype, seed: int, n: int = 10_007) -> torch.Tensor:
    """Values over the whole fp32 exponent range, where implementations differ: subnormals of
    every dtype, values that overflow when rounded, zeros of both signs, NaN and inf."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(
        torch.randint(-150, 128, (n,), generator=g).float()
    )
    nans = torch.from_numpy(NAN_PAYLOADS.view(np.float32).copy())
    specials = torch.cat([nans, torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), 1e-40, -1e-45, 2.0**-133, 2.0**-24, 6e-8,
         3.3e38, -3.3e38, 65519.0, 65520.0, 13104.0, 1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11]
    )])  # fmt: skip
    x[: len(specials)] = specials
    x[len(specials) :: 97] = float("nan")  # NaNs inside the vector body too, not only the head
    return x.to(dtype)


@contextlib.contextmanager
def forced_cpu_path(name: str) -> Iterator[None]:
    """Every call of the C loop takes path `name` (generic, avx2, avx512) inside the block."""
    backends.set_cpu_path(name)
    try:
        yield
    finally:
        backends.set_cpu_path(None)


# the C loop's paths this machine can run; each arithmetic test runs on all of them
CPU_PATHS = backends.cpu_paths()
