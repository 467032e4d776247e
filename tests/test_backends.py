"""The backends against independent oracles: numpy fp32 arithmetic for the fixed operation
order, an fp64 round-to-nearest-even on the output grid for the rounding, hand-made ties.
CUDA tests compare the CUDA backend with the CPU one, byte for byte, directly and through
the engine; they are skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from moxkit.backends import CpuBackend, get_backend
from moxkit.errors import MoxError
from moxkit.formula import FP32_TINY, Coefficients
from moxkit.torch_path import CANONICAL_NAN_BITS

HAS_CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# (mantissa bits, minimum normal exponent, largest finite value) of each output grid
GRID = {torch.bfloat16: (7, -126, 3.3895313892515355e38), torch.float16: (10, -14, 65504.0)}


def rne_fp64(v: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Round fp64 values (exact fp32 values here) to the dtype's grid, ties to even, computed
    from the grid spacing in fp64 (exact: every quantity is a power of two times a small int)."""
    if dtype == torch.float32:
        return v.astype(np.float32).astype(np.float64)
    mant, emin, top = GRID[dtype]
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


def bits_of(t: torch.Tensor) -> torch.Tensor:
    return t.view(CANONICAL_NAN_BITS[t.dtype][0])


def random_operands(n: int, dtypes, seed: int, specials: bool = True):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, dt in enumerate(dtypes):
        scale = torch.exp2(torch.randint(-20, 12, (n,), generator=g).float())
        t = torch.randn(n, generator=g) * scale
        if specials and n > 8:
            t[i] = float("nan")
            t[3 + i] = float("inf") * (-1) ** i
            t[6] = float("inf")  # inf − inf in (1+α)·ref − α·mem: NaN
        out.append(t.to(dt))
    return out


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("n", [1, 7, 65537])
def test_cpu_backend_matches_oracle(dtype, momentum, n):
    ref, mem, prev = random_operands(n, [dtype] * 3, seed=n)
    coeffs = Coefficients(4.0, 0.675 if momentum else None)
    out = torch.empty(n, dtype=dtype)
    finite = CpuBackend(block_elems=4096).extrapolate(out, ref, mem, prev, coeffs)
    x32 = fp32_oracle(ref, mem, prev, coeffs)
    assert torch.equal(bits_of(out), expected_bits(x32, dtype))
    assert finite == bool(torch.isfinite(out).all())


def test_cpu_backend_mixed_dtypes():
    ref, mem, prev = random_operands(5000, [torch.bfloat16, torch.float32, torch.float16], seed=3)
    coeffs = Coefficients(2.5, 0.3)
    for out_dtype in DTYPES:
        out = torch.empty(5000, dtype=out_dtype)
        CpuBackend().extrapolate(out, ref, mem, prev, coeffs)
        assert torch.equal(bits_of(out), expected_bits(fp32_oracle(ref, mem, prev, coeffs),
                                                       out_dtype))


# α = 0 gives out = RN_out(ref): the rounding alone, on hand-made values (hex = output bits).
ROUNDING_CASES = {
    torch.bfloat16: [
        (1 + 2**-8, 0x3F80),  # tie, even below
        (1 + 3 * 2**-8, 0x3F82),  # tie, even above
        (1 + 2**-8 + 2**-20, 0x3F81),  # just above the tie
        (3.4028234663852886e38, 0x7F80),  # fp32 max overflows bf16 to inf
        (-3.4028234663852886e38, 0xFF80),
        (2**-134, 0x0000),  # tie between 0 and the smallest bf16 subnormal, 2**-133
        (3 * 2**-134, 0x0002),
    ],
    torch.float16: [
        (1 + 2**-11, 0x3C00),
        (1 + 3 * 2**-11, 0x3C02),
        (65519.0, 0x7BFF),  # below the overflow tie: max finite
        (65520.0, 0x7C00),  # the tie rounds to even: inf
        (2**-25, 0x0000),
        (3 * 2**-25, 0x0002),
        (-(2**-14) * (1 - 2**-11), 0x8400),  # rounds up into the normal range
    ],
}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_backend_rounding_by_hand(dtype):
    values, want = zip(*ROUNDING_CASES[dtype], strict=True)
    ref = torch.tensor(values, dtype=torch.float32)
    out = torch.empty(len(values), dtype=dtype)
    identity = Coefficients(FP32_TINY)  # a = 1, and mem = 0: out = RN(ref)
    finite = CpuBackend().extrapolate(out, ref, torch.zeros_like(ref), None, identity)
    got = [int(v) & 0xFFFF for v in bits_of(out)]
    assert got == list(want)
    assert finite is False  # the overflows are reported


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_backend_nan_is_canonical(dtype):
    nan_payloads = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0xFFC12345], dtype=np.uint32)
    ref = torch.from_numpy(nan_payloads.view(np.float32).copy())
    out = torch.empty(4, dtype=dtype)
    finite = CpuBackend().extrapolate(out, ref, torch.ones(4), None, Coefficients(1.0))
    assert not finite
    assert (bits_of(out) == CANONICAL_NAN_BITS[dtype][1]).all()


def test_cpu_backend_finite_flag():
    ref = torch.tensor([1.0, 2.0, 3.0])
    out = torch.empty(3, dtype=torch.float16)
    assert CpuBackend().extrapolate(out, ref, ref * 0.5, None, Coefficients(4.0))
    ref[1] = 60000.0  # finite input, (1+4)·60000 overflows fp16
    assert not CpuBackend().extrapolate(out, ref, ref * 0, None, Coefficients(4.0))


def test_cpu_backend_refuses_bad_operands():
    be = CpuBackend()
    with pytest.raises(ValueError, match="length"):
        be.extrapolate(torch.empty(3), torch.ones(3), torch.ones(2), None, Coefficients(1.0))
    with pytest.raises(ValueError, match="prev"):
        be.extrapolate(torch.empty(3), torch.ones(3), torch.ones(3), None, Coefficients(1.0, 0.5))


def test_get_backend_cpu_and_auto():
    assert get_backend("cpu").name == "cpu"
    assert get_backend("auto").name == ("cuda" if HAS_CUDA else "cpu")
    with pytest.raises(MoxError, match="unknown device"):
        get_backend("tpu")


@pytest.mark.skipif(HAS_CUDA, reason="checks the error without CUDA")
def test_cuda_without_device_is_a_clear_error():
    with pytest.raises(MoxError, match="no CUDA device"):
        get_backend("cuda", max_gpu_memory=1 << 30)
    from moxkit.kernels.backend import CudaBackend

    with pytest.raises(MoxError, match="no CUDA device"):
        CudaBackend()


# ---------------------------------------------------------------- CUDA (skipped without one)

@pytest.mark.gpu
@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("dtypes", [[torch.bfloat16] * 4, [torch.float32] * 4,
                                    [torch.float16] * 4,
                                    [torch.bfloat16, torch.float32, torch.float16, torch.float16]])
def test_cuda_backend_equals_cpu_backend(dtypes, momentum):
    from moxkit.kernels.backend import MIN_PIECE, SLOTS, CudaBackend

    n = 3 * MIN_PIECE + MIN_PIECE // 2 + 17  # more pieces than slots: the ring wraps around
    ref, mem, prev = random_operands(n, dtypes[:3], seed=11)
    coeffs = Coefficients(4.0, 0.675 if momentum else None)
    want = torch.empty(n, dtype=dtypes[3])
    want_finite = CpuBackend().extrapolate(want, ref, mem, prev, coeffs)
    be = CudaBackend(max_gpu_memory=SLOTS * 16 * MIN_PIECE)  # the smallest: one piece a slot
    try:
        assert be.slot_elems == MIN_PIECE
        bufs = [be.allocate_host(n * t.element_size()) for t in (ref, mem, prev)]
        host = [b.view(t.dtype).copy_(t) for b, t in zip(bufs, (ref, mem, prev), strict=True)]
        out = be.allocate_host(n * want.element_size()).view(want.dtype)
        for _ in range(2):  # a second call reuses the slots and streams
            finite = be.extrapolate(out, *host, coeffs)
            assert torch.equal(bits_of(out), bits_of(want))
            assert finite == want_finite
    finally:
        be.close()


@pytest.mark.gpu
def test_cuda_backend_host_buffers_are_pinned_and_aligned():
    from moxkit.kernels.backend import CudaBackend

    be = CudaBackend(max_gpu_memory=256 << 20)
    try:
        assert be.allocate_host(0).numel() == 0
        for nbytes in (1, 4097, 10 << 20):
            buf = be.allocate_host(nbytes)
            assert buf.numel() == nbytes and buf.data_ptr() % 4096 == 0
            assert buf.is_pinned()
            buf.fill_(7)  # the whole span is usable
    finally:
        be.close()


@pytest.mark.gpu
def test_cuda_backend_budget_errors():
    from moxkit.kernels.backend import CudaBackend

    with pytest.raises(MoxError, match="too small"):
        CudaBackend(max_gpu_memory=1 << 20)
    with pytest.raises(MoxError, match="max-gpu-memory"):
        CudaBackend(max_gpu_memory="lots")
    with pytest.raises(MoxError, match="cannot allocate"):
        CudaBackend(max_gpu_memory=1 << 50)


def _write_checkpoint(path, seed: int, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    shapes = {"embed.weight": (1000, 1536), "layers.0.mlp.weight": (3001, 777),
              "layers.0.norm.weight": (777,), "head.bias": (5,)}
    save_file({k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()},
              str(path))


@pytest.mark.gpu
@pytest.mark.parametrize("momentum", [False, True])
def test_engine_cuda_equals_cpu(tmp_path, momentum):
    from safetensors.torch import load_file

    import moxkit

    paths = {}
    for i, name in enumerate(["ref", "mem", "prev"]):
        paths[name] = tmp_path / f"{name}.safetensors"
        _write_checkpoint(paths[name], seed=i, dtype=torch.bfloat16)
    extra = {"momentum": str(paths["prev"]), "eta": 0.675} if momentum else {}
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / f"out-{device}"
        moxkit.extrapolate(str(paths["ref"]), str(paths["mem"]), str(outs[device]), 4.0,
                           device=device, max_memory="2GiB", max_gpu_memory="48MiB",
                           progress=False, **extra)
    cpu = load_file(str(outs["cpu"] / "model.safetensors"))
    gpu = load_file(str(outs["cuda"] / "model.safetensors"))
    assert cpu.keys() == gpu.keys() and len(cpu) == 4
    for name in cpu:
        assert torch.equal(bits_of(cpu[name].view(-1)), bits_of(gpu[name].view(-1))), name


@pytest.mark.skipif(HAS_CUDA, reason="checks the error without CUDA")
def test_cli_device_cuda_without_gpu_is_one_line(tmp_path, capsys):
    pytest.importorskip("moxkit.cli.extrapolate")  # the engine's CLI (lands separately)
    from moxkit.cli.main import main

    for name in ("ref", "mem"):
        _write_checkpoint(tmp_path / f"{name}.safetensors", seed=0, dtype=torch.bfloat16)
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["extrapolate", str(tmp_path / "ref.safetensors"), str(tmp_path / "mem.safetensors"),
              "--alpha", "4", "-o", str(out), "--device", "cuda", "--quiet"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moxkit: error:") and "cuda" in err[0].lower()
    assert not out.exists()
