"""Reports for people (a fixed-width table) and for tools (JSON written atomically)."""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

# summary key -> column header, in the order tables show them
HEADLINE = {
    "forget_quality": "FQ↑",
    "model_utility": "MU↑",
    "forget_prob": "forget P",
    "forget_rouge_recall": "forget R-L",
    "forget_truth_ratio": "forget TR",
    "retain_prob": "retain P",
    "retain_rouge_recall": "retain R-L",
    "general_rouge_recall": "general R-L",
    "verbmem_forget": "VerbMem↓",
    "knowmem_forget": "KnowMem F↓",
    "knowmem_retain": "KnowMem R↑",
    "privleak": "PrivLeak→0",
}


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        if value != 0 and abs(value) < 1e-3:
            return f"{value:.1e}"
        return f"{value:.1f}" if abs(value) >= 100 else f"{value:.4f}"
    return str(value)


def format_table(rows: Sequence[dict], columns: dict[str, str], first: str) -> str:
    """Rows (dicts) as an aligned text table: the `first` key as a label column, then
    `columns` (key -> header) that occur in at least one row."""
    cols = [k for k in columns if any(k in r for r in rows)]
    header = [first] + [columns[k] for k in cols]
    body = [[str(r.get(first, ""))] + [_cell(r.get(k)) for k in cols] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(line, widths, strict=True)))

    return "\n".join([fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body)])


def summary_table(report: dict) -> str:
    """One model's summary as metric / value lines."""
    s = report["summary"]
    rows = [{"metric": k, "value": s[k]} for k in s]
    return format_table(rows, {"value": "value"}, "metric")


def write_json(path: str | Path, obj) -> Path:
    """Write JSON next to its destination and rename, so a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
