"""The pre-registered operating-point rule and tofu-mini's name/value scoring, shared by
studies/unlearning_mini.py and `moxkit demo`.

Every unlearning method has a strength knob (MOX: α; gradient-ascent baselines: learning rate
and how long they train). Comparing methods at one arbitrary setting each, or at the setting that
looks best on the reported authors, decides the comparison before it is run. So the knob is set
by one rule, fixed before any result was seen, that reads only the *validation* forget authors
(disjoint from the reported ones) and the validation retain/general sets:

    keep the operating points whose validation utility U is at least KEEP × the reference
    model's; among them take the highest validation forget quality (ties: the higher U). If no
    point keeps that much utility, take the point with the highest U (the gentlest), flagged.

U is the harmonic mean of the validation retain and general answer probabilities: the
likelihood parts of TOFU's model utility that move with collateral damage, computed without
generating text, so that every checkpoint of every sweep can be scored (TOFU's MU, with its
ROUGE and truth-ratio parts, is reported at the chosen points).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..text import token_span

KEEP = 0.9
ALPHAS = tuple(1.0 + 0.5 * i for i in range(15))  # 1, 1.5, ..., 8


def rule_utility(summary: dict) -> float:
    """U: the harmonic mean of the retain and general answer probabilities of a summary."""
    values = [summary.get("retain_prob"), summary.get("general_prob")]
    if any(v is None or not math.isfinite(v) for v in values):
        return math.nan
    return 0.0 if min(values) <= 0 else 2 / sum(1 / v for v in values)


class Choice:
    """`choose`, one point at a time. After each offer only two points can still be chosen (the
    best so far that keeps utility, and the one with the highest utility), so a sweep over
    large models need keep no other checkpoint. Ties go to the earlier point, as in `choose`."""

    def __init__(self, reference_utility: float):
        self.reference_utility = reference_utility
        self.kept: tuple[int, tuple[float, float]] | None = None  # (index, (FQ, U))
        self.gentlest: tuple[int, float] | None = None  # (index, U)

    def offer(self, index: int, summary: dict) -> None:
        """Consider one point's validation summary (retain_prob, general_prob, forget_quality)."""

        def finite(value) -> float:
            return value if value is not None and math.isfinite(value) else -math.inf

        u = finite(rule_utility(summary))
        if u >= KEEP * self.reference_utility:
            key = (finite(summary.get("forget_quality")), u)
            if self.kept is None or key > self.kept[1]:
                self.kept = (index, key)
        if self.gentlest is None or u > self.gentlest[1]:
            self.gentlest = (index, u)

    @property
    def candidates(self) -> set[int]:
        """The indices the rule may still pick."""
        return {c[0] for c in (self.kept, self.gentlest) if c is not None}

    def result(self) -> tuple[int, bool]:
        """(index of the chosen point, whether it kept KEEP × the reference's utility)."""
        if self.gentlest is None:
            raise ValueError("no operating points to choose from")
        return (self.kept[0], True) if self.kept else (self.gentlest[0], False)


def choose(points: Sequence[dict], reference_utility: float) -> tuple[int, bool]:
    """(index of the chosen point, whether it kept KEEP × the reference's utility). Each point
    holds its validation summary under "val" (retain_prob, general_prob, forget_quality)."""
    choice = Choice(reference_utility)
    for i, point in enumerate(points):
        choice.offer(i, point["val"])
    return choice.result()


def _spans(text: str, needle: str) -> list[tuple[int, int]]:
    out, start = [], text.find(needle)
    while needle and start >= 0:
        out.append((start, start + len(needle)))
        start = text.find(needle, start + 1)
    return out


def answer_token_kinds(tokenizer, row: dict) -> tuple[list[int], list[str | None]]:
    """The token ids of `question answer` and, per token, "name" (it spells part of the
    subject's name, at any of its places in the answer), "value" (part of the fact's value, at
    its last place in the answer) or None.

    A token is in a span when the characters it spells, whitespace stripped (text.token_span),
    lie inside it: byte-level BPE's "Ġpoetry" is the value "poetry" though its offsets hold the
    space before it, as are sentencepiece's "▁poetry" and a word-level "poetry". Tokens of
    whitespace only (a lone "Ġ" or "▁") are in no span. A token that spells characters both
    inside and outside a span ("Ġpoetry" for the value "poet") is in neither: it is not a
    prediction of the value alone, and a row whose value has no token of its own is left out
    of the value mean rather than scored on a token that is partly something else."""
    text = f"{row['question']} {row['answer']}"
    offset = len(row["question"]) + 1
    enc = tokenizer(text, return_offsets_mapping=True)
    spans = {
        "name": _spans(row["answer"], row["subject"]),
        "value": _spans(row["answer"], row["value"])[-1:],
    }
    spans = {k: [(a + offset, b + offset) for a, b in ss] for k, ss in spans.items()}
    chars = [token_span(text, s, e) for s, e in enc["offset_mapping"]]
    kinds = [
        next((k for k, ss in spans.items() if any(a <= c[0] and c[1] <= b for a, b in ss)), None)
        if c
        else None
        for c in chars
    ]
    return list(enc["input_ids"]), kinds


@torch.inference_mode()
def name_value_probs(model, tokenizer, rows: Sequence[dict], batch_size: int = 32) -> dict:
    """Per-token answer probability of a QA set split by what the tokens spell: the subject's
    name (which the question also contains, so a model can copy it) and the fact's value (which
    only a model that knows the fact can predict); tokens as `answer_token_kinds` assigns them.
    Rows need question, answer, subject, value. Returns {"name_prob", "value_prob"}: means over
    rows of the per-token geometric mean."""
    device = next(model.parameters()).device
    per_row: dict[str, list[float]] = {"name": [], "value": []}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        encodings, kinds = [], []
        for r in batch:
            ids, row_kinds = answer_token_kinds(tokenizer, r)
            encodings.append(ids)
            kinds.append(row_kinds)
        width = max(len(e) for e in encodings)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, e in enumerate(encodings):
            ids[i, : len(e)] = torch.tensor(e)
            mask[i, : len(e)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        logp = torch.log_softmax(logits[:, :-1].double(), -1)
        chosen = logp.gather(-1, ids[:, 1:, None].to(device)).squeeze(-1).cpu()
        for i, row_kinds in enumerate(kinds):
            for kind in per_row:
                pos = [t for t in range(1, len(encodings[i])) if row_kinds[t] == kind]
                if pos:
                    per_row[kind].append(math.exp(float(chosen[i, [t - 1 for t in pos]].mean())))
    return {f"{k}_prob": sum(v) / len(v) if v else math.nan for k, v in per_row.items()}


def on_epoch_end(fn):
    """A transformers callback calling fn(model, epoch) after every training epoch, with the
    model in eval mode for the call (a checkpoint's metrics, or a copy of its weights)."""
    from transformers import TrainerCallback

    class _OnEpochEnd(TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            model.eval()
            fn(model, round(state.epoch))
            model.train()

    return _OnEpochEnd()
