"""Reports for people (a fixed-width table) and for tools (JSON written atomically)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from ..atomic import staged_file

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


def format_table(
    rows: Sequence[dict], columns: dict[str, str], first: str, notes: dict[str, str] | None = None
) -> str:
    """Rows (dicts) as an aligned text table: the `first` key as a label column, then
    `columns` (key -> header) that occur in at least one row. A column with a note (where the
    number departs from the benchmark's definition; see a report's "notes") gets a * and the
    note below the table."""
    cols = [k for k in columns if any(k in r for r in rows)]
    noted = [k for k in cols if notes and k in notes]
    header = [first] + [columns[k] + ("*" if k in noted else "") for k in cols]
    body = [[str(r.get(first, ""))] + [_cell(r.get(k)) for k in cols] for r in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

    def fmt(line: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(line, widths, strict=True))
        )

    lines = [fmt(header), fmt(["-" * w for w in widths]), *map(fmt, body)]
    lines += [f"* {columns[k]}: {notes[k]}" for k in noted]
    return "\n".join(lines)


def summary_table(report: dict) -> str:
    """One model's summary as metric / value lines, each departure from the benchmark's
    definition noted beside its number, then the files the numbers come from."""
    s, notes = report["summary"], report.get("notes", {})
    table = format_table([{"metric": k, "value": s[k]} for k in s], {"value": "value"}, "metric")
    lines = table.splitlines()
    lines[2:] = [
        line + (f"  ({notes[k]})" if k in notes else "")
        for line, k in zip(lines[2:], s, strict=True)
    ]
    layout = report.get("layout")
    if layout:
        lines.append(f"data: {report.get('data')} ({layout} layout)")
    lines += [f"  read {f}" for f in report.get("files", [])]
    return "\n".join(lines)


def write_json(path: str | Path, obj, *, force: bool) -> Path:
    """Write JSON through a staged file (moxkit.atomic): a reader never sees half a report,
    an interrupted run leaves nothing, and an existing file is replaced only with `force`.
    Check `path` against the inputs with check_output before the work that makes `obj`."""
    with staged_file(path, force=force) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1, ensure_ascii=False)
            f.write("\n")
    return Path(path)
