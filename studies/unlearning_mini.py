"""Is MOX's unlearning as good as the paper says? A pre-registered comparison on tofu-mini.

The study is a configuration of the apps pipeline: its budgets, protocol, runs, tables and plots
are moxkit.apps.unlearning_mini (the pipeline itself: moxkit.apps.pipeline; the rule:
moxkit.apps.study). This script is its command line, writing into results/unlearning_mini/.

    .venv/bin/python studies/unlearning_mini.py            # the committed results
    .venv/bin/python studies/unlearning_mini.py --quick    # the CI form (seconds)
    .venv/bin/python studies/unlearning_mini.py --real     # on SmolLM2-135M (`make real`)
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import machine  # noqa: E402

from moxkit.apps.unlearning_mini import QUICK, REAL, Budget, run_budget  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "unlearning_mini"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--work", type=Path, default=None, help="models and cached stages")
    ap.add_argument("--quick", action="store_true", help="the CI form: tiny and fast")
    ap.add_argument(
        "--real",
        action="store_true",
        help="tofu-mini fine-tuned into SmolLM2-135M-Instruct (needs `make real`): REAL budget",
    )
    ap.add_argument(
        "--report-only",
        action="store_true",
        help="train nothing: report the runs cached under --work so far",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        default=None,
        help="worker processes (one thread each; the pipelines × seeds runs are independent): "
        "default 9, or 2 with --real, where each worker holds about 7 GB while it trains",
    )
    args = ap.parse_args(argv)
    jobs = args.jobs if args.jobs is not None else 2 if args.real else 9
    budget = QUICK if args.quick else REAL if args.real else Budget()
    prefix = ("real_tofu" if args.real else "unlearning_mini") + ("_quick" if args.quick else "")
    work = args.work or Path(f"/tmp/moxkit-{prefix.replace('_', '-')}")
    return run_budget(budget, prefix, args.out, work, jobs=jobs, report_only=args.report_only,
                      machine=machine)  # fmt: skip


if __name__ == "__main__":
    main()
