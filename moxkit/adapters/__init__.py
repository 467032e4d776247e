"""PEFT LoRA adapters in and out: read (open and validate an adapter folder), forget (the
forget adapter θ_ref − α·s·B·A, its momentum form, and `moxkit extrapolate` with a LoRA MEM),
lowrank (sums of low-rank terms, their checks and budgets) and merge (BASE + s·B·A streamed
into a full model)."""

from .forget import (
    extrapolate_adapter,
    momentum_forget_adapter,
    momentum_weights,
    write_forget_adapter,
)
from .lowrank import AdapterReport
from .merge import merge_adapter
from .read import (
    CONFIG_NAME,
    MAX_CONFIG_BYTES,
    WEIGHTS_NAME,
    Adapter,
    LoraModule,
    PatternMatcher,
    is_adapter_dir,
    open_adapter,
)

__all__ = [
    "CONFIG_NAME",
    "MAX_CONFIG_BYTES",
    "WEIGHTS_NAME",
    "Adapter",
    "AdapterReport",
    "LoraModule",
    "PatternMatcher",
    "extrapolate_adapter",
    "is_adapter_dir",
    "merge_adapter",
    "momentum_forget_adapter",
    "momentum_weights",
    "open_adapter",
    "write_forget_adapter",
]
