"""Extrapolation during and after training: θ_for = (1+α)·θ_ref − α·θ_mem, and its momentum
form θ_for ← η·[(1+α)·θ_ref − α·θ_mem] + (1−η)·θ_for, with θ_for⁰ = θ_ref.

One protocol (`Extrapolator`: tick during training, finish at the end), three places to hold
the tensors. In memory: θ_ref and θ_for as CPU fp32 copies, updated tensor by tensor with the
CPU backend, which is the exact arithmetic of the streaming engine, so both paths give the same
bits. On disk, for models that do not fit: θ_mem is saved and `moxkit.extrapolate(...,
prev=θ_for)` streams the update out of core; intermediate θ_for are kept in fp32 and only the
final one is rounded to the reference's dtype. As LoRA adapters: θ_for is itself low-rank, a
weighted sum of the θ_mem snapshots' adapters (moxkit.adapters.momentum_weights).

Unrolled, n ticks give θ_for = θ_ref − α·Σ_k w_k·(θ_mem^k − θ_ref) with w_k = η(1−η)^(n−k):
θ_for is linear in α, so the η-weighted average of the θ_mem ticks can be read off a result
made at α = 1 (`averaged_mem`), and one training serves a whole α grid.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from transformers import TrainerCallback

from moxkit.engine.backends import CpuBackend
from moxkit.engine.formula import Coefficients
from moxkit.errors import InputError, MismatchError

from .models import save_model

if TYPE_CHECKING:
    from .session import Run

# The momentum schedule's default: this many ticks over a run. The paper leaves the tick
# unspecified. With n ticks θ_for = Σ_k η(1−η)^(n−k)·[(1+α)θ_ref − α·θ_mem^k] + (1−η)^n·θ_ref,
# so η only matters if the θ_mem^k it averages differ: ticks every step (or one per epoch of
# a ten-epoch run, whose last epochs barely move under a decaying learning rate) weigh almost
# only the final θ_mem, and the result is plain MOX whatever η. A few ticks spread over the
# run make η the weight it is meant to be (measured in README's MOX-Mo section).
DEFAULT_TICKS = 4


def default_every(total_steps: int) -> int:
    """Optimizer steps between momentum ticks when the user does not say."""
    return max(1, -(-total_steps // DEFAULT_TICKS))


class Extrapolator(Protocol):
    """What the training session asks of an extrapolation, wherever θ_for lives. Every
    process of a distributed run calls both methods (saving θ_mem is collective); only the
    main process computes and writes."""

    alpha: float
    eta: float | None
    ticks: int

    def tick(self, run: Run) -> None:
        """Fold the run's current θ_mem into θ_for (a momentum tick)."""

    def finish(self, run: Run, tokenizer, dtype: torch.dtype) -> Any:
        """The last tick, written into the run's staged output: the forget model in memory
        (in `dtype`; None on other processes), or None when it went to disk."""


def averaged_mem(ref_model, forget_at_alpha_one):
    """The η-weighted average E of the θ_mem ticks behind a MOX-momentum result made at α = 1:
    θ_for(α) = θ_ref − α·(E − θ_ref), so E = 2·θ_ref − θ_for(1), and
    extrapolate_model(ref, E, α) is the momentum result at any α."""
    from .api import extrapolate_model

    return extrapolate_model(ref_model, forget_at_alpha_one, 1.0)


def cpu_fp32_state(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {n: t.detach().to("cpu", torch.float32, copy=True) for n, t in named}


def reference_state(reference: torch.nn.Module | None, ref_model: torch.nn.Module):
    """θ_ref as CPU fp32 tensors for the in-memory extrapolation. The loss's frozen reference
    already holds exactly that when MODEL is stored in fp32 and training runs on the CPU
    (`--reference stored`): its tensors are used as they are, read only, instead of a second
    fp32 copy of the model. Otherwise (bf16 weights, a GPU, no reference) a copy of MODEL's,
    made before training moves them."""
    if reference is not None:
        named = list(reference.named_parameters())
        if named and all(p.device.type == "cpu" and p.dtype == torch.float32 for _, p in named):
            return {n: p.detach() for n, p in named}
    return cpu_fp32_state(ref_model.named_parameters())


class InMemoryExtrapolator:
    """θ_ref and the running θ_for as CPU fp32 tensors (θ_for a copy; θ_ref shared with the
    loss's frozen reference where that holds the same tensors: reference_state)."""

    def __init__(self, ref: dict[str, torch.Tensor], alpha: float, eta: float | None):
        self.ref = ref
        self.alpha, self.eta = alpha, eta
        self.forget: dict[str, torch.Tensor] | None = None
        self.ticks = 0
        self._backend = CpuBackend()

    def update(self, mem: Iterable[tuple[str, torch.Tensor]]) -> None:
        """One tick: fold the current θ_mem into θ_for (or, without momentum, set θ_for to
        the plain extrapolation)."""
        coeffs = Coefficients(self.alpha, self.eta)
        first = self.forget is None
        if first:
            self.forget = {}
        seen = set()
        for name, tensor in mem:
            ref = self.ref.get(name)
            if ref is None or ref.shape != tensor.shape:
                raise MismatchError(f"tensor {name}: not in the reference or of another shape")
            out = self.forget.get(name)
            if out is None:  # θ_for⁰ = θ_ref
                out = self.forget[name] = ref.clone()
            mem32 = tensor.detach().to("cpu", torch.float32).reshape(-1)
            prev = out.view(-1) if coeffs.momentum else None
            if not self._backend.extrapolate(out.view(-1), ref.view(-1), mem32, prev, coeffs):
                raise InputError(f"tensor {name}: extrapolation gave non-finite values")
            seen.add(name)
        if seen != set(self.ref):
            missing = sorted(set(self.ref) - seen)[:3]
            raise MismatchError(f"extrapolation: θ_mem lacks tensors of the reference: {missing}")
        self.ticks += 1

    def load_into(self, model: torch.nn.Module) -> None:
        """Write θ_for into `model`'s parameters (same names as θ_ref)."""
        assert self.forget is not None, "update() was never called"
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(self.forget[name])

    def tick(self, run: Run) -> None:
        if run.is_main:
            self.update(run.model.named_parameters())

    def finish(self, run: Run, tokenizer, dtype: torch.dtype):
        """θ_for into the trained model itself (returned, in `dtype`)."""
        if not run.is_main:
            return None
        model = run.model
        self.update(model.named_parameters())
        self.load_into(model)
        model.to(dtype)
        if run.staged is not None:
            save_model(model, tokenizer, run.staged, names=run.names)
        return model


class DiskExtrapolator:
    """The same ticks through the streaming engine; `work` is a scratch directory (None on
    processes other than the main one, which never write)."""

    def __init__(self, ref_dir: Path, alpha: float, eta: float | None, work: Path | None):
        self.ref_dir, self.alpha, self.eta, self.work = Path(ref_dir), alpha, eta, work
        self.prev: Path | None = None  # None: θ_for⁰ = θ_ref
        self.ticks = 0

    def update(self, mem_dir: Path, out: Path | None = None, final: bool = False) -> Path:
        """Fold the θ_mem saved at `mem_dir` into θ_for. Intermediate results stay fp32; the
        final one goes to `out` in the reference's dtype."""
        from moxkit import extrapolate

        target = out if final else self.work / f"forget-{self.ticks + 1}"
        momentum = {} if self.eta is None else {"eta": self.eta, "prev": self.prev or self.ref_dir}
        extrapolate(self.ref_dir, mem_dir, self.alpha, target, progress=False,
                    dtype=None if final else "fp32", **momentum)  # fmt: skip
        if not final:
            if self.prev is not None:
                shutil.rmtree(self.prev)
            self.prev = target
        self.ticks += 1
        return target

    def tick(self, run: Run) -> None:
        mem_dir = run.save_mem_scratch()
        if run.is_main:
            self.update(mem_dir)

    def finish(self, run: Run, tokenizer, dtype: torch.dtype) -> None:
        """θ_for streamed into the staged output in the reference's dtype."""
        mem_dir = run.save_mem_scratch()
        if run.is_main:
            built = run.work / "forget"
            self.update(mem_dir, out=built, final=True)
            run.adopt(built)


class MomentumCallback(TrainerCallback):
    """Ticks every `every` optimizer steps, except the last step, which the caller handles
    after training (the final tick writes the output). `tick` is called on every process
    with the step number; it does its own process coordination."""

    def __init__(self, every: int, tick):
        self.every = every
        self.tick = tick

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every == 0 and state.global_step < state.max_steps:
            self.tick(state.global_step)


class AdapterExtrapolator:
    """MOX with LoRA: θ_mem = θ_ref + s·B·A, so θ_for = θ_ref − α·s·B·A is itself a LoRA
    adapter on the untouched base (moxkit.adapters), a few MB. Each tick saves the adapter as
    a snapshot in `work`; the end writes the forget adapter from the last one or, with η,
    the momentum adapter Σ_k w_k over all of them (exact: a sum of low-rank terms)."""

    def __init__(self, base_dir: Path | None, alpha: float, eta: float | None, work: Path | None):
        self.base_dir, self.alpha, self.eta, self.work = base_dir, alpha, eta, work
        self.snapshots: list[Path] = []
        self.ticks = 0

    def update(self, peft_model) -> None:
        folder = self.work / f"adapter-{self.ticks + 1}"
        peft_model.save_pretrained(folder, safe_serialization=True)
        self.snapshots.append(folder)
        self.ticks += 1

    def tick(self, run: Run) -> None:
        if run.is_main:
            self.update(run.model)

    def finish(self, run: Run, tokenizer, dtype: torch.dtype) -> None:
        """The forget adapter into the staged output."""
        if run.is_main:
            built = run.work / "forget"
            self.update(run.model)
            self.write(built)
            run.adopt(built)

    def write(self, out: Path) -> None:
        """The forget adapter into `out` (a new folder)."""
        from moxkit.adapters import momentum_forget_adapter, write_forget_adapter

        if self.eta is None:
            write_forget_adapter(self.snapshots[-1], self.alpha, out, base=self.base_dir)
        else:
            momentum_forget_adapter(self.snapshots, self.alpha, out, eta=self.eta,
                                    base=self.base_dir)  # fmt: skip
