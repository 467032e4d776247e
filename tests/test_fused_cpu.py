"""The fused C loop: each of its paths against the torch-ops path (itself held to numpy and
fp64 oracles in test_backends.py), bit for bit, on the values where they could differ; its
non-temporal stores and alignment heads; and what it promises when things go wrong: a mapped
input truncated under the loop is a MoxError, an interrupt never leaves a worker running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from bits import (
    CPU_PATHS,
    DTYPES,
    bits_of,
    edge_operand,
    expected_bits,
    forced_cpu_path,
    fp32_oracle,
)

from moxkit.engine.backends import CPU_PATHS as ALL_PATHS
from moxkit.engine.backends import (
    CpuBackend,
    _fused_library,
    _run_then_settle,
    cpu_path,
    set_cpu_path,
)
from moxkit.engine.formula import PAPER_ETA, Coefficients
from moxkit.errors import MoxError


def test_the_c_library_is_built_and_dispatches():
    # without it every comparison below would hold the torch path to itself
    assert _fused_library() is not None, "moxkit/engine/_fused.c was not built at install time"
    assert "generic" in CPU_PATHS and cpu_path() == CPU_PATHS[-1]  # the best by default
    with forced_cpu_path("generic"):
        assert cpu_path() == "generic"
    assert cpu_path() == CPU_PATHS[-1]
    missing = [p for p in ALL_PATHS if p not in CPU_PATHS]
    for name in missing + ["sse9"]:
        with pytest.raises(MoxError, match="CPU path"):
            set_cpu_path(name)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("ref_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("mem_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("momentum", [False, True], ids=["plain", "momentum"])
def test_fused_matches_torch_path(path, out_dtype, ref_dtype, mem_dtype, momentum):
    ref, mem = edge_operand(ref_dtype, 1), edge_operand(mem_dtype, 2)
    prev = edge_operand(out_dtype, 3) if momentum else None
    coeffs = Coefficients(4.0, PAPER_ETA if momentum else None)
    torch_out = torch.empty(len(ref), dtype=out_dtype)
    torch_ok = CpuBackend(fused=False).extrapolate(torch_out, ref, mem, prev, coeffs)
    assert torch_ok is False  # the specials make some outputs non-finite
    # the engine's own operands: numpy buffers, bf16 as uint16 bits
    as_np = {torch.bfloat16: lambda t: t.view(torch.int16).numpy().view(np.uint16)}
    to_np = lambda t: as_np.get(t.dtype, torch.Tensor.numpy)(t)  # noqa: E731
    fused_out, np_out = torch.empty_like(torch_out), torch.empty_like(torch_out)
    with forced_cpu_path(path):
        assert CpuBackend().extrapolate(fused_out, ref, mem, prev, coeffs) is False
        args = [to_np(np_out), to_np(ref), to_np(mem), to_np(prev) if momentum else None]
        assert CpuBackend().extrapolate(*args, coeffs) is False
    np.testing.assert_array_equal(bits_of(fused_out).numpy(), bits_of(torch_out).numpy())
    np.testing.assert_array_equal(bits_of(np_out).numpy(), bits_of(torch_out).numpy())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_outputs_stream_from_any_alignment(dtype):
    """Outputs of 4 MiB and more take the vector paths' non-temporal stores, after a head
    that aligns the output: starting 0..2 elements past a 64-byte boundary gives heads of
    every kind (none, odd, even)."""
    n = (4 << 20) // dtype.itemsize + 1001
    ref, mem, prev = (edge_operand(dtype, seed, n + 2) for seed in (4, 5, 6))
    coeffs = Coefficients(2.0, 0.5)
    want = expected_bits(fp32_oracle(ref, mem, prev, coeffs), dtype)
    buf = torch.empty(n + 2 + 64, dtype=dtype)
    for path in CPU_PATHS[1:]:  # generic has no streaming stores
        for skip in range(3):
            lo = (-buf.data_ptr() % 64) // dtype.itemsize + skip
            out = buf[lo : lo + n]
            sl = slice(skip, skip + n)
            with forced_cpu_path(path):
                CpuBackend(threads=1).extrapolate(out, ref[sl], mem[sl], prev[sl], coeffs)
            assert torch.equal(bits_of(out), want[sl]), f"{path}, offset {skip}"


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
    ref, mem = edge_operand(torch.bfloat16, 4, n), edge_operand(torch.float16, 5, n)
    prev = edge_operand(torch.float32, 6, n) if momentum else None
    coeffs = Coefficients(2.0, 0.5 if momentum else None)
    outs = []
    for threads in (1, 3):
        out = torch.empty(n, dtype=torch.bfloat16)
        assert CpuBackend(threads=threads).extrapolate(out, ref, mem, prev, coeffs) is False
        outs.append(out)
    np.testing.assert_array_equal(bits_of(outs[0]).numpy(), bits_of(outs[1]).numpy())


@pytest.mark.parametrize("threads", [1, 2])
def test_input_truncated_while_mapped_is_a_moxerror(tmp_path, threads):
    """Another process shrinks a file the engine has mapped: reading past the new end faults
    (SIGBUS) inside the loop, in the main thread and in the pool's; one MoxError, no crash."""
    n = 1 << 20
    path = tmp_path / "ref.bin"
    np.arange(n, dtype=np.float32).tofile(path)
    ref = np.memmap(path, dtype=np.float32, mode="r")
    mem, out = np.ones(n, dtype=np.float32), np.empty(n, dtype=np.float32)
    backend = CpuBackend(threads=threads)
    assert backend.extrapolate(out, ref, mem, None, Coefficients(4.0))
    os.truncate(path, 4096)  # the first page stays; every other one is gone
    with pytest.raises(MoxError, match="changed while being read"):
        backend.extrapolate(out, ref, mem, None, Coefficients(4.0))
    np.testing.assert_array_equal(out[:1024], 5 * np.arange(1024, dtype=np.float32) - 4)
    ok = np.ones(n, dtype=np.float32)
    assert backend.extrapolate(out, ok, mem, None, Coefficients(4.0))  # still usable
    assert (out == 1).all()
    backend.close()


def test_sigbus_outside_the_loop_is_left_alone(tmp_path):
    """The guard is only in place during the loop: afterwards a fault elsewhere ends the
    process by SIGBUS as it would have without moxkit."""
    code = (
        "import os, sys, numpy as np\n"
        "from moxkit.engine.backends import CpuBackend\n"
        "from moxkit.engine.formula import Coefficients\n"
        "x = np.ones(8, np.float32)\n"
        "CpuBackend().extrapolate(np.empty(8, np.float32), x, x, None, Coefficients(1.0))\n"
        f"np.ones(1 << 16, np.float32).tofile({str(tmp_path / 'f')!r})\n"
        f"m = np.memmap({str(tmp_path / 'f')!r}, np.float32, mode='r')\n"
        f"os.truncate({str(tmp_path / 'f')!r}, 0)\n"
        "print(float(m[-1]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGBUS, proc.stderr.decode()[-500:]


def test_interrupt_waits_for_running_workers_and_cancels_the_rest():
    """A Ctrl-C that lands while the pool still computes (here: raised by the main thread's
    own piece, then a second one while waiting) propagates only after the running piece has
    finished; pieces not yet started never start."""
    pool = ThreadPoolExecutor(1)
    finished, started_second = threading.Event(), threading.Event()

    def running_piece() -> int:
        time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)  # a second interrupt, during the wait
        time.sleep(0.2)
        finished.set()
        return 0

    futures = [pool.submit(running_piece), pool.submit(lambda: started_second.set() or 0)]

    def main_piece() -> int:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _run_then_settle(main_piece, futures)
    assert finished.is_set()
    assert futures[1].cancelled() and not started_second.is_set()
    pool.shutdown()


def test_settle_returns_every_count():
    pool = ThreadPoolExecutor(2)
    futures = [pool.submit(lambda k=k: k) for k in (2, 3)]
    assert sorted(_run_then_settle(lambda: 1, futures)) == [1, 2, 3]
    pool.shutdown()


def test_cpu_extrapolate_never_imports_torch(tmp_path):
    """The README's promise: a CPU extrapolation runs on numpy and the C loop alone."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    for name in ("ref", "mem"):
        save_file(
            {
                "w": rng.standard_normal((64, 33)).astype(np.float32),
                "b": rng.standard_normal(7).astype(np.float16),
            },
            str(tmp_path / f"{name}.st"),
        )
    code = (
        "import sys, moxkit\n"
        f"moxkit.extrapolate({str(tmp_path / 'ref.st')!r}, {str(tmp_path / 'mem.st')!r}, "
        f"4.0, {str(tmp_path / 'out')!r}, device='cpu', progress=False)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]
    assert (tmp_path / "out").exists()
