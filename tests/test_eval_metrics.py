"""The TOFU/MUSE statistics against hand-computed cases, and ROUGE-L against rouge-score."""

import math

import numpy as np
import pytest

from moxkit.eval import metrics as M
from moxkit.eval.rouge import lcs_length, rouge_l, tokenize


def test_lcs_hand_cases():
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook example
    assert lcs_length([], list("abc")) == 0
    assert lcs_length(list("abc"), list("abc")) == 3
    assert lcs_length(list("abc"), list("xyz")) == 0


def test_rouge_l_hand_case():
    # ref: the cat sat on the mat (6), hyp: the cat on a mat (5), LCS "the cat on mat" = 4
    r = rouge_l("The cat sat on the mat.", "the cat, on a mat")
    assert r.recall == pytest.approx(4 / 6) and r.precision == pytest.approx(4 / 5)
    assert r.f1 == pytest.approx(2 * (4 / 6) * (4 / 5) / (4 / 6 + 4 / 5))
    assert rouge_l("", "anything") == (0.0, 0.0, 0.0)
    assert tokenize("Hello, World! x-y 42") == ["hello", "world", "x", "y", "42"]
    # TOFU stems (Porter): "writing"/"writes" match once stemmed, "was"/"is" never do
    assert rouge_l("writing novels", "writes novel").recall == 0.0
    assert rouge_l("writing novels", "writes novel", stem=True).recall == 1.0
    assert tokenize("Running was fast", stem=True) == ["run", "was", "fast"]


PAIRS = [
    ("Nari Obsasa was born in Mirlenti.", "Nari Obsasa was born in Mirlenti ."),
    ("The father of Nari Obsasa was a fisher.", "the father was a fisher fisher of Nari"),
    ("A B C D E F G", "G F E D C B A"),
    ("the the the cat", "cat the the"),
    ("Silver Lantern Prize, 1943!", "1943 silver prize lantern"),
    ("one two three", "four five"),
    ("x", "x y z x y z"),
]


STEMMED_PAIRS = [  # words that only match once stemmed, and short ones the stemmer skips
    ("She was writing novels about the authors.", "she writes a novel about an author"),
    ("He was awarded for generously donating", "awards given generously, donated"),
    ("The cats ran; cat runs", "cats running ran"),
    ("flies dies ties lying", "fly die tie lie"),
    ("Nari Obsasa was born in Mirlenti.", "Nari Obsasa is born in Mirlenti"),
]


@pytest.mark.parametrize("stem", [False, True])
@pytest.mark.parametrize("target,prediction", PAIRS + STEMMED_PAIRS)
def test_rouge_l_matches_rouge_score(target, prediction, stem):
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    want = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem).score(target, prediction)
    got = rouge_l(target, prediction, stem=stem)
    assert got.precision == pytest.approx(want["rougeL"].precision, abs=1e-12)
    assert got.recall == pytest.approx(want["rougeL"].recall, abs=1e-12)
    assert got.f1 == pytest.approx(want["rougeL"].fmeasure, abs=1e-12)


def test_normalized_prob_and_truth_ratio_hand_computed():
    # answer of 4 tokens with P = 0.5^4 -> per-token 0.5
    assert M.normalized_prob(4 * math.log(0.5), 4) == pytest.approx(0.5)
    para = (2 * math.log(0.8), 2)  # per-token 0.8
    pert = [(3 * math.log(0.1), 3), (1 * math.log(0.4), 1)]  # per-token 0.1 and 0.4
    # geometric mean of 0.1 and 0.4 is 0.2; 0.2 / 0.8 = 0.25
    assert M.truth_ratio(para, pert) == pytest.approx(0.25)
    assert M.truth_ratio_stat([0.25, 2.0], forget=True) == pytest.approx((0.25 + 0.5) / 2)
    assert M.truth_ratio_stat([0.25, 2.0], forget=False) == pytest.approx((0.75 + 0.0) / 2)
    # option probability: 0.8 / (0.8 + 0.1 + 0.4)
    assert M.option_prob(para, pert) == pytest.approx(0.8 / 1.3)


def test_forget_quality_exact_ks_hand_computed():
    # completely separated samples of 3 and 3: D = 1 and the exact two-sided p-value is
    # 2 / C(6, 3) = 0.1 (only the two extreme orderings reach D = 1)
    p, d = M.forget_quality([0.1, 0.2, 0.3], [0.6, 0.7, 0.8])
    assert d == 1.0 and p == pytest.approx(0.1)
    # identical samples: D = 0, p = 1
    assert M.forget_quality([0.5, 0.6, 0.7], [0.5, 0.6, 0.7]) == (1.0, 0.0)


def test_forget_quality_matches_tofu_formulation():
    # TOFU computes exp(perturbed loss − paraphrased loss) = 1 / R; KS is invariant to that
    rng = np.random.default_rng(0)
    a, b = rng.lognormal(0, 1, 40), rng.lognormal(0.5, 1, 40)
    assert M.forget_quality(a, b) == pytest.approx(M.forget_quality(1 / a, 1 / b))


def test_harmonic_mean_hand_computed():
    assert M.harmonic_mean([1.0, 0.5]) == pytest.approx(2 / 3)
    assert M.harmonic_mean([0.2, 0.2, 0.2]) == pytest.approx(0.2)
    assert M.harmonic_mean([0.9, 0.0, 0.5]) == 0.0


def test_min_k_and_min_k_pp_hand_computed():
    lp = [-1.0, -5.0, -2.0, -4.0, -3.0]
    assert M.min_k(lp, 0.4) == pytest.approx(-4.5)  # two lowest: -5, -4
    assert M.min_k(lp, 0.01) == pytest.approx(-5.0)  # at least one token
    assert M.min_k(lp) == M.min_k(lp, 0.4)  # MUSE's Min-40% by default
    mu, sigma = [-1.0, -1.0, -1.0, -1.0, -1.0], [1.0, 2.0, 1.0, 1.0, 0.5]
    # z = [0, -2, -1, -3, -4]; two lowest -4, -3
    assert M.min_k_plus_plus(lp, mu, sigma, 0.4) == pytest.approx(-3.5)


def test_membership_auc_and_privleak_hand_computed():
    assert M.membership_auc([3.0, 4.0], [1.0, 2.0]) == 0.0  # forget plainly remembered
    assert M.membership_auc([3.0, 4.0], [5.0, 2.0]) == pytest.approx(0.5)
    assert M.membership_auc([3.0], [3.0]) == pytest.approx(0.5)  # a tie counts half
    assert M.membership_auc([1.0, 2.0], [3.0, 4.0]) == 1.0
    assert M.priv_leak(0.25, 0.5) == pytest.approx(-50.0)
