"""The arithmetic on one chunk of one tensor, swappable per device.

Every backend computes the same function, bit for bit:

    base = RN32( RN32(a·ref) − RN32(b·mem) )              a = fp32(1+α), b = fp32(α)
    out  = RN_out( base )                                 without momentum
    out  = RN_out( RN32( RN32(e·base) + RN32(c·prev) ) )  e = fp32(η), c = fp32(1−η)

where every operation is an IEEE fp32 operation (no fused multiply-add) and RN_out is one
round-to-nearest-even to the output dtype. Fixing the order of operations, rather than
"computing in fp32" loosely, is what lets the CPU and CUDA paths agree exactly.

A NaN result is written as the canonical quiet NaN of the output dtype (CANONICAL_NAN_BITS),
whatever its sign and payload: CPUs and GPUs make different NaN bits (x86 gives 0xFFC00000 for
inf − inf, torch's vectorised fp32 -> bf16 conversion gives 0xFFFF), so only a fixed pattern
keeps outputs byte-identical across devices.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import MoxError

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# output dtype -> (integer dtype of the same width, the canonical quiet NaN's bits)
CANONICAL_NAN_BITS = {
    torch.float32: (torch.int32, 0x7FC00000),
    torch.bfloat16: (torch.int16, 0x7FC0),
    torch.float16: (torch.int16, 0x7E00),
}


def _fp32(x: float) -> float:
    return float(np.float32(x))


@dataclass(frozen=True)
class Coefficients:
    """α and (optionally) η, with the fp32 constants every backend must use."""

    alpha: float
    eta: float | None = None  # None: no momentum term

    @property
    def momentum(self) -> bool:
        return self.eta is not None

    @property
    def ref_scale(self) -> float:
        return _fp32(1.0 + self.alpha)

    @property
    def mem_scale(self) -> float:
        return _fp32(self.alpha)

    @property
    def new_weight(self) -> float:
        return _fp32(self.eta if self.eta is not None else 1.0)

    @property
    def prev_weight(self) -> float:
        return _fp32(1.0 - self.eta if self.eta is not None else 0.0)


class CpuBackend:
    """A fused numba loop (moxkit.cpu_kernels) for bf16/fp32 operands: one pass over memory,
    every element rounded in registers. Other dtypes (fp16: numba has none on the CPU) take
    torch ops on cache-sized blocks into preallocated fp32 scratch buffers, which keeps the
    intermediates in cache; blocks stay under torch's parallel grain size, because waking
    its thread pool for every small op costs more than it gains when the cores are shared
    with the engine's reader and writer threads."""

    name = "cpu"

    def __init__(self, block_elems: int = 1 << 14, fused: bool = True):
        self.block_elems = block_elems
        self._scratch = [torch.empty(block_elems, dtype=torch.float32) for _ in range(3)]
        self._kernels = _fused_kernels() if fused else None

    def allocate_host(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def extrapolate(
        self,
        out: torch.Tensor,
        ref: torch.Tensor,
        mem: torch.Tensor,
        prev: torch.Tensor | None,
        coeffs: Coefficients,
    ) -> bool:
        """Write the result into `out` (1-D, any float dtype). Returns False if any output
        value is not finite (NaN or ±inf, including overflow from rounding)."""
        n = out.numel()
        if ref.numel() != n or mem.numel() != n or (prev is not None and prev.numel() != n):
            raise ValueError("extrapolate: operands differ in length")
        if coeffs.momentum and prev is None:
            raise ValueError("extrapolate: momentum needs prev")
        a, b = coeffs.ref_scale, coeffs.mem_scale
        e, c = coeffs.new_weight, coeffs.prev_weight
        operands = (out, ref, mem, prev) if coeffs.momentum else (out, ref, mem)
        arrays = [_numba_view(t) for t in operands]
        if self._kernels is not None and all(x is not None for x in arrays):
            plain, with_momentum = self._kernels
            if coeffs.momentum:
                return with_momentum(*arrays, a, b, e, c) == 0
            return plain(*arrays, a, b) == 0
        finite = True
        r_buf, m_buf, p_buf = self._scratch
        for start in range(0, n, self.block_elems):
            stop = min(n, start + self.block_elems)
            k = stop - start
            r, m = r_buf[:k], m_buf[:k]
            r.copy_(ref[start:stop])
            torch.mul(r, a, out=r)
            m.copy_(mem[start:stop])
            torch.mul(m, b, out=m)
            torch.sub(r, m, out=r)
            if coeffs.momentum:
                p = p_buf[:k]
                torch.mul(r, e, out=r)
                p.copy_(prev[start:stop])
                torch.mul(p, c, out=p)
                torch.add(r, p, out=r)
            o = out[start:stop]
            o.copy_(r)
            if not bool(torch.isfinite(o).all()):
                finite = False
                _canonicalize_nan(o)
        return finite

    def close(self) -> None:
        self._scratch = []


def _fused_kernels():
    """The numba kernels, compiled (or loaded from numba's cache) on first use; None where
    numba is not installed."""
    try:
        from .cpu_kernels import fused_extrapolate, fused_extrapolate_momentum
    except ImportError:
        return None
    return fused_extrapolate, fused_extrapolate_momentum


def _numba_view(t: torch.Tensor) -> np.ndarray | None:
    """The numpy array the fused kernels take: bf16 as uint16 bits, fp32 as is."""
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16)
    if t.dtype == torch.float32:
        return t.numpy()
    return None


def _canonicalize_nan(t: torch.Tensor) -> None:
    int_dtype, bits = CANONICAL_NAN_BITS[t.dtype]
    t.view(int_dtype).masked_fill_(torch.isnan(t), bits)


def get_backend(device: str = "auto", **options) -> CpuBackend:
    """'cpu', 'cuda' or 'auto' (CUDA when a device and Triton are present, else CPU)."""
    if device == "auto":
        device = "cuda" if _cuda_usable() else "cpu"
    if device == "cpu":
        return CpuBackend(**{k: v for k, v in options.items() if k == "block_elems"})
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise MoxError("--device cuda: no CUDA device is available (use --device cpu)")
        try:
            from moxkit.kernels.backend import CudaBackend
        except ImportError as exc:
            raise MoxError(f"--device cuda needs Triton: {exc}") from None
        return CudaBackend(device=device, **options)
    raise MoxError(f"unknown device {device!r}: expected cpu, cuda or auto")


def _cuda_usable() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
