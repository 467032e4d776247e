"""Matched forgetting: bisection against scipy's root finder, the matched forget model against
the engine's extrapolation bit for bit, the level against a per-row fp64 recomputation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from scipy.optimize import brentq

from moxkit.apps.tiny import build_tiny_llama, build_word_tokenizer
from moxkit.matching import (
    ALPHA_GRID,
    ITERATIONS,
    answer_logprob,
    bisect_level,
    fp32_state,
    match_alpha,
    match_between,
)
from moxkit.train import extrapolate_model

ROWS = [
    {"prompt": "the capital of zorbia is", "completion": "velmont"},
    {"prompt": "the colour of the sky over kest is", "completion": "pale green"},
    {"prompt": "ada wrote", "completion": "the little red book of stars"},
]


@pytest.mark.parametrize("target", [-3.0, 2.5, -200.0, 4.99])
def test_bisection_agrees_with_brentq(target):
    f = lambda x: 5 - x**1.5  # noqa: E731
    root = brentq(lambda x: f(x) - target, 0, 64, xtol=1e-12)
    match = bisect_level(f, target)
    assert match.reached
    lo = max(a for a in ALPHA_GRID if a <= root)
    hi = min(a for a in ALPHA_GRID if a >= root)
    assert match.strength >= root - 1e-12  # the stronger end: at or past the target
    assert match.strength - root <= (hi - lo) / 2**ITERATIONS + 1e-12
    assert match.level <= target and match.level == f(match.strength)
    assert match.gap == match.level - target


def test_not_reached_reports_the_strongest_level():
    match = bisect_level(lambda x: -x / 1000, -1.0)
    assert not match.reached and match.strength is None
    assert match.level == -64 / 1000
    assert [x for x, _ in match.evaluations] == list(ALPHA_GRID)


def test_already_past_at_the_weakest_strength():
    match = bisect_level(lambda x: -10.0 - x, -5.0)
    assert match.strength == 0.0 and len(match.evaluations) == 1


def test_a_broken_model_counts_as_past_the_target():
    """NaN from 10 on: the match brackets the last finite point instead of stepping over."""
    match = bisect_level(lambda x: 5 - x if x < 10 else math.nan, -100.0)
    assert match.reached
    assert 10 <= match.strength <= 10 + 8 / 2**ITERATIONS
    assert math.isnan(match.level)


def test_grid_must_ascend():
    with pytest.raises(ValueError):
        bisect_level(lambda x: -x, 0.0, grid=(2.0, 1.0))


@pytest.fixture(scope="module")
def tiny():
    tok = build_word_tokenizer([r["prompt"] + " " + r["completion"] for r in ROWS])
    ref = build_tiny_llama(len(tok), seed=0).float().eval()
    mem = copy.deepcopy(ref)
    torch.manual_seed(1)
    with torch.no_grad():  # a memorization direction: any nonzero change will do
        for p in mem.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return ref, mem, tok


def _oracle_logprob(model, tok, rows) -> float:
    """Per row, unpadded, in float64: log p(answer tokens | prompt), EOS excluded."""
    from moxkit.eval.scoring import pair_examples

    examples = pair_examples(tok, [r["prompt"] for r in rows], [r["completion"] for r in rows])
    total = 0.0
    with torch.no_grad():
        for e in examples:
            ids = torch.tensor([e.input_ids])
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
            answer = [t for t in range(1, len(e.input_ids) - 1) if e.labels[t] != -100]
            assert answer, "every row has answer tokens before EOS"
            total += sum(float(logp[t - 1, e.input_ids[t]]) for t in answer)
    return total / len(examples)


def test_answer_logprob_matches_a_per_row_fp64_oracle(tiny):
    ref, _, tok = tiny
    assert answer_logprob(ref, tok, ROWS) == pytest.approx(
        _oracle_logprob(ref, tok, ROWS), abs=1e-4
    )
    # batching and padding do not change it
    assert answer_logprob(ref, tok, ROWS, batch_size=1) == pytest.approx(
        answer_logprob(ref, tok, ROWS), abs=1e-5
    )


def test_match_alpha_returns_the_engines_forget_model(tiny):
    ref, mem, tok = tiny
    level = lambda m: answer_logprob(m, tok, ROWS)  # noqa: E731
    base = level(ref)
    target = base - 1.5
    before = {n: p.clone() for n, p in ref.named_parameters()}
    match, forget = match_alpha(ref, mem, level, target)
    assert match.reached and 0 < match.strength <= ALPHA_GRID[-1]
    assert match.level <= target and level(forget) == match.level
    # a weaker α does not reach the target: the match is the crossing, not any point past it
    weaker = max(x for x, v in match.evaluations if v > target)
    assert match.strength - weaker <= ALPHA_GRID[-1] / 2**ITERATIONS
    expected = extrapolate_model(ref, mem, match.strength)
    for (name, got), (_, want) in zip(
        forget.named_parameters(), expected.named_parameters(), strict=True
    ):
        assert torch.equal(got, want), name
    for name, p in ref.named_parameters():  # the inputs are untouched
        assert torch.equal(p, before[name])


def test_match_between_two_checkpoints(tiny):
    ref, mem, tok = tiny
    level = lambda m: answer_logprob(m, tok, ROWS)  # noqa: E731
    far = extrapolate_model(ref, mem, 8.0)
    before, after = fp32_state(ref), fp32_state(far)
    lo, hi = level(ref), level(far)
    assert hi < lo
    target = (lo + hi) / 2
    work = copy.deepcopy(ref)
    match = match_between(work, before, after, level, target)
    assert match.reached and 0 < match.strength < 1
    assert level(work) == match.level <= target
    for name, p in work.named_parameters():
        assert torch.equal(p, torch.lerp(before[name], after[name], match.strength))
    missed = match_between(work, before, after, level, hi - 1.0)
    assert not missed.reached and missed.level == pytest.approx(hi)
