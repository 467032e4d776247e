"""At equal forgetting, what does each method keep? Read off a study's sweeps (the JSON that
studies/unlearning_mini.py writes, tiny or --real), per pipeline, on the validation authors.

For a forgetting level x, a method's score is the highest retain answer probability among its
swept points whose forget value-token probability is at most x (the upper frontier of the
frontier plot's left panel, per pipeline instead of averaged). A method that never forgets
down to x has no score there. No choice is made on these numbers; they describe the sweeps
(moxkit.apps.study_report.matched).

    .venv/bin/python studies/matched_forgetting.py studies/results/unlearning_mini/real_tofu.json

Writes <stem>_matched.md beside the JSON and prints it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from moxkit.apps.study_report import LEVELS, write_matched


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
    return write_matched(args.record, args.levels)


if __name__ == "__main__":
    main()
