"""The arithmetic on one chunk of one tensor, swappable per device.

Every backend computes the function fixed in moxkit.engine.formula, bit for bit, and satisfies the
Backend protocol below; the engine (moxkit.engine.stream) knows backends only through it.

Importing this module does not import torch: the CPU path of `moxkit extrapolate` runs on
numpy buffers and a small C library (moxkit/engine/_fused.c), so a run does not pay torch's import
time. torch comes in for the fallback path, the CUDA backend, or when callers pass tensors.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor, wait
from typing import Any, Protocol

import numpy as np

from ..errors import InputError, ResourceError
from .dtypes import ARITHMETIC_CODES, CANONICAL_NAN_BITS, TABLE
from .formula import Coefficients
from .writer import WRITE_BLOCK

# the C library's views of the dtype table; bf16 travels in numpy as its uint16 bit patterns
_C_DTYPES = {TABLE[code].c_code: TABLE[code] for code in ARITHMETIC_CODES}
_C_CODES = {np.dtype(d.numpy): c for c, d in _C_DTYPES.items()}
_TORCH_NAMES = {d.torch: c for c, d in _C_DTYPES.items()}
_INPUT_CHANGED = -1  # the C loop's result when reading a mapped input faulted (SIGBUS)
_WRITE_FAILED = -2  # moxkit_extrapolate_to_file's result when a write failed (errno given)
CPU_PATHS = ("generic", "avx2", "avx512")  # the C loop's paths, in its numbering
MIN_ELEMS_PER_THREAD = 1 << 18  # below this, starting a thread costs more than it saves


class Backend(Protocol):
    """What the engine needs of a device: host buffers and the arithmetic on one chunk."""

    name: str
    maps_inputs: bool  # True: inputs may be read-only windows mapped from the page cache
    # True: the backend also has extrapolate_to_file, which writes the result into the output
    # file itself (the engine then holds no output buffers and makes no copy of its own)
    writes_files: bool

    def allocate_host(self, nbytes: int) -> Any:
        """A 1-D uint8 host buffer of exactly `nbytes` that extrapolate accepts views of."""
        ...

    def extrapolate(self, out, ref, mem, prev, coeffs: Coefficients) -> bool:
        """Write the result into `out`; False if any output value is not finite. Returns only
        when no thread or device still reads the operands or writes `out`."""
        ...

    def close(self) -> None:
        """Release threads, device memory and pinned buffers."""
        ...


class CpuBackend:
    """The fused C loop (moxkit/engine/_fused.c): one pass over memory, every element widened,
    combined and rounded in registers, for any mix of fp32/bf16/fp16 operands.

    Where the C library was not built (no compiler at install time), or with fused=False,
    torch ops on cache-sized blocks compute the same bits (moxkit.engine.torch_path); tests hold
    the two to each other.

    Operands are 1-D CPU arrays: numpy (float32, float16, or uint16 holding bf16 bits, the
    engine's own buffers) or contiguous torch tensors.

    Large chunks are split over `threads` threads (default: all cores): ctypes releases the
    GIL, and one core alone cannot keep up with memory for the 2-byte dtypes."""

    name = "cpu"
    maps_inputs = True  # the engine may hand it inputs mapped from the page cache

    def __init__(self, block_elems: int = 1 << 14, fused: bool = True, threads: int | None = None):
        self.block_elems = block_elems
        self._lib = _fused_library() if fused else None
        self._torch_path = None
        self.threads = max(1, threads or min(8, os.cpu_count() or 1))
        self._pool: ThreadPoolExecutor | None = None  # started by the first large chunk

    @property
    def writes_files(self) -> bool:
        """extrapolate_to_file needs the C library (the torch path fills buffers only)."""
        return self._lib is not None

    def allocate_host(self, nbytes: int) -> np.ndarray:
        return np.empty(nbytes, dtype=np.uint8)

    def extrapolate(self, out, ref, mem, prev, coeffs: Coefficients) -> bool:
        """Write the result into `out`. Returns False if any output value is not finite
        (NaN or ±inf, including overflow from rounding). Returns or raises (Ctrl-C included)
        only once no pool thread reads the operands or writes `out` any more."""
        n = _length(out)
        _check_operands(n, ref, mem, prev, coeffs)
        if self._lib is None:
            if self._torch_path is None:
                from .torch_path import TorchBlockPath

                self._torch_path = TorchBlockPath(self.block_elems)
            return self._torch_path.extrapolate(out, ref, mem, prev, coeffs)
        operands = [_c_operand(x) for x in (out, ref, mem)]
        operands.append(_c_operand(prev) if coeffs.momentum else (None, 0))
        fixed = (*_scales(coeffs), CANONICAL_NAN_BITS[_C_DTYPES[operands[0][1]].code])

        def run(start: int, count: int) -> int:
            return self._lib.moxkit_extrapolate(*_offset_args(operands, start), count, *fixed)

        return self._in_parts(n, run)

    def extrapolate_to_file(
        self, fd: int, offset: int, out_dtype: str, ref, mem, prev, coeffs: Coefficients
    ) -> bool:
        """Write the result, in safetensors dtype `out_dtype`, to file descriptor `fd` from
        byte `offset` on, in WRITE_BLOCK writes computed in a buffer that stays in cache.
        Returns as extrapolate; a failed write raises OSError (its errno), after the other
        threads have stopped. Needs the C library (writes_files)."""
        n = _length(ref)
        _check_operands(n, ref, mem, prev, coeffs)
        code = TABLE[out_dtype].c_code
        operands = [_c_operand(x) for x in (ref, mem)]
        operands.append(_c_operand(prev) if coeffs.momentum else (None, 0))
        fixed = (*_scales(coeffs), CANONICAL_NAN_BITS[out_dtype])

        def run(start: int, count: int) -> int:
            error = ctypes.c_int(0)
            result = self._lib.moxkit_extrapolate_to_file(
                fd,
                offset + start * _C_DTYPES[code].size,
                WRITE_BLOCK,
                code,
                *_offset_args(operands, start),
                count,
                *fixed,
                ctypes.byref(error),
            )
            if result == _WRITE_FAILED:
                raise OSError(error.value, os.strerror(error.value))
            return result

        return self._in_parts(n, run)

    def _in_parts(self, n: int, run) -> bool:
        """run(start, count) over [0, n), split over the pool's threads when large; True if
        every value was finite."""
        parts = min(self.threads, max(1, n // MIN_ELEMS_PER_THREAD))
        if parts == 1:
            counts = [run(0, n)]
        else:
            step = -(-n // parts) + 1023 & ~1023  # 1024-aligned pieces keep vector loops aligned
            if self._pool is None:
                self._pool = ThreadPoolExecutor(self.threads - 1, thread_name_prefix="moxkit-cpu")
            futures = [self._pool.submit(run, s, min(step, n - s)) for s in range(step, n, step)]
            counts = _run_then_settle(lambda: run(0, step), futures)
        if any(c == _INPUT_CHANGED for c in counts):
            raise InputError(
                "an input file changed while being read (truncated or rewritten "
                "by another process?)"
            )
        return sum(counts) == 0

    def close(self) -> None:
        self._torch_path = None
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None


def _run_then_settle(first, futures: list[Future]) -> list[int]:
    """first() here, then every future's result. An exception arriving meanwhile (a signal
    handler's KeyboardInterrupt, a worker's own) is raised only once every future has
    finished, or was cancelled before it started: then the caller may free the buffers."""
    error: BaseException | None = None
    counts: list[int] = []
    try:
        counts.append(first())
    except BaseException as exc:  # noqa: BLE001 - re-raised below, after the wait
        error = exc
    while True:
        try:
            if error is not None:
                for f in futures:
                    f.cancel()  # those not started never will; the running ones finish
            wait(futures)
            break
        except BaseException as exc:  # noqa: BLE001 - a second interrupt: keep waiting
            error = error or exc
    if error is not None:
        raise error
    return counts + [f.result() for f in futures]


def _length(x) -> int:
    return x.size if isinstance(x, np.ndarray) else x.numel()


def _check_operands(n: int, ref, mem, prev, coeffs: Coefficients) -> None:
    if _length(ref) != n or _length(mem) != n or (prev is not None and _length(prev) != n):
        raise ValueError("extrapolate: operands differ in length")
    if coeffs.momentum and prev is None:
        raise ValueError("extrapolate: momentum needs prev")


def _scales(coeffs: Coefficients) -> tuple[float, float, float, float]:
    return coeffs.ref_scale, coeffs.mem_scale, coeffs.new_weight, coeffs.prev_weight


def _offset_args(operands: list[tuple[int | None, int]], start: int) -> list:
    """(address, code) pairs as the C library takes them, each `start` elements in."""
    args = []
    for address, code in operands:
        args += [address + start * _C_DTYPES[code].size if address else None, code]
    return args


def _c_operand(x) -> tuple[int, int]:
    """(address, dtype code) of a contiguous CPU array for the C library."""
    if isinstance(x, np.ndarray):
        if not x.flags.c_contiguous or x.dtype not in _C_CODES:
            raise ValueError(
                f"extrapolate: need a contiguous float32/float16/bf16 array, got {x.dtype}"
            )
        return x.ctypes.data, _C_CODES[x.dtype]
    name = str(x.dtype).removeprefix("torch.")
    if x.device.type != "cpu" or not x.is_contiguous() or name not in _TORCH_NAMES:
        raise ValueError(f"extrapolate: need a contiguous CPU fp32/bf16/fp16 tensor, got {x.dtype}")
    return x.data_ptr(), _TORCH_NAMES[name]


_LIBRARY: list = []  # loaded once per process


def _fused_library():
    """The C library built at install time (setup.py), or None where it was not built."""
    if not _LIBRARY:
        spec = importlib.util.find_spec("moxkit.engine._fused")
        ok = spec is not None and spec.origin and os.path.exists(spec.origin)
        _LIBRARY.append(_load_library(spec.origin) if ok else None)
    return _LIBRARY[0]


def _load_library(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    fn = lib.moxkit_extrapolate
    fn.restype = ctypes.c_int64
    fn.argtypes = [
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_float,
        ctypes.c_uint32,
    ]  # fmt: skip
    to_file = lib.moxkit_extrapolate_to_file
    to_file.restype = ctypes.c_int64
    to_file.argtypes = [
        ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
        ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int,
        ctypes.c_int64, ctypes.c_float, ctypes.c_float, ctypes.c_float, ctypes.c_float,
        ctypes.c_uint32, ctypes.POINTER(ctypes.c_int),
    ]  # fmt: skip
    for name in ("moxkit_cpu_paths", "moxkit_cpu_path"):
        getattr(lib, name).restype = ctypes.c_int
    lib.moxkit_set_cpu_path.argtypes = [ctypes.c_int]
    return lib


def cpu_paths() -> list[str]:
    """The C loop's paths this CPU runs (generic, avx2, avx512), slowest first; [] where the
    C library was not built."""
    lib = _fused_library()
    mask = lib.moxkit_cpu_paths() if lib else 0
    return [name for i, name in enumerate(CPU_PATHS) if mask >> i & 1]


def cpu_path() -> str | None:
    """The path the C loop uses now (the best one, unless set_cpu_path chose another)."""
    lib = _fused_library()
    return CPU_PATHS[lib.moxkit_cpu_path()] if lib else None


def set_cpu_path(name: str | None) -> None:
    """Make every later call of the C loop in this process take path `name` (None: the best
    this CPU runs). For tests and benchmarks; call it while no extrapolation runs."""
    lib = _fused_library()
    if lib is None:
        raise ResourceError("the C loop (moxkit/engine/_fused.c) was not built")
    if name is not None and name not in cpu_paths():
        raise InputError(f"CPU path {name!r}: this CPU runs {', '.join(cpu_paths())}")
    lib.moxkit_set_cpu_path(-1 if name is None else CPU_PATHS.index(name))


def get_backend(device: str = "auto", **options):
    """'cpu', 'cuda' or 'auto' (CUDA when a device and Triton are present, else CPU)."""
    device = device_of(device)
    if device == "cpu":
        return CpuBackend(**{k: v for k, v in options.items() if k == "block_elems"})
    try:
        from moxkit.kernels.backend import CudaBackend
    except ImportError as exc:
        raise ResourceError(f"device 'cuda' needs Triton: {exc}", params=("device",)) from None
    return CudaBackend(device=device, **options)


def device_of(device: str, *, triton: bool = True) -> str:
    """The device `device` names, checked: 'cpu', or 'cuda' / 'cuda:N' when CUDA is present;
    'auto' is CUDA when a device (and, for the engine's kernels, Triton) is present, else the
    CPU. The engine's one device parser; the LoRA merge, whose arithmetic is torch's, passes
    triton=False."""
    if device == "auto":
        return "cuda" if _cuda_usable(triton) else "cpu"
    if device == "cpu":
        return device
    if device == "cuda" or re.fullmatch(r"cuda:[0-9]+", device):
        import torch

        if not torch.cuda.is_available():
            raise ResourceError("device 'cuda': no CUDA device is available (use device='cpu')",
                                params=("device",))  # fmt: skip
        return device
    raise InputError(f"device {device!r}: expected cpu, cuda or auto", params=("device",))


def _cuda_usable(triton: bool = True) -> bool:
    # No NVIDIA device nodes: no CUDA, and no need to pay for importing torch to learn it.
    if not (os.path.exists("/dev/nvidiactl") or glob.glob("/dev/nvidia[0-9]*")):
        return False
    import torch

    if not torch.cuda.is_available():
        return False
    return not triton or importlib.util.find_spec("triton") is not None
