"""Per-row loss terms, computed from logits and masked labels.

Every term is first averaged within a row (over its answer tokens), then over rows. Averaging
per row rather than over all tokens of a batch is what makes a data-parallel step (the mean of
per-process means) equal to a single-process step over the same global batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from moxkit.text import IGNORE


def _shifted(logits: torch.Tensor, labels: torch.Tensor):
    """Position t predicts token t+1; returns fp32 log-probs, targets and the answer mask."""
    logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = labels[:, 1:]
    mask = targets != IGNORE
    return logp, targets.clamp_min(0), mask


def sequence_logprob(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(answer | prompt) per row: the sum over answer tokens."""
    logp, targets, mask = _shifted(logits, labels)
    token = logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (token * mask).sum(-1)


def sequence_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean NLL per answer token, per row."""
    mask = labels[:, 1:] != IGNORE  # not _shifted: one log-softmax over the vocabulary, not two
    return -sequence_logprob(logits, labels) / mask.sum(-1).clamp_min(1)


def kl_mask(labels: torch.Tensor, attention_mask: torch.Tensor, positions: str) -> torch.Tensor:
    """The positions whose next-token distribution the retain KL compares. "all": every real
    token of the row, question included (TOFU's and open-unlearning's KL, which average over
    all positions; padding is left out here). "answer": the positions predicting answer
    tokens only, which leaves the question's tokens (names!) unprotected."""
    if positions == "all":
        return attention_mask.bool()
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE
    return mask


def sequence_kl(ref_logits: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor):
    """Forward KL(p_ref ‖ p_θ) of the next-token distributions at the positions in `mask`
    (see kl_mask), mean per row."""
    logp = F.log_softmax(logits.float(), dim=-1)
    ref_logp = F.log_softmax(ref_logits.float(), dim=-1)
    kl = F.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def npo_loss(logprob: torch.Tensor, ref_logprob: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO: −(2/β)·log σ(−β·log(p_θ/p_ref)), per row; ≥ 0, minimised by lowering p_θ."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logprob - ref_logprob))


def simnpo_loss(mean_nll: torch.Tensor, beta: float, gamma: float) -> torch.Tensor:
    """SimNPO (Fan et al. 2024): −(2/β)·log σ(−(β/|y|)·log p_θ(y|x) − γ), per row, from the
    per-token mean NLL; no reference model, the length normalisation replaces it. Minimised
    by raising the forget NLL; γ ≥ 0 is a margin."""
    return -(2.0 / beta) * F.logsigmoid(beta * mean_nll - gamma)


def default_npo_floor(beta: float, max_log_ratio: float = 20.0) -> float:
    """The negated NPO loss at log(p_θ/p_ref) = max_log_ratio: once a row's likelihood has
    risen that far above the reference it stops pulling, so the loss cannot run away."""
    x = beta * max_log_ratio  # (2/β)·log σ(−x) = −(2/β)·softplus(x), without overflow
    return (2.0 / beta) * -(max(x, 0.0) + math.log1p(math.exp(-abs(x))))


@dataclass(frozen=True)
class LossSpec:
    """The terms one training run optimises (built from the METHODS table and a LossConfig).

    forget: "nll" (memorize), "npo_mem" (negated NPO, floored: memorize), "neg_nll" (gradient
    ascent), "npo", "simnpo" (unlearn). retain: None, "kl" (forward KL from the frozen
    reference, over kl_positions) or "nll". target_weight > 0 adds the NLL of replacement
    answers evaluated at the extrapolated model (1+target_alpha)·θ_ref − target_alpha·θ
    (targeted MOX)."""

    forget: str = "nll"
    retain: str | None = None
    retain_weight: float = 1.0
    kl_positions: str = "all"
    target_weight: float = 0.0
    target_alpha: float = 4.0
    npo_beta: float = 0.1
    npo_floor: float | None = None
    simnpo_beta: float = 4.5
    simnpo_gamma: float = 0.0
    primary: str = "forget"  # name of the first data group ("train" for plain fine-tuning)

    @property
    def needs_reference(self) -> bool:
        return self.forget in ("npo", "npo_mem") or self.retain == "kl" or self.target_weight > 0

    @property
    def floor(self) -> float:
        if self.npo_floor is not None:
            return self.npo_floor
        return default_npo_floor(self.npo_beta)


# --- the terms the METHODS rows name (moxkit.train.methods) ---------------------------------
# Each computes one term of a micro-batch's loss from the trainer's forward passes (`fit`: the
# MoxTrainer, whose _forward and _reference_logits run the trained model and the frozen θ_ref),
# records what the step log shows in `terms`, and returns the term. A method is a row naming a
# forget term and a retain term; the trainer adds them up without knowing which method it runs.

Term = Callable[[Any, Any, dict, LossSpec, dict], torch.Tensor]


def _forget_nll(fit, model, inputs: dict, spec: LossSpec, terms: dict):
    """The per-row NLL of the forget (or fine-tuning) answers, logged, and the logits."""
    g = spec.primary
    logits = fit._forward(model, inputs, g)
    nll = sequence_nll(logits, inputs[f"{g}_labels"])
    terms[f"{g}_nll"] = nll.mean()
    return nll, logits


def nll_term(fit, model, inputs: dict, spec: LossSpec, terms: dict) -> torch.Tensor:
    """Memorize (or fine-tune): the forget answers' NLL."""
    nll, _ = _forget_nll(fit, model, inputs, spec, terms)
    return nll.mean()


def neg_nll_term(fit, model, inputs: dict, spec: LossSpec, terms: dict) -> torch.Tensor:
    """Gradient ascent: the forget answers' NLL, negated."""
    nll, _ = _forget_nll(fit, model, inputs, spec, terms)
    return -nll.mean()


def simnpo_term(fit, model, inputs: dict, spec: LossSpec, terms: dict) -> torch.Tensor:
    nll, _ = _forget_nll(fit, model, inputs, spec, terms)
    terms[f"{spec.primary}_simnpo"] = loss = simnpo_loss(
        nll, spec.simnpo_beta, spec.simnpo_gamma
    ).mean()
    return loss


def _npo(fit, model, inputs: dict, spec: LossSpec, terms: dict) -> torch.Tensor:
    """Per-row NPO against θ_ref (the forget NLL logged beside it)."""
    g = spec.primary
    labels = inputs[f"{g}_labels"]
    logits = fit._forward(model, inputs, g)
    logprob = sequence_logprob(logits, labels)
    ref_logprob = sequence_logprob(fit._reference_logits(model, inputs, g), labels)
    npo = npo_loss(logprob, ref_logprob, spec.npo_beta)
    terms[f"{g}_nll"] = sequence_nll(logits, labels).detach().mean()
    return npo


def npo_term(fit, model, inputs: dict, spec: LossSpec, terms: dict) -> torch.Tensor:
    npo = _npo(fit, model, inputs, spec, terms)
    terms[f"{spec.primary}_npo"] = npo.mean()
    return npo.mean()


def npo_mem_term(fit, model, inputs: dict, spec: LossSpec, terms: dict) -> torch.Tensor:
    """Negated NPO, floored per row so memorization cannot run away."""
    neg = torch.clamp(-_npo(fit, model, inputs, spec, terms), min=spec.floor)
    terms[f"{spec.primary}_neg_npo"] = neg.mean()
    return neg.mean()


def kl_term(fit, model, inputs: dict, spec: LossSpec, terms: dict) -> torch.Tensor:
    """KL(θ_ref ‖ θ) on the retain rows, over spec.kl_positions."""
    retain_logits = fit._forward(model, inputs, "retain")
    ref_logits = fit._reference_logits(model, inputs, "retain")
    mask = kl_mask(inputs["retain_labels"], inputs["retain_attention_mask"], spec.kl_positions)
    terms["retain_kl"] = term = sequence_kl(ref_logits, retain_logits, mask).mean()
    return term


def retain_nll_term(fit, model, inputs: dict, spec: LossSpec, terms: dict) -> torch.Tensor:
    retain_logits = fit._forward(model, inputs, "retain")
    terms["retain_nll"] = term = sequence_nll(retain_logits, inputs["retain_labels"]).mean()
    return term


FORGET_TERMS: dict[str, Term] = {"nll": nll_term, "neg_nll": neg_nll_term, "npo": npo_term,
                                 "npo_mem": npo_mem_term, "simnpo": simnpo_term}  # fmt: skip
RETAIN_TERMS: dict[str, Term] = {"kl": kl_term, "nll": retain_nll_term}
