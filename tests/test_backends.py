"""The backends against independent oracles: numpy fp32 arithmetic for the fixed operation
order, an fp64 round-to-nearest-even on the output grid for the rounding, hand-made ties.
CUDA tests compare the CUDA backend with the CPU one, byte for byte, directly and through
the engine; they are skipped without a GPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from bits import (
    CPU_PATHS,
    DTYPES,
    IDENTITY,
    NAN_PAYLOADS,
    ROUNDING_CASES,
    bits_of,
    check_fp64,
    edge_operand,
    expected_bits,
    forced_cpu_path,
    fp32_oracle,
    random_operands,
)

from moxkit.engine.backends import CpuBackend, get_backend
from moxkit.engine.formula import PAPER_ETA, Coefficients
from moxkit.engine.torch_path import CANONICAL_NAN_BITS
from moxkit.errors import InputError, MoxError

HAS_CUDA = torch.cuda.is_available()


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("momentum", [False, True])
@pytest.mark.parametrize("n", [1, 7, 4099])
def test_cpu_backend_matches_oracle(path, dtype, momentum, n):
    ref, mem, prev = random_operands(n, [dtype] * 3, seed=n)
    coeffs = Coefficients(4.0, PAPER_ETA if momentum else None)
    out = torch.empty(n, dtype=dtype)
    with forced_cpu_path(path):
        finite = CpuBackend(block_elems=4096).extrapolate(out, ref, mem, prev, coeffs)
    x32 = fp32_oracle(ref, mem, prev, coeffs)
    assert torch.equal(bits_of(out), expected_bits(x32, dtype))
    assert finite == bool(torch.isfinite(out).all())


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("in_dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("momentum", [False, True])
def test_cpu_paths_on_edge_values(path, in_dtype, out_dtype, momentum):
    """Subnormals, NaN payloads, inf, overflow at rounding, ties: bit for bit against the
    numpy fp32 oracle and within the fp64 error bound, on each path of the C loop."""
    ref, mem, prev = (edge_operand(in_dtype, seed) for seed in (1, 2, 3))
    coeffs = Coefficients(4.0, PAPER_ETA if momentum else None)
    prev = prev if momentum else None
    out = torch.empty(len(ref), dtype=out_dtype)
    with forced_cpu_path(path):
        finite = CpuBackend().extrapolate(out, ref, mem, prev, coeffs)
    assert torch.equal(bits_of(out), expected_bits(fp32_oracle(ref, mem, prev, coeffs), out_dtype))
    check_fp64(out, ref, mem, prev, coeffs)
    assert finite is False


@pytest.mark.parametrize("path", CPU_PATHS)
def test_cpu_backend_mixed_dtypes(path):
    ref, mem, prev = random_operands(5000, [torch.bfloat16, torch.float32, torch.float16], seed=3)
    coeffs = Coefficients(2.5, 0.3)
    for out_dtype in DTYPES:
        out = torch.empty(5000, dtype=out_dtype)
        with forced_cpu_path(path):
            CpuBackend().extrapolate(out, ref, mem, prev, coeffs)
        assert torch.equal(
            bits_of(out), expected_bits(fp32_oracle(ref, mem, prev, coeffs), out_dtype)
        )


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("repeat", [1, 40], ids=["scalar", "vector"])
def test_cpu_backend_rounding_by_hand(path, dtype, repeat):
    """Each case alone (the scalar tail) and repeated past a vector width (the vector body)."""
    values, want = zip(*ROUNDING_CASES[dtype], strict=True)
    ref = torch.tensor(values * repeat, dtype=torch.float32)
    out = torch.empty(len(ref), dtype=dtype)
    with forced_cpu_path(path):
        finite = CpuBackend().extrapolate(out, ref, torch.zeros_like(ref), None, IDENTITY)
    mask = 0xFFFFFFFF if dtype == torch.float32 else 0xFFFF
    assert [int(v) & mask for v in bits_of(out)] == list(want) * repeat
    assert finite == (dtype == torch.float32)  # bf16 and fp16 cases include overflows


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_backend_nan_is_canonical(path, dtype):
    ref = torch.from_numpy(np.tile(NAN_PAYLOADS, 10).view(np.float32).copy())
    out = torch.empty(len(ref), dtype=dtype)
    with forced_cpu_path(path):
        finite = CpuBackend().extrapolate(out, ref, torch.ones(len(ref)), None, Coefficients(1.0))
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
    with pytest.raises(InputError, match="device 'tpu': expected cpu, cuda or auto"):
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
@pytest.mark.parametrize(
    "dtypes",
    [
        [torch.bfloat16] * 4,
        [torch.float32] * 4,
        [torch.float16] * 4,
        [torch.bfloat16, torch.float32, torch.float16, torch.float16],
    ],
)
def test_cuda_backend_equals_cpu_backend(dtypes, momentum):
    from moxkit.kernels.backend import MIN_PIECE, SLOTS, CudaBackend

    n = 3 * MIN_PIECE + MIN_PIECE // 2 + 17  # more pieces than slots: the ring wraps around
    ref, mem, prev = random_operands(n, dtypes[:3], seed=11)
    coeffs = Coefficients(4.0, PAPER_ETA if momentum else None)
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
    with pytest.raises(MoxError, match="max_gpu_memory"):
        CudaBackend(max_gpu_memory="lots")
    with pytest.raises(MoxError, match="cannot allocate"):
        CudaBackend(max_gpu_memory=1 << 50)


def _write_checkpoint(path, seed: int, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    shapes = {
        "embed.weight": (1000, 1536),
        "layers.0.mlp.weight": (3001, 777),
        "layers.0.norm.weight": (777,),
        "head.bias": (5,),
    }
    save_file(
        {k: (torch.randn(s, generator=g) * 0.02).to(dtype) for k, s in shapes.items()}, str(path)
    )


@pytest.mark.gpu
@pytest.mark.parametrize("momentum", [False, True])
def test_engine_cuda_equals_cpu(tmp_path, momentum):
    from safetensors.torch import load_file

    import moxkit

    paths = {}
    for i, name in enumerate(["ref", "mem", "prev"]):
        paths[name] = tmp_path / f"{name}.safetensors"
        _write_checkpoint(paths[name], seed=i, dtype=torch.bfloat16)
    extra = {"prev": str(paths["prev"]), "eta": PAPER_ETA} if momentum else {}
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / f"out-{device}"
        moxkit.extrapolate(
            str(paths["ref"]),
            str(paths["mem"]),
            4.0,
            str(outs[device]),
            device=device,
            max_memory="2GiB",
            max_gpu_memory="48MiB",
            progress=False,
            **extra,
        )
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
        main(
            [
                "extrapolate",
                str(tmp_path / "ref.safetensors"),
                str(tmp_path / "mem.safetensors"),
                "--alpha",
                "4",
                "-o",
                str(out),
                "--device",
                "cuda",
                "--quiet",
            ]
        )
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("moxkit: error:") and "cuda" in err[0].lower()
    assert not out.exists()
