"""The arithmetic contract of moxkit, in one place: what every backend computes, bit for bit.

    base = RN32( RN32(a·ref) − RN32(b·mem) )              a = fp32(1+α), b = fp32(α)
    out  = RN_out( base )                                 without momentum
    out  = RN_out( RN32( RN32(e·base) + RN32(c·prev) ) )  e = fp32(η), c = fp32(1−η)

Every operation is an IEEE fp32 operation (no fused multiply-add), operands are widened to
fp32 exactly, and RN_out is one round-to-nearest-even to the output dtype (subnormals kept,
overflow to ±inf). Fixing the order of operations, rather than "computing in fp32" loosely, is
what lets the C loop, the torch path and the Triton kernel agree exactly.

A NaN result is stored as the canonical quiet NaN of the output dtype (dtypes.CANONICAL_NAN_BITS),
whatever its sign and payload: CPUs and GPUs make different NaN bits (x86 gives 0xFFC00000 for
inf − inf, torch's vectorised fp32 -> bf16 conversion gives 0xFFFF), so only a fixed pattern
keeps outputs byte-identical across devices.

A leaf module: no torch, no other moxkit module but errors, so every path can import it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

PAPER_ETA = 0.675  # MOX-Mo's weight of the newest extrapolation, as the paper sets it

# The smallest normal fp32 number. Below it fp32(α) keeps fewer than 24 bits of α, and from
# about 1e-45 on it is 0 (α = 1e-50 would silently give OUT == REF).
FP32_TINY = float(np.finfo(np.float32).tiny)
# The largest α accepted. Up to 2**13 the two fp32 coefficients differ by 1 within 2**-10
# (the spacing of fp32 near 2**13 is 2**-10, and each coefficient is off by at most half of
# its own spacing), so the weight on REF stays 1; from 2**24 on, fp32(1+α) == fp32(α) and
# OUT = α·(REF − MEM) loses REF altogether.
ALPHA_MAX = 2.0**13


def fp32(x: float) -> float:
    """x rounded to the nearest fp32 value (ties to even), as a Python float."""
    return float(np.float32(x))


def check_alpha(alpha: float, name: str = "alpha") -> float:
    """α as a float, or MoxError naming `name` where fp32 coefficients cannot carry it."""
    value = _number(alpha, name)
    if not FP32_TINY <= value <= ALPHA_MAX:
        raise InputError(
            f"{name} {_shown(alpha)}: must be between {FP32_TINY:.3g} and {ALPHA_MAX:g} "
            "(beyond, the fp32 coefficients 1+α and α lose the formula)",
            params=(name,),
        )
    return value


def check_eta(eta: float, name: str = "eta") -> float:
    """η as a float, or MoxError naming `name` unless it is a weight in (0, 1] that fp32 holds."""
    value = _number(eta, name)
    if not FP32_TINY <= value <= 1.0:
        raise InputError(f"{name} {_shown(eta)}: must be in (0, 1] and at least {FP32_TINY:.3g}",
                         params=(name,))  # fmt: skip
    return value


def _number(x, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
        raise InputError(f"{name} {_shown(x)}: must be a number", params=(name,))
    try:
        value = float(x)
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise InputError(f"{name} {_shown(x)}: must be a finite number", params=(name,))
    return value


def _shown(x) -> str:
    """x for a one-line message: short, and safe for integers past str()'s digit limit."""
    if isinstance(x, int) and x.bit_length() > 64:
        return f"(an integer of {x.bit_length()} bits)"
    text = repr(x)
    return text if len(text) <= 40 else text[:37] + "..."


@dataclass(frozen=True)
class Coefficients:
    """α and (optionally) η, checked, with the fp32 constants every backend must use."""

    alpha: float
    eta: float | None = None  # None: no momentum term

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        if self.eta is not None:
            object.__setattr__(self, "eta", check_eta(self.eta))

    @property
    def momentum(self) -> bool:
        return self.eta is not None

    @property
    def ref_scale(self) -> float:
        """a = fp32(1+α)"""
        return fp32(1.0 + self.alpha)

    @property
    def mem_scale(self) -> float:
        """b = fp32(α)"""
        return fp32(self.alpha)

    @property
    def new_weight(self) -> float:
        """e = fp32(η); 1 without momentum"""
        return fp32(self.eta if self.eta is not None else 1.0)

    @property
    def prev_weight(self) -> float:
        """c = fp32(1−η); 0 without momentum"""
        return fp32(1.0 - self.eta if self.eta is not None else 0.0)
