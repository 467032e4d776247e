"""The CPU backend writing the output file itself (CpuBackend.extrapolate_to_file, the path
`moxkit extrapolate` takes on CPU): bit for bit the contract's result on every path of the C
loop, across write blocks and thread splits; a failed write is an OSError once every thread
has stopped, and through the CLI one line with nothing left behind; an interrupt while a
worker still writes releases nothing early."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
import sys
import textwrap

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
from ckpt_factory import emulate, write_random_bf16_file
from safetensors.torch import load_file

import moxkit.engine.backends
from moxkit.engine.backends import CpuBackend
from moxkit.engine.formula import PAPER_ETA, Coefficients
from moxkit.engine.writer import WRITE_BLOCK
from moxkit.errors import MoxError

SAFETENSORS_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
SENTINEL = 0xA5  # the bytes around the written range, which must stay as they were


def engine_operand(t: torch.Tensor) -> np.ndarray:
    """A tensor as the engine hands it to the backend: numpy, bf16 as its uint16 bits."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def written(path, offset: int, n: int, dtype: torch.dtype) -> tuple[torch.Tensor, bytes]:
    """The bits of the n values at offset, and every other byte of the file."""
    raw = path.read_bytes()
    end = offset + n * dtype.itemsize
    values = torch.frombuffer(bytearray(raw[offset:end]), dtype=dtype)
    return bits_of(values), raw[:offset] + raw[end:]


def check_to_file(tmp_path, path: str, out_dtype, inputs: str, block: int) -> None:
    """Odd length over three threads, each piece several write blocks with a short last one,
    at an offset that is not block-aligned; edge values (subnormals, NaN payloads, values
    that overflow when rounded to bf16/fp16)."""
    n = 3 * (3 * block // out_dtype.itemsize) + 1001
    in_dtypes = {"same": (out_dtype,) * 3, "mixed": (torch.bfloat16, torch.float16, out_dtype)}
    ref_dt, mem_dt, prev_dt = in_dtypes.get(inputs, (out_dtype, torch.float16, torch.float32))
    ref, mem = edge_operand(ref_dt, 1, n), edge_operand(mem_dt, 2, n)
    prev = edge_operand(prev_dt, 3, n) if inputs == "momentum" else None
    coeffs = Coefficients(4.0, PAPER_ETA if prev is not None else None)
    offset = 8 + 2 * out_dtype.itemsize
    file = tmp_path / "out.bin"
    file.write_bytes(bytes([SENTINEL]) * (offset + n * out_dtype.itemsize + 64))
    fd = os.open(file, os.O_WRONLY)
    try:
        with forced_cpu_path(path):
            args = [engine_operand(x) if x is not None else None for x in (ref, mem, prev)]
            backend = CpuBackend(threads=3)
            name = SAFETENSORS_NAMES[out_dtype]
            finite = backend.extrapolate_to_file(fd, offset, name, *args, coeffs)
            backend.close()
    finally:
        os.close(fd)
    assert finite is False  # the edge values make some results non-finite
    got, rest = written(file, offset, n, out_dtype)
    want = expected_bits(fp32_oracle(ref, mem, prev, coeffs), out_dtype)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert rest == bytes([SENTINEL]) * len(rest)


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inputs", ["same", "mixed", "momentum"])
def test_to_file_is_the_contract_on_every_path(tmp_path, monkeypatch, path, out_dtype, inputs):
    monkeypatch.setattr(moxkit.engine.backends, "MIN_ELEMS_PER_THREAD", 1 << 12)
    monkeypatch.setattr(moxkit.engine.backends, "WRITE_BLOCK", 4096)  # many blocks per thread
    check_to_file(tmp_path, path, out_dtype, inputs, 4096)


@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
@pytest.mark.parametrize("inputs", ["same", "momentum"])
def test_to_file_is_the_contract_in_default_blocks(tmp_path, monkeypatch, out_dtype, inputs):
    monkeypatch.setattr(moxkit.engine.backends, "MIN_ELEMS_PER_THREAD", 1 << 16)
    check_to_file(tmp_path, CPU_PATHS[-1], out_dtype, inputs, WRITE_BLOCK)


def test_to_file_reports_all_finite(tmp_path):
    ref = np.full(5000, 2.0, dtype=np.float16)
    with open(tmp_path / "out.bin", "wb") as fh:
        assert CpuBackend().extrapolate_to_file(
            fh.fileno(), 0, "F16", ref, ref * 0.5, None, Coefficients(4.0)
        )
    assert (np.fromfile(tmp_path / "out.bin", dtype=np.float16) == 6.0).all()  # 5·2 − 4·1


def test_a_failed_write_is_an_oserror_once_every_thread_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(moxkit.engine.backends, "MIN_ELEMS_PER_THREAD", 1 << 12)
    (tmp_path / "out.bin").write_bytes(b"")
    fd = os.open(tmp_path / "out.bin", os.O_RDONLY)  # not writable: every write fails
    ref = np.ones(1 << 16, dtype=np.float32)
    backend = CpuBackend(threads=3)
    try:
        with pytest.raises(OSError) as info:
            backend.extrapolate_to_file(fd, 0, "BF16", ref, ref, None, Coefficients(4.0))
        assert info.value.errno == errno.EBADF
    finally:
        os.close(fd)
    out = np.empty(1 << 16, dtype=np.float32)
    assert backend.extrapolate(out, ref, ref, None, Coefficients(4.0))  # still usable
    assert (out == 1).all()
    backend.close()


def test_file_size_limit_mid_output_is_one_line_and_leaves_nothing(cli, tmp_path):
    """A write refused half-way through a tensor (RLIMIT_FSIZE: EFBIG, as ENOSPC would be
    on a full disk) ends the run with one line and no OUT, no temporary; without the limit
    the same run writes the contract's values."""
    numel = 1 << 20  # 2 MiB of bf16 output; the limit lets the first 1 MiB through
    write_random_bf16_file(tmp_path / "ref.safetensors", "w", numel, seed=1)
    write_random_bf16_file(tmp_path / "mem.safetensors", "w", numel, seed=2)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["extrapolate", tmp_path / "ref.safetensors", tmp_path / "mem.safetensors"]
    args += ["-a", 4, "-o", tmp_path / "out", "--device", "cpu", "--quiet"]

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))

    result = cli.run(*args, preexec_fn=limit)
    assert result.code == 1, result.err
    assert result.err.startswith("moxkit: error: ")
    assert "cannot write output: File too large" in result.err
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    assert cli.run(*args).code == 0
    ref = load_file(tmp_path / "ref.safetensors")["w"]
    mem = load_file(tmp_path / "mem.safetensors")["w"]
    got = load_file(tmp_path / "out" / "model.safetensors")["w"]
    assert torch.equal(got, emulate(ref, mem, 4.0))


SLOW_FILE_WORKER = textwrap.dedent(
    """
    # A backend whose worker writes the output late: it holds only raw addresses of the
    # inputs and the output descriptor (as the C loop's pool threads do), and starts when
    # close() asks it to finish. Should the pipeline unmap the inputs or close the output
    # before closing the backend, the worker faults (SIGSEGV) or its write fails (EBADF).
    import ctypes, os, signal, sys, threading
    import numpy as np
    import moxkit.engine.stream
    from moxkit.engine.backends import CpuBackend
    from moxkit.cli.main import main

    def raw(x):  # an array over the same memory that keeps nothing alive
        return np.frombuffer((ctypes.c_char * x.nbytes).from_address(x.ctypes.data), x.dtype)

    class SlowFileWorkerBackend(CpuBackend):
        def extrapolate_to_file(self, fd, offset, out_dtype, ref, mem, prev, coeffs):
            ops = [raw(x) for x in (ref, mem)]
            del ref, mem, prev
            self.go = threading.Event()
            def work():
                self.go.wait()
                try:
                    CpuBackend.extrapolate_to_file(self, fd, offset, out_dtype, *ops, None, coeffs)
                except OSError as exc:
                    print(f"worker: write failed: {exc}", file=sys.stderr)
            self.worker = threading.Thread(target=work)
            self.worker.start()
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the worker is busy
            self.worker.join()
            return True

        def close(self):
            if getattr(self, "worker", None) is not None:
                self.go.set()
                self.worker.join()
            super().close()

    moxkit.engine.stream.get_backend = lambda device, **options: SlowFileWorkerBackend()
    main(sys.argv[1:])
    """
)


def test_ctrl_c_while_a_worker_writes_releases_nothing_early(tmp_path):
    write_random_bf16_file(tmp_path / "ref.safetensors", "w", 1 << 16, seed=1)
    write_random_bf16_file(tmp_path / "mem.safetensors", "w", 1 << 16, seed=2)
    before = sorted(p.name for p in tmp_path.iterdir())
    args = ["extrapolate", tmp_path / "ref.safetensors", tmp_path / "mem.safetensors"]
    args += ["-a", "4", "-o", tmp_path / "out", "-q"]
    cmd = [sys.executable, "-c", SLOW_FILE_WORKER, *map(str, args)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, (result.returncode, result.stderr)
    assert "write failed" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("threads", [1, 2])
def test_input_truncated_while_mapped_is_a_moxerror(tmp_path, monkeypatch, threads):
    """Another process shrinks an input the loop reads while writing: the fault (SIGBUS) in
    any thread is one MoxError, and the backend stays usable."""
    monkeypatch.setattr(moxkit.engine.backends, "MIN_ELEMS_PER_THREAD", 1 << 12)
    n = 1 << 18
    path = tmp_path / "ref.bin"
    np.arange(n, dtype=np.float32).tofile(path)
    ref, mem = np.memmap(path, dtype=np.float32, mode="r"), np.ones(n, dtype=np.float32)
    os.truncate(path, 4096)  # the first page stays; every other one is gone
    backend = CpuBackend(threads=threads)
    with open(tmp_path / "out.bin", "wb") as fh:
        with pytest.raises(MoxError, match="changed while being read"):
            backend.extrapolate_to_file(fh.fileno(), 0, "F32", ref, mem, None, Coefficients(4.0))
        ok = np.ones(n, dtype=np.float32)
        assert backend.extrapolate_to_file(fh.fileno(), 0, "F32", ok, mem, None, Coefficients(4.0))
    backend.close()
    assert (np.fromfile(tmp_path / "out.bin", dtype=np.float32) == 1).all()
