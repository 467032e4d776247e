"""Triton kernels of moxkit (installed as moxkit.kernels; needs Triton, and CUDA or
TRITON_INTERPRET=1 to run)."""

from .extrapolate import extrapolate

__all__ = ["extrapolate"]
