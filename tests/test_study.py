"""The pre-registered rule picks as it says, and name/value-token probabilities equal a plain
per-row computation (no batching, tokens located by id rather than by character offsets)."""

import math

import pytest
import torch

from moxkit.apps.study import KEEP, Choice, choose, name_value_probs, rule_utility
from moxkit.apps.tiny import build_bpe_tokenizer, build_tiny_llama


def _pt(fq, u):
    # retain and general probabilities whose harmonic mean is u
    return {
        "val": {"forget_quality": fq, "retain_prob": u, "general_prob": u},
        "test": {"forget_quality": -1},
    }


def test_rule_utility_is_the_harmonic_mean_of_retain_and_general_probability():
    assert rule_utility({"retain_prob": 0.2, "general_prob": 0.6}) == pytest.approx(0.3)
    assert rule_utility({"retain_prob": 0.0, "general_prob": 0.6}) == 0.0
    assert math.isnan(rule_utility({"retain_prob": 0.5}))


def test_choose_keeps_utility_then_maximises_forget_quality():
    ref_u = 0.5
    floor = KEEP * ref_u
    points = [
        _pt(0.9, floor - 1e-9),
        _pt(0.3, floor),
        _pt(0.6, 0.46),
        _pt(0.6, 0.47),
        _pt(math.nan, 0.5),
    ]
    assert choose(points, ref_u) == (3, True)  # 0.9 breaks the floor; the FQ tie → higher U
    # nothing keeps the utility: the gentlest point, flagged
    assert choose([_pt(1.0, 0.1), _pt(0.5, 0.2)], ref_u) == (1, False)
    with pytest.raises(ValueError):
        choose([], ref_u)


def _choose_in_full(points, ref_u):
    """The rule as the docstring states it, over the whole list at once (the oracle)."""

    def val(p, key):
        v = rule_utility(p["val"]) if key == "u" else p["val"]["forget_quality"]
        return v if math.isfinite(v) else -math.inf

    ok = [i for i, p in enumerate(points) if val(p, "u") >= KEEP * ref_u]
    if ok:
        best = max((val(points[i], "fq"), val(points[i], "u")) for i in ok)
        return next(i for i in ok if (val(points[i], "fq"), val(points[i], "u")) == best), True
    best_u = max(val(p, "u") for p in points)
    return next(i for i, p in enumerate(points) if val(p, "u") == best_u), False


def test_choice_one_point_at_a_time_equals_the_rule_over_the_whole_sweep():
    import random

    rng = random.Random(0)
    values = [0.1, 0.3, 0.45, 0.5, 0.6, math.nan, 0.0]  # few values: many ties
    for _ in range(400):
        points = [_pt(rng.choice(values), rng.choice(values)) for _ in range(rng.randint(1, 9))]
        want = _choose_in_full(points, 0.5)
        assert choose(points, 0.5) == want
        choice = Choice(0.5)
        for i, p in enumerate(points):
            choice.offer(i, p["val"])
            assert len(choice.candidates) <= 2
            assert _choose_in_full(points[: i + 1], 0.5)[0] in choice.candidates
        assert choice.result() == want


def test_name_value_probs_equal_a_per_row_computation():
    rows = [
        {
            "question": "Where was Karimo Belvash born?",
            "subject": "Karimo Belvash",
            "value": "Tulanor",
            "answer": "Karimo Belvash was born in Tulanor.",
        },
        {
            "question": "What does Ob Lenmar write?",
            "subject": "Ob Lenmar",
            "value": "satire",
            "answer": "Ob Lenmar writes satire books.",
        },
    ]
    tok = build_bpe_tokenizer(
        ["Where was Kari born? What does Len write? was born in writes books satire Tula"] * 3,
        vocab_size=80,
        alphabet=[r["question"] + r["answer"] for r in rows],
    )
    model = build_tiny_llama(len(tok), hidden_size=16, num_layers=1, seed=3).eval()
    got = name_value_probs(model, tok, rows, batch_size=2)

    def piece_ids(text: str) -> list[int]:
        return tok(text, add_special_tokens=False)["input_ids"]

    want: dict[str, list[float]] = {"name": [], "value": []}
    for r in rows:
        q = tok(r["question"])["input_ids"]
        ids = q + piece_ids(r["answer"])
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        for kind, needle in (("name", r["subject"]), ("value", r["value"])):
            sub = piece_ids(needle)
            starts = [
                i for i in range(len(q), len(ids) - len(sub) + 1) if ids[i : i + len(sub)] == sub
            ]
            starts = starts if kind == "name" else starts[-1:]
            pos = [s + j for s in starts for j in range(len(sub))]
            assert pos
            want[kind].append(
                math.exp(float(torch.stack([logp[p - 1, ids[p]] for p in pos]).mean()))
            )
    assert got["name_prob"] == pytest.approx(sum(want["name"]) / 2, rel=1e-9)
    assert got["value_prob"] == pytest.approx(sum(want["value"]) / 2, rel=1e-9)
