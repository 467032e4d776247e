"""The Triton kernel: bit-exact against the CPU backend, within one ulp of an fp64 oracle (plus
fp32's forward error bound where the result cancels). Runs under TRITON_INTERPRET=1 on the CPU
(sizes kept small: the interpreter is slow) and unchanged on a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bits import (
    DTYPES,
    IDENTITY,
    NAN_PAYLOADS,
    ROUNDING_CASES,
    bits_of,
    check_fp64,
    random_operands,
)

from moxkit.engine.backends import CpuBackend
from moxkit.engine.formula import PAPER_ETA, Coefficients
from moxkit.engine.torch_path import CANONICAL_NAN_BITS
from moxkit.errors import MoxError
from moxkit.kernels import extrapolate
from moxkit.kernels.extrapolate import BLOCK, launch

pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def on_device(*ts):
    return [None if t is None else t.to(DEVICE) for t in ts]


def cpu_backend(ref, mem, prev, coeffs, out_dtype):
    out = torch.empty(ref.numel(), dtype=out_dtype)
    finite = CpuBackend().extrapolate(out, ref, mem, prev, coeffs)
    return out, finite


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("n", [1, 7, BLOCK - 1, BLOCK + 1, 3 * BLOCK + 5])
def test_kernel_equals_cpu_backend_and_fp64(dtype, momentum, n):
    ref, mem, prev = random_operands(n, [dtype] * 3, seed=n + momentum)
    coeffs = Coefficients(4.0, PAPER_ETA if momentum else None)
    got = extrapolate(
        *on_device(ref, mem), 4.0, prev=on_device(prev)[0] if momentum else None, eta=PAPER_ETA
    ).cpu()
    want, _ = cpu_backend(ref, mem, prev, coeffs, dtype)
    assert got.dtype == dtype
    assert torch.equal(bits_of(got), bits_of(want))
    check_fp64(got, ref, mem, prev, coeffs)


@pytest.mark.parametrize("out_dtype", DTYPES)
def test_kernel_mixed_dtypes(out_dtype):
    n = 2 * BLOCK + 3
    ref, mem, prev = random_operands(n, [torch.bfloat16, torch.float32, torch.float16], seed=5)
    coeffs = Coefficients(2.5, 0.3)
    out = torch.empty(n, dtype=out_dtype, device=DEVICE)
    got = extrapolate(*on_device(ref, mem), 2.5, prev=on_device(prev)[0], eta=0.3, out=out)
    assert got is out
    want, _ = cpu_backend(ref, mem, prev, coeffs, out_dtype)
    assert torch.equal(bits_of(got.cpu()), bits_of(want))
    check_fp64(got.cpu(), ref, mem, prev, coeffs)


@pytest.mark.parametrize("block,num_warps", [(128, 4), (1024, 4), (BLOCK, 8), (16384, 16)])
def test_kernel_configs_agree(block, num_warps):
    """Every block size the benchmark may pick computes the same bits."""
    n = 3 * block + 77
    ref, mem, prev = random_operands(n, [torch.bfloat16] * 3, seed=block)
    got = extrapolate(
        *on_device(ref, mem),
        4.0,
        prev=on_device(prev)[0],
        eta=PAPER_ETA,
        block=block,
        num_warps=num_warps,
    )
    want, _ = cpu_backend(ref, mem, prev, Coefficients(4.0, PAPER_ETA), torch.bfloat16)
    assert torch.equal(bits_of(got.cpu()), bits_of(want))


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_rounding_by_hand(dtype):
    values, want = zip(*ROUNDING_CASES[dtype], strict=True)
    ref = torch.tensor(values, dtype=torch.float32, device=DEVICE)
    out = torch.empty(len(values), dtype=dtype, device=DEVICE)
    extrapolate(ref, torch.zeros_like(ref), IDENTITY.alpha, out=out)  # out = RN(ref)
    mask = 0xFFFFFFFF if dtype == torch.float32 else 0xFFFF
    assert [int(v) & mask for v in bits_of(out.cpu())] == list(want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_nonfinite_flag_and_canonical_nan(dtype):
    nans = torch.from_numpy(NAN_PAYLOADS.view(np.float32).copy())
    cases = {
        "finite": (torch.tensor([1.0, -2.0, 3.0, 0.5]), False),
        "nan": (nans, True),
        "inf": (torch.tensor([1.0, float("-inf"), 3.0, 0.5]), True),
        "overflow": (torch.tensor([1.0, 2.0, 3.0, 3.0e38]), True),  # (1+α)·x overflows fp32
    }
    for name, (ref, want_bad) in cases.items():
        ref, mem = on_device(ref, torch.ones(4))
        out = torch.empty(4, dtype=dtype, device=DEVICE)
        bad = torch.zeros(1, dtype=torch.int32, device=DEVICE)
        launch(out, ref, mem, None, Coefficients(1.0), bad)
        assert bool(bad.item()) == want_bad, name
        want, finite = cpu_backend(ref.cpu(), mem.cpu(), None, Coefficients(1.0), dtype)
        assert finite != want_bad
        assert torch.equal(bits_of(out.cpu()), bits_of(want)), name
        if name == "nan":
            assert (bits_of(out.cpu()) == CANONICAL_NAN_BITS[dtype][1]).all()


def test_kernel_keeps_shape_and_refuses_bad_operands(monkeypatch):
    ref = torch.randn(6, 5, device=DEVICE)
    mem = torch.randn(6, 5, device=DEVICE)
    assert extrapolate(ref, mem, 1.0).shape == (6, 5)
    with pytest.raises(MoxError, match="mem is not contiguous"):
        extrapolate(ref, mem.t().contiguous().t(), 1.0)
    with pytest.raises(MoxError, match="prev has shape"):
        extrapolate(ref, mem, 1.0, prev=torch.randn(30, device=DEVICE))
    with pytest.raises(MoxError, match="out has dtype"):
        extrapolate(ref, mem, 1.0, out=torch.empty(6, 5, dtype=torch.int32, device=DEVICE))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(MoxError, match="needs CUDA tensors"):
        extrapolate(ref.cpu(), mem.cpu(), 1.0)


@pytest.mark.gpu
def test_kernel_past_int32_offsets():
    """2**31 + a tail elements: the last ones are only right if offsets are 64-bit."""
    n = 2**31 + 3001
    g = torch.Generator(device="cuda").manual_seed(0)
    ref = torch.randn(n, generator=g, device="cuda", dtype=torch.float16)
    mem = torch.randn(n, generator=g, device="cuda", dtype=torch.float16)
    out = extrapolate(ref, mem, 4.0)
    for sl in (slice(0, 1 << 20), slice(n - (1 << 20), n)):
        want, _ = cpu_backend(ref[sl].cpu(), mem[sl].cpu(), None, Coefficients(4.0), torch.float16)
        assert torch.equal(bits_of(out[sl].cpu()), bits_of(want))
