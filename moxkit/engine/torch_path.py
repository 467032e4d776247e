"""The torch-ops form of the CPU arithmetic: the fallback where the C library was not built,
and the second, independent implementation the fused path is tested against.

Torch ops run on cache-sized blocks into preallocated fp32 scratch buffers, which keeps the
intermediates in cache. Blocks stay under torch's parallel grain size: waking its thread pool
for every small op costs more than it gains when the cores are shared with the engine's
reader and writer threads."""

from __future__ import annotations

import numpy as np
import torch

from .dtypes import ARITHMETIC_CODES, TABLE
from .formula import Coefficients

# the torch views of the dtype table (moxkit.engine.dtypes), for the arithmetic dtypes
TORCH_DTYPES = {code: getattr(torch, TABLE[code].torch) for code in sorted(ARITHMETIC_CODES)}
FLOAT_DTYPES = tuple(TORCH_DTYPES.values())
DTYPE_NAMES = {dtype: name for name, dtype in TORCH_DTYPES.items()}
# a float dtype -> the integer dtype of the same width, which its bit patterns are viewed as
BITS_DTYPES = {d: getattr(torch, f"int{8 * TABLE[c].size}") for c, d in TORCH_DTYPES.items()}
# output dtype -> (integer dtype of the same width, the canonical quiet NaN's bits)
CANONICAL_NAN_BITS = {
    dtype: (BITS_DTYPES[dtype], TABLE[name].nan_bits) for dtype, name in DTYPE_NAMES.items()
}


def as_tensor(x) -> torch.Tensor:
    """A torch view of an operand; numpy uint16 arrays hold bf16 bit patterns."""
    if isinstance(x, np.ndarray):
        if x.dtype == np.uint16:
            return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
        return torch.from_numpy(x)
    return x


class TorchBlockPath:
    def __init__(self, block_elems: int):
        self.block_elems = block_elems
        self._scratch = [torch.empty(block_elems, dtype=torch.float32) for _ in range(3)]

    def extrapolate(self, out, ref, mem, prev, coeffs: Coefficients) -> bool:
        out, ref, mem = as_tensor(out), as_tensor(ref), as_tensor(mem)
        prev = as_tensor(prev) if prev is not None else None
        n = out.numel()
        a, b = coeffs.ref_scale, coeffs.mem_scale
        e, c = coeffs.new_weight, coeffs.prev_weight
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


def _canonicalize_nan(t: torch.Tensor) -> None:
    int_dtype, bits = CANONICAL_NAN_BITS[t.dtype]
    t.view(int_dtype).masked_fill_(torch.isnan(t), bits)
