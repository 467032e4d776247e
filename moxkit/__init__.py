"""moxkit: MOX unlearning. Memorize the forget set by gradient descent, then extrapolate away
from the memorization model: θ_for = (1+α)·θ_ref − α·θ_mem."""

__version__ = "0.1.0"

from .errors import MoxError  # noqa: E402

__all__ = ["MoxError", "__version__", "extrapolate", "ExtrapolationReport"]


def __getattr__(name: str):
    # Lazy: importing moxkit must not import torch until the engine is used.
    if name in ("extrapolate", "ExtrapolationReport"):
        from . import stream

        return getattr(stream, name)
    raise AttributeError(name)
