"""Reading an evaluation directory: TOFU-style QA sets and MUSE-style text sets as JSONL.

Layout (what `moxkit data tofu-mini` writes per split): forget.jsonl (required), retain.jsonl,
general.jsonl (secondary utility sets: any of these present are used) with rows
{question, answer, paraphrased_answer, perturbed_answer: [..]}; forget_text.jsonl and
holdout_text.jsonl with rows {text} for VerbMem and PrivLeak.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import MoxError
from ..records import read_records

QA_FIELDS = ("question", "answer", "paraphrased_answer", "perturbed_answer")
SECONDARY_SETS = ("general",)


def read_jsonl(path: Path, fields: tuple[str, ...]) -> list[dict]:
    """Rows of a row file, each checked for `fields`; errors name the file and line."""
    rows = []
    for where, row in read_records(path, f"{path.stem} set"):
        if not isinstance(row, dict):
            raise MoxError(f"{path}: {where}: expected a JSON object")
        missing = [f for f in fields if f not in row]
        if missing:
            raise MoxError(f"{path}: {where}: missing field(s) {', '.join(missing)}")
        if "perturbed_answer" in fields:
            pert = row["perturbed_answer"]
            if isinstance(pert, str):
                row["perturbed_answer"] = [pert]
            elif not (isinstance(pert, list) and pert and all(isinstance(p, str) for p in pert)):
                raise MoxError(
                    f"{path}: {where}: perturbed_answer must be a string or a list of them"
                )
        rows.append(row)
    if not rows:
        raise MoxError(f"{path} has no rows")
    return rows


def subsample(rows: list, limit: int | None) -> list:
    """At most `limit` rows, evenly spaced, so a subsample still covers every subject."""
    if limit is None or len(rows) <= limit:
        return rows
    idx = np.unique(np.linspace(0, len(rows) - 1, limit).round().astype(int))
    return [rows[i] for i in idx]


def load_eval_data(data_dir: str | Path, max_items: int | None = None) -> dict[str, list[dict]]:
    """The sets present in `data_dir`, by name (forget, retain, general, forget_text,
    holdout_text). The forget set is always kept whole: forget quality needs every item."""
    d = Path(data_dir)
    if not d.is_dir():
        raise MoxError(f"--data {d}: not a directory")
    if not (d / "forget.jsonl").is_file():
        raise MoxError(f"{d / 'forget.jsonl'}: missing (an evaluation directory needs one)")
    sets: dict[str, list[dict]] = {"forget": read_jsonl(d / "forget.jsonl", QA_FIELDS)}
    for name in ("retain", *SECONDARY_SETS):
        if (d / f"{name}.jsonl").is_file():
            sets[name] = subsample(read_jsonl(d / f"{name}.jsonl", QA_FIELDS), max_items)
    for name in ("forget_text", "holdout_text"):
        if (d / f"{name}.jsonl").is_file():
            sets[name] = subsample(read_jsonl(d / f"{name}.jsonl", ("text",)), max_items)
    return sets
