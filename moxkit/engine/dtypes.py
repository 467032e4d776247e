"""The one dtype table of the engine: every safetensors dtype code with its size and, for the
three floating dtypes moxkit computes on, its numpy buffer type, torch name, C-loop number,
canonical NaN and command-line names. Every other view (sizes by code, torch dtypes by code,
C numbers by numpy type) is derived from TABLE here or where it is used, so a dtype is
described once.

Torch dtypes are named by string (resolved with getattr(torch, name) by the torch-side code):
importing this module must not import torch, which the CPU path never loads.

A leaf module: numpy and errors only.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import InputError


@dataclass(frozen=True)
class Dtype:
    """One safetensors dtype. The fields after `is_float` are set for the arithmetic dtypes
    (F32, F16, BF16) only: the engine's numpy buffers, torch and the C loop know no others."""

    code: str  # the safetensors name, as headers spell it
    size: int  # bytes per element
    is_float: bool
    numpy: str | None = None  # the numpy dtype of the engine's buffers (bf16: its uint16 bits)
    torch: str | None = None  # torch.<name>; also what config.json's dtype says
    c_code: int | None = None  # the number of this dtype in _fused.c and the Triton kernel
    nan_bits: int | None = None  # the canonical quiet NaN written for it (engine.formula)
    cli: tuple[str, ...] = ()  # names accepted for an output dtype (the first is the short one)


_ARITHMETIC = (
    Dtype("BF16", 2, True, "uint16", "bfloat16", 1, 0x7FC0, ("bf16", "bfloat16")),
    Dtype("F16", 2, True, "float16", "float16", 2, 0x7E00, ("fp16", "float16", "half")),
    Dtype("F32", 4, True, "float32", "float32", 0, 0x7FC00000, ("fp32", "float32", "float")),
)
_OTHERS = (
    Dtype("F64", 8, True),
    Dtype("F8_E4M3", 1, True),
    Dtype("F8_E5M2", 1, True),
    *(Dtype(f"{kind}{bits}", bits // 8, False) for kind in "IU" for bits in (64, 32, 16, 8)),
    Dtype("BOOL", 1, False),
)
TABLE: dict[str, Dtype] = {d.code: d for d in (*_ARITHMETIC, *_OTHERS)}

SIZES: dict[str, int] = {d.code: d.size for d in TABLE.values()}  # hot loops index this
FLOAT_CODES = frozenset(d.code for d in TABLE.values() if d.is_float)
# the floating dtypes moxkit does arithmetic on (fp32 arithmetic, exact for all three inputs)
ARITHMETIC_CODES = frozenset(d.code for d in _ARITHMETIC)
CANONICAL_NAN_BITS = {d.code: d.nan_bits for d in _ARITHMETIC}
_BY_NAME = {name: d.code for d in _ARITHMETIC for name in d.cli}
CLI_NAMES = tuple(d.cli[0] for d in _ARITHMETIC)  # bf16, fp16, fp32


def parse_dtype(dtype: str | None, name: str = "dtype") -> str | None:
    """The safetensors code of an output dtype given by name ("bf16", "float16", ...); `name`
    is what the caller calls the argument (the API parameter; the CLI shows its flag)."""
    if dtype is None:
        return None
    code = _BY_NAME.get(dtype.lower())
    if code is None:
        raise InputError(
            f"{name} {dtype!r}: expected one of {', '.join(CLI_NAMES)}", params=(name,)
        )
    return code


def dtype_name(dtype) -> str | None:
    """A dtype name from a string or a torch dtype (torch.bfloat16 -> "bfloat16"), without
    importing torch."""
    if dtype is None or isinstance(dtype, str):
        return dtype
    return str(dtype).removeprefix("torch.")


def numpy_view(code: str) -> np.dtype:
    """The numpy dtype the engine holds `code`'s elements in (BF16: uint16 bit patterns)."""
    return np.dtype(TABLE[code].numpy)


def to_float32(raw: np.ndarray, code: str) -> np.ndarray:
    """The elements of `raw` (uint8 bytes of dtype `code`) widened exactly to fp32, 1-D."""
    if code == "BF16":
        return (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    if code == "F32":
        return raw.view(np.float32)
    return raw.view(numpy_view(code)).astype(np.float32)
