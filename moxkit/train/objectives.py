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
    _, _, mask = _shifted(logits, labels)
    return -sequence_logprob(logits, labels) / mask.sum(-1).clamp_min(1)


def sequence_kl(ref_logits: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor):
    """Forward KL(p_ref ‖ p_θ) per answer token (padding and prompt excluded), mean per row."""
    logp, _, mask = _shifted(logits, labels)
    ref_logp = F.log_softmax(ref_logits[:, :-1].float(), dim=-1)
    kl = F.kl_div(logp, ref_logp, log_target=True, reduction="none").sum(-1)
    return (kl * mask).sum(-1) / mask.sum(-1).clamp_min(1)


def npo_loss(logprob: torch.Tensor, ref_logprob: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO: −(2/β)·log σ(−β·log(p_θ/p_ref)), per row; ≥ 0, minimised by lowering p_θ."""
    return -(2.0 / beta) * F.logsigmoid(-beta * (logprob - ref_logprob))


def default_npo_floor(beta: float, max_log_ratio: float = 20.0) -> float:
    """The negated NPO loss at log(p_θ/p_ref) = max_log_ratio: once a row's likelihood has
    risen that far above the reference it stops pulling, so the loss cannot run away."""
    return (2.0 / beta) * -math.log1p(math.exp(beta * max_log_ratio))


@dataclass(frozen=True)
class LossSpec:
    """Which terms a method optimises.

    forget: "nll" (memorize), "neg_nll" (gradient ascent), "npo_mem" (negated NPO, floored:
    memorize), "npo" (NPO: unlearn). retain: None, "kl" (forward KL from the frozen
    reference) or "nll". target_weight > 0 subtracts the NLL of replacement answers
    (targeted MOX)."""

    forget: str = "nll"
    retain: str | None = None
    retain_weight: float = 1.0
    target_weight: float = 0.0
    npo_beta: float = 0.1
    npo_floor: float | None = None
    primary: str = "forget"  # name of the first data group ("train" for plain fine-tuning)

    @property
    def needs_reference(self) -> bool:
        return self.forget in ("npo", "npo_mem") or self.retain == "kl"

    @property
    def floor(self) -> float:
        if self.npo_floor is not None:
            return self.npo_floor
        return default_npo_floor(self.npo_beta)
