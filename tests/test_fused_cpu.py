"""The fused C loop against the torch-ops path (itself held to numpy and fp64 oracles in
test_extrapolate.py), bit for bit, on the values where they could differ: rounding ties,
overflow to inf in the output rounding, NaN and inf inputs, subnormals, every mix of dtypes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moxkit.backends import Coefficients, CpuBackend, _fused_library

DTYPES = [torch.bfloat16, torch.float16, torch.float32]


def test_the_c_library_is_built():
    # without it every comparison below would hold the torch path to itself
    assert _fused_library() is not None, "moxkit/_fused.c was not built at install time"


def _operand(dtype, seed, n=10_007):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(
        torch.randint(-130, 120, (n,), generator=g).float()
    )
    specials = torch.tensor(
        [0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -1e-45, 3.3e38, -3.3e38,
         1 + 2**-8, 1 + 3 * 2**-8]
    )  # fmt: skip
    x[: len(specials)] = specials
    return x.to(dtype)


def _bits(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32).numpy()


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ref_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mem_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("momentum", [False, True], ids=["plain", "momentum"])
def test_fused_matches_torch_path(out_dtype, ref_dtype, mem_dtype, momentum):
    ref, mem = _operand(ref_dtype, 1), _operand(mem_dtype, 2)
    prev = _operand(out_dtype, 3) if momentum else None
    coeffs = Coefficients(4.0, 0.675 if momentum else None)
    fused_out = torch.empty(len(ref), dtype=out_dtype)
    torch_out = torch.empty(len(ref), dtype=out_dtype)
    fused_ok = CpuBackend(fused=True).extrapolate(fused_out, ref, mem, prev, coeffs)
    torch_ok = CpuBackend(fused=False).extrapolate(torch_out, ref, mem, prev, coeffs)
    assert fused_ok == torch_ok is False  # the specials make some outputs non-finite
    np.testing.assert_array_equal(_bits(fused_out), _bits(torch_out))
    # the engine's own operands: numpy buffers, bf16 as uint16 bits
    as_np = {torch.bfloat16: lambda t: t.view(torch.int16).numpy().view(np.uint16)}
    to_np = lambda t: as_np.get(t.dtype, torch.Tensor.numpy)(t)  # noqa: E731
    np_out = torch.empty(len(ref), dtype=out_dtype)
    args = [to_np(np_out), to_np(ref), to_np(mem), to_np(prev) if momentum else None]
    assert CpuBackend().extrapolate(*args, coeffs) is False
    np.testing.assert_array_equal(_bits(np_out), _bits(torch_out))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_fused_reports_finite_and_overflow(dtype):
    ref = torch.full((100,), 2.0, dtype=dtype)
    assert CpuBackend().extrapolate(torch.empty_like(ref), ref, ref * 0.5, None, Coefficients(4.0))
    big = torch.full((100,), torch.finfo(dtype).max / 2, dtype=dtype)  # 5 · max/2 overflows
    out = torch.empty_like(big)
    assert not CpuBackend().extrapolate(out, big, big * 0, None, Coefficients(4.0))
    assert torch.isinf(out).all()


@pytest.mark.parametrize("momentum", [False, True], ids=["plain", "momentum"])
def test_threaded_split_matches_single_thread(momentum):
    n = 3 * (1 << 18) + 12345  # three uneven pieces
    ref, mem = _operand(torch.bfloat16, 4, n), _operand(torch.float16, 5, n)
    prev = _operand(torch.float32, 6, n) if momentum else None
    coeffs = Coefficients(2.0, 0.5 if momentum else None)
    outs = []
    for threads in (1, 3):
        out = torch.empty(n, dtype=torch.bfloat16)
        assert CpuBackend(threads=threads).extrapolate(out, ref, mem, prev, coeffs) is False
        outs.append(out)
    np.testing.assert_array_equal(_bits(outs[0]), _bits(outs[1]))
