"""At equal forgetting, what does each method keep? Read off a study's sweeps (the JSON that
studies/unlearning_mini.py writes, tiny or --real), per pipeline, on the validation authors.

For a forgetting level x, a method's score is the highest retain answer probability among its
swept points whose forget value-token probability is at most x (the upper frontier of the
frontier plot's left panel, per pipeline instead of averaged). A method that never forgets
down to x has no score there. No choice is made on these numbers; they describe the sweeps.

    .venv/bin/python studies/matched_forgetting.py studies/results/unlearning_mini/real_tofu.json

Writes <stem>_matched.md beside the JSON and prints it.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

LEVELS = (0.60, 0.55, 0.50, 0.45, 0.40)
FORGET, KEPT = "forget_value_prob", "retain_prob"


def frontier(points: list[dict], level: float) -> float:
    """The highest validation retain P among `points` whose forget value P is at most `level`
    (NaN if none forgets that far)."""
    kept = [p["val"][KEPT] for p in points if p["val"][FORGET] <= level]
    return max(kept) if kept else math.nan


def matched(record: dict, levels=LEVELS) -> dict[str, dict[float, list[float]]]:
    """method -> level -> one score per pipeline (pipelines in the record's order; a
    pipeline's unlearning seeds pooled)."""
    out: dict[str, dict[float, list[float]]] = {}
    for res in record["results"]:
        by_method: dict[str, list[dict]] = {}
        for run in res["runs"]:
            for p in run["points"]:
                by_method.setdefault(p["method"], []).append(p)
        for method, points in by_method.items():
            for level in levels:
                out.setdefault(method, {}).setdefault(level, []).append(frontier(points, level))
    return out


def table(record: dict, levels=LEVELS) -> str:
    scores = matched(record, levels)
    anchors = [
        (r["pipeline"], r["retain_only"]["val"][FORGET], r["retain_only"]["val"][KEPT])
        for r in record["results"]
    ]
    lines = [
        "Validation authors. Each cell: the highest retain P among the method's swept points "
        "whose forget value P is at most the column's level, per pipeline "
        f"({', '.join(str(r['pipeline']) for r in record['results'])}); '-': never forgets "
        "that far. The retain-only model (the target): "
        + "; ".join(
            f"pipeline {p}: forget value P {f:.3f}, retain P {k:.3f}" for p, f, k in anchors
        )
        + ".",
        "",
        "| method | " + " | ".join(f"forget value P ≤ {x:.2f}" for x in levels) + " |",
        "|---|" + "---|" * len(levels),
    ]

    def cell(values: list[float]) -> str:
        shown = " / ".join("-" if math.isnan(v) else f"{v:.3f}" for v in values)
        if all(not math.isnan(v) for v in values) and len(values) > 1:
            shown += f" (mean {statistics.fmean(values):.3f})"
        return shown

    for method, by_level in scores.items():
        lines.append(f"| {method} | " + " | ".join(cell(by_level[x]) for x in levels) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("record", type=Path, help="a study's JSON (unlearning_mini.py's output)")
    ap.add_argument(
        "--levels",
        type=lambda text: tuple(float(x) for x in text.split(",")),
        default=LEVELS,
        help="forget value P levels, comma-separated (default: suits --real's models)",
    )
    args = ap.parse_args(argv)
    record = json.loads(args.record.read_text())
    text = table(record, args.levels)
    out = args.record.with_name(f"{args.record.stem}_matched.md")
    out.write_text(
        f"# {args.record.stem}: retain kept at equal forgetting "
        f"(studies/matched_forgetting.py {args.record.name})\n\n{text}"
    )
    print(text)
    return out


if __name__ == "__main__":
    main()
