"""ROUGE-L, written here so that evaluation needs no extra package.

Tokenisation follows rouge-score's (lower-case, runs of non-alphanumerics are separators) so
the numbers agree with what TOFU and MUSE report; there is no stemming: tofu-mini's vocabulary
is made up, and a Porter stemmer would only conflate its invented words arbitrarily.
"""

from __future__ import annotations

import re
from typing import NamedTuple

_SEPARATORS = re.compile(r"[^a-z0-9]+")


class RougeL(NamedTuple):
    precision: float
    recall: float
    f1: float


def tokenize(text: str) -> list[str]:
    """rouge-score's tokens without a stemmer."""
    return [t for t in _SEPARATORS.split(text.lower()) if t]


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


def rouge_l(target: str, prediction: str) -> RougeL:
    """ROUGE-L of `prediction` against the reference `target` (recall is over the target)."""
    ref, hyp = tokenize(target), tokenize(prediction)
    if not ref or not hyp:
        return RougeL(0.0, 0.0, 0.0)
    lcs = lcs_length(ref, hyp)
    precision, recall = lcs / len(hyp), lcs / len(ref)
    f1 = 2 * precision * recall / (precision + recall) if lcs else 0.0
    return RougeL(precision, recall, f1)
