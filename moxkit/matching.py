"""Matched forgetting: the strength at which a forget model reaches a target level of forgetting,
so that methods are compared at equal forgetting instead of at hand-picked strengths.

The level is continuous and needs no generation: the mean, over a validation forget set, of
each answer's log-probability (nats, summed over the answer's tokens, as the trainer encodes
the row). Lower is more forgotten. A method's strength is a number on a line through weight
space: MOX's α (θ_for = (1+α)·θ_ref − α·θ_mem, computed with the engine's arithmetic), or, for
a trained baseline, the fraction s between two consecutive checkpoints
(θ_k + s·(θ_k+1 − θ_k)). Either way the strength is found by bisection: the level is bracketed
on an ascending grid, then the bracket is halved `iterations` times, and the answer is the
bracket's stronger end (the weakest strength tried that reaches the target).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InputError, MismatchError

ALPHA_GRID = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0)
BETWEEN_GRID = (0.0, 1.0)  # s between two checkpoints
ITERATIONS = 12  # the bracket shrinks 4096-fold


@dataclass
class Match:
    """Where a line of models reaches the target level. `strength` is None when no strength
    tried reached it; `level` is then the level at the strongest point tried."""

    strength: float | None
    level: float
    target: float
    evaluations: list[tuple[float, float]] = field(default_factory=list)  # (strength, level)

    @property
    def reached(self) -> bool:
        return self.strength is not None

    @property
    def gap(self) -> float:
        """level − target: how far past the target the match lies (≤ 0 when reached)."""
        return self.level - self.target


def _past(level: float, target: float) -> bool:
    """A non-finite level (a broken model) counts as past the target: bisection then brackets
    the last finite point instead of stepping over the break."""
    return not math.isfinite(level) or level <= target


def bisect_level(
    level_at: Callable[[float], float],
    target: float,
    grid: Sequence[float] = ALPHA_GRID,
    iterations: int = ITERATIONS,
) -> Match:
    """The weakest strength on `grid` (ascending), refined by bisection, whose level is at or
    below `target`. level_at is expected to fall as the strength grows; where it does not,
    the first crossing along the grid is the one found."""
    if list(grid) != sorted(grid) or len(grid) < 1:
        raise ValueError("grid must be ascending and non-empty")
    evaluations: list[tuple[float, float]] = []

    def at(x: float) -> float:
        value = float(level_at(x))
        evaluations.append((x, value))
        return value

    lo: float | None = None
    lo_level = math.nan
    for x in grid:
        value = at(x)
        if _past(value, target):
            if lo is None:  # already at or past the target at the weakest strength
                return Match(x, value, target, evaluations)
            hi, hi_level = x, value
            break
        lo, lo_level = x, value
    else:
        return Match(None, lo_level, target, evaluations)
    for _ in range(iterations):
        mid = (lo + hi) / 2
        value = at(mid)
        if _past(value, target):
            hi, hi_level = mid, value
        else:
            lo = mid
    return Match(hi, hi_level, target, evaluations)


@torch.inference_mode()
def answer_logprob(model: Any, tokenizer: Any, rows: Any, *, chat_template: bool = False,
                   batch_size: int = 64) -> float:  # fmt: skip
    """Mean over `rows` (anything moxkit.text.load_rows reads, or the Rows it returned) of
    each answer's summed log-probability, EOS excluded, with the rows encoded exactly as the
    trainer encodes them."""
    from .text import Row, load_rows

    is_rows = isinstance(rows, list) and all(isinstance(r, Row) for r in rows)
    loaded = rows if is_rows else load_rows(rows, "rows")  # checked once, not per bisection step
    if not loaded:
        raise InputError("matched forgetting: no rows to measure the level on")
    was_training = model.training
    model.eval()
    total = 0.0
    batches = answer_token_logprobs(model, tokenizer, [r.prompt for r in loaded],
                                    [r.completion for r in loaded], chat_template=chat_template,
                                    batch_size=batch_size)  # fmt: skip
    for _, _, scored, chosen in batches:
        total += float((chosen * scored).sum(-1).sum())
    model.train(was_training)
    return total / len(loaded)


def answer_token_logprobs(model: Any, tokenizer: Any, prompts: Sequence[str],
                          answers: Sequence[str], *, chat_template: bool = False,
                          batch_size: int = 64):  # fmt: skip
    """Teacher-forced scoring of answers, one batch at a time, the pairs encoded exactly as the
    trainer encodes them: yields, per batch and next-token position, (the log-probabilities
    (fp32, CPU), the target token, whether it is an answer token (EOS excluded), its log p)
    for answer_logprob and apps.facts.score_facts to reduce."""
    from .eval.scoring import batched, pair_examples
    from .text import IGNORE, pad_id

    examples = pair_examples(tokenizer, prompts, answers, chat_template)
    device = next(model.parameters()).device
    for batch in batched(len(examples), batch_size):
        seqs = [examples[i] for i in batch]
        width = max(len(e.input_ids) for e in seqs)
        ids = torch.full((len(seqs), width), pad_id(tokenizer), dtype=torch.long)
        target = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, e in enumerate(seqs):
            n = len(e.input_ids)
            ids[i, :n] = torch.tensor(e.input_ids)
            target[i, : n - 1] = torch.tensor(e.labels[:-1])  # EOS not scored
            mask[i, :n] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).cpu()
        shifted = target[:, 1:]
        scored = shifted != IGNORE
        chosen = logp.gather(-1, shifted.clamp_min(0)[..., None]).squeeze(-1)
        yield logp, shifted, scored, chosen


def fp32_state(model: Any) -> dict[str, torch.Tensor]:
    """A CPU fp32 copy of a model's parameters, by name (a checkpoint to match between)."""
    return {n: p.detach().to("cpu", torch.float32, copy=True) for n, p in model.named_parameters()}


def load_state(model: Any, state: Mapping[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(state[name])


class AlphaLine:
    """The forget models of one θ_mem: θ_for(α), written into one working model with the
    engine's arithmetic (bit-identical to moxkit.extrapolate and extrapolate_model)."""

    def __init__(self, ref: Any, mem: Any):
        """ref: a model or its CPU fp32 state by name (θ_ref kept aside before training);
        mem: the model θ_mem."""
        from .engine.backends import CpuBackend

        self.ref = dict(ref) if isinstance(ref, Mapping) else fp32_state(ref)
        self.mem = fp32_state(mem)
        if self.ref.keys() != self.mem.keys() or any(
            self.ref[n].shape != self.mem[n].shape for n in self.ref
        ):
            raise MismatchError("matched forgetting: θ_mem's tensors differ from the reference's")
        self.model = copy.deepcopy(mem).float().eval()
        self._out = {n: torch.empty_like(t) for n, t in self.ref.items()}
        self._backend = CpuBackend()

    def load(self, alpha: float) -> Any:
        """The working model holding θ_for(α); α = 0 is θ_ref itself."""
        from .engine.formula import Coefficients

        if alpha == 0:
            load_state(self.model, self.ref)
            return self.model
        coeffs = Coefficients(alpha, None)
        for name, out in self._out.items():
            ok = self._backend.extrapolate(
                out.view(-1), self.ref[name].view(-1), self.mem[name].view(-1), None, coeffs
            )
            if not ok:
                out.fill_(math.nan)  # measured as non-finite: past any target
        load_state(self.model, self._out)
        return self.model


def match_alpha(ref: Any, mem: Any, level: Callable[[Any], float], target: float, *,
                grid: Sequence[float] = ALPHA_GRID,
                iterations: int = ITERATIONS) -> tuple[Match, Any]:  # fmt: skip
    """The α at which θ_for reaches `target` as measured by level(model), and that forget
    model (a new model; ref and mem are not modified; None when no α on the grid reaches the
    target)."""
    line = AlphaLine(ref, mem)
    match = bisect_level(lambda a: level(line.load(a)), target, grid, iterations)
    if not match.reached:
        return match, None
    return match, line.load(match.strength)


def match_between(model: Any, before: Mapping[str, torch.Tensor],
                  after: Mapping[str, torch.Tensor], level: Callable[[Any], float],
                  target: float, iterations: int = ITERATIONS) -> Match:  # fmt: skip
    """The fraction s in [0, 1] at which θ_k + s·(θ_k+1 − θ_k) reaches `target`, for two
    consecutive checkpoints `before` and `after` (fp32 states); `model` (a working copy of the
    architecture) is left holding that point."""

    def load(s: float) -> Any:
        with torch.no_grad():
            for name, param in model.named_parameters():
                param.copy_(torch.lerp(before[name], after[name], s))
        return model

    match = bisect_level(lambda s: level(load(s)), target, BETWEEN_GRID, iterations)
    load(match.strength if match.reached else 1.0)
    return match


def stop_at_level(level: Callable[[Any], float], target: float):
    """A transformers callback for a trained baseline: the level after every optimizer step;
    training stops at the first step at or past `target`. It keeps that checkpoint (`after`)
    and the one before it (`before`, the starting weights before the first step), the two
    ends match_between needs; `after` stays None if the run never reached the target."""
    from transformers import TrainerCallback

    class StopAtLevel(TrainerCallback):
        def __init__(self):
            self.before: dict[str, torch.Tensor] | None = None
            self.after: dict[str, torch.Tensor] | None = None
            self.step: int | None = None
            self.path: list[tuple[int, float]] = []  # (step, level)

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self.before = fp32_state(model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            value = level(model)
            self.path.append((state.global_step, value))
            if _past(value, target):
                self.after, self.step = fp32_state(model), state.global_step
                control.should_training_stop = True
            else:
                self.before = fp32_state(model)

    return StopAtLevel()


def target_level(kind: str, value: Any, *, reference: Any, level: Callable[[Any], float],
                 level_of_rows: Callable[[Any, Any], float],
                 load: Callable[[Any], Any]) -> float:  # fmt: skip
    """The level to reach, from a parsed match target (moxkit.train.config.parse_target):
    ("level", x) is x; ("model", folder) is that model's level on the match rows (load(folder)
    gives the model); ("unknown", rows) is the reference's own level on rows it does not know
    (level_of_rows(model, rows))."""
    with torch.no_grad():
        if kind == "level":
            return float(value)
        if kind == "unknown":
            return level_of_rows(reference, value)
        other = load(value)
        try:
            return level(other)
        finally:
            del other
