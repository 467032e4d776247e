"""How `moxkit eval` measures, declared once (moxkit.fields): the library checks an EvalConfig
by field name and the CLI generates its options from the same fields. Torch-free, so the
commands check their arguments before any heavy import."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..fields import setting

TOFU_MAX_NEW_TOKENS = 200
TOFU_UTILITY_SETS = ("retain", "real_authors", "world_facts")
TOFU_DS_SIZE = 300
MUSE_MIN_K = 0.4
MUSE_KNOWMEM_TOKENS = 32
MUSE_VERBMEM_TOKENS = 128


@dataclass
class EvalConfig:
    """How a model is evaluated; defaults are TOFU's and MUSE's own settings."""

    batch_size: int = setting(32, "Rows per forward pass / generation batch.", minimum=1)
    max_new_tokens: int = setting(
        TOFU_MAX_NEW_TOKENS, "Longest greedy answer to a TOFU question (TOFU: 200).", minimum=1
    )
    max_items: int | None = setting(
        TOFU_DS_SIZE,
        "Evaluate the first N rows of each set but the forget QA set (TOFU's ds_size: 300).",
        minimum=1,
    )
    split: Literal["forget01", "forget05", "forget10"] | None = setting(
        None, "TOFU's released layout: the forget set to evaluate (needed when several are there)."
    )
    min_k: float = setting(
        MUSE_MIN_K,
        "Fraction of lowest-probability tokens Min-K% averages (MUSE: 0.4).",
        above=0,
        maximum=1,
    )
    mia: Literal["min_k", "min_k_pp"] = setting(
        "min_k", "Membership score for PrivLeak: Min-K% (MUSE's) or Min-K%++."
    )
    knowmem_max_new_tokens: int = setting(
        MUSE_KNOWMEM_TOKENS, "Longest KnowMem answer (MUSE: 32).", minimum=1
    )
    verbmem_max_new_tokens: int = setting(
        MUSE_VERBMEM_TOKENS,
        "Longest VerbMem continuation of a MUSE verbmem prompt (MUSE: 128).",
        minimum=1,
    )
    verbmem_prefix: float = setting(
        0.5,
        "moxkit layout: the fraction of each forget text given as the VerbMem prompt.",
        above=0,
        maximum=0.95,
    )
    chat_template: bool = setting(
        False, "Format TOFU questions with the tokenizer's chat template."
    )
    generate: bool = setting(
        True, "False: likelihood metrics only (no ROUGE, KnowMem, VerbMem, MU).", cli=False
    )
