"""ROUGE-L as the benchmarks compute it (rouge-score's conventions), with or without stemming.

Tokenisation is rouge-score's: lower-case, every run of characters outside [a-z0-9] separates
tokens, and with stemming each token longer than three characters goes through NLTK's Porter
stemmer (the one rouge-score uses). TOFU scores answers with `use_stemmer=True`; MUSE's KnowMem
and VerbMem with `use_stemmer=False`. The LCS is written here; rouge-score is the test oracle.
"""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

_SEPARATORS = re.compile(r"[^a-z0-9]+")


class RougeL(NamedTuple):
    precision: float
    recall: float
    f1: float


@functools.cache
def _stem_word():
    from nltk.stem.porter import PorterStemmer  # NLTK_EXTENSIONS mode, rouge-score's default

    return functools.lru_cache(maxsize=1 << 16)(PorterStemmer().stem)


def tokenize(text: str, stem: bool = False) -> list[str]:
    """rouge-score's tokens; `stem` = its use_stemmer (only tokens of 4+ characters)."""
    tokens = [t for t in _SEPARATORS.split(text.lower()) if t]
    if stem:
        stemmer = _stem_word()
        tokens = [stemmer(t) if len(t) > 3 else t for t in tokens]
    return [t for t in tokens if t]


def lcs_length(a: list[str], b: list[str]) -> int:
    """Length of the longest common subsequence, one row of the DP table at a time."""
    if len(a) < len(b):
        a, b = b, a
    row = [0] * (len(b) + 1)
    for x in a:
        prev_diag = 0
        for j, y in enumerate(b, start=1):
            keep = row[j]
            row[j] = prev_diag + 1 if x == y else max(row[j], row[j - 1])
            prev_diag = keep
    return row[-1]


def rouge_l(target: str, prediction: str, stem: bool = False) -> RougeL:
    """ROUGE-L of `prediction` against the reference `target` (recall is over the target)."""
    ref, hyp = tokenize(target, stem), tokenize(prediction, stem)
    if not ref or not hyp:
        return RougeL(0.0, 0.0, 0.0)
    lcs = lcs_length(ref, hyp)
    precision, recall = lcs / len(hyp), lcs / len(ref)
    f1 = 2 * precision * recall / (precision + recall) if lcs else 0.0
    return RougeL(precision, recall, f1)
