"""Fused CPU loops for the extrapolation arithmetic, compiled with numba.

One pass over memory per chunk: each element is loaded, widened to fp32, combined and rounded
to the output dtype in registers, where a sequence of torch ops would make one pass per op.
The operation order is the one fixed in moxkit.backends (fp32 multiply, multiply, subtract;
with momentum two more multiplies and an add; no FMA: numba does not contract without
fastmath), so the results are bit-identical to the torch path and to the Triton kernel.

Operands are numpy arrays: bf16 as its uint16 bit patterns, fp32 as float32. numba has no
fp16 on the CPU, so fp16 operands stay on the torch path (see CpuBackend).
"""

from __future__ import annotations

import numpy as np
from numba import njit, types
from numba.extending import intrinsic, overload

BF16_NAN = np.uint16(0x7FC0)
F32_NAN_BITS = np.uint32(0x7FC00000)


@intrinsic
def _bits_to_f32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return types.float32(types.uint32), codegen


@intrinsic
def _f32_to_bits(typingctx, value):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(types.float32), codegen


def _load(array, i):
    """array[i] widened to fp32 (bf16 bits or float32)."""


def _store(array, i, value):
    """Round `value` to array's dtype at i; return 1 if the stored value is not finite."""


@overload(_load)
def _load_impl(array, i):
    if array.dtype == types.uint16:
        return lambda array, i: _bits_to_f32(np.uint32(array[i]) << np.uint32(16))
    if array.dtype == types.float32:
        return lambda array, i: array[i]
    return None


@overload(_store)
def _store_impl(array, i, value):
    # Branch-free (selects, not jumps) so that LLVM vectorises the loop.
    if array.dtype == types.uint16:

        def store_bf16(array, i, value):
            u = _f32_to_bits(value)
            bias = np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))
            rounded = (u + bias) >> np.uint32(16)
            is_nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
            result = np.uint32(0x7FC0) if is_nan else rounded
            array[i] = np.uint16(result)
            return np.int64((result & np.uint32(0x7F80)) == np.uint32(0x7F80))

        return store_bf16
    if array.dtype == types.float32:

        def store_f32(array, i, value):
            u = _f32_to_bits(value)
            is_nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
            array[i] = _bits_to_f32(F32_NAN_BITS if is_nan else u)
            return np.int64((u & np.uint32(0x7F800000)) == np.uint32(0x7F800000))

        return store_f32
    return None


@njit(nogil=True, cache=True)
def fused_extrapolate(out, ref, mem, a, b):
    """out = RN(a·ref − b·mem); returns the number of non-finite outputs."""
    a, b = np.float32(a), np.float32(b)
    bad = 0
    for i in range(out.shape[0]):
        value = np.float32(a * _load(ref, i)) - np.float32(b * _load(mem, i))
        bad += _store(out, i, value)
    return bad


@njit(nogil=True, cache=True)
def fused_extrapolate_momentum(out, ref, mem, prev, a, b, e, c):
    """out = RN(e·(a·ref − b·mem) + c·prev); returns the number of non-finite outputs."""
    a, b, e, c = np.float32(a), np.float32(b), np.float32(e), np.float32(c)
    bad = 0
    for i in range(out.shape[0]):
        base = np.float32(a * _load(ref, i)) - np.float32(b * _load(mem, i))
        value = np.float32(e * base) + np.float32(c * _load(prev, i))
        bad += _store(out, i, value)
    return bad
