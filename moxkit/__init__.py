"""moxkit: MOX unlearning. Memorize the forget set by gradient descent, then extrapolate away
from the memorization model: θ_for = (1+α)·θ_ref − α·θ_mem."""

__version__ = "0.1.0"

from .errors import InputError, MismatchError, MoxError, OutputError, ResourceError  # noqa: E402

__all__ = ["MoxError", "InputError", "MismatchError", "OutputError", "ResourceError", "PAPER_ETA",
           "__version__", "extrapolate", "ExtrapolationReport", "EngineOptions"]  # fmt: skip

_LAZY = {
    "extrapolate": "engine.stream",
    "ExtrapolationReport": "engine.stream",
    "PAPER_ETA": "engine.formula",
    "EngineOptions": "engine.options",
}


def __getattr__(name: str):
    # Lazy: importing moxkit must not import numpy or torch until the engine is used.
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(name)
