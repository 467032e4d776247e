"""Per-row loss terms, computed from logits and masked labels.

Every term is first averaged within a row (over its answer tokens), then over rows. Averaging
per row rather than over all tokens of a batch is what makes a data-parallel step (the mean of
per-process means) equal to a single-process step over the same global batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

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
