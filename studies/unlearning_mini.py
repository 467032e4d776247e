"""Is MOX's unlearning as good as the paper says? A pre-registered comparison on tofu-mini.

The study is a configuration of the apps pipeline: its budgets, protocol, runs, tables and plots
are moxkit.apps.unlearning_mini (the pipeline itself: moxkit.apps.pipeline; the rule:
moxkit.apps.study). This script runs it, writing into results/unlearning_mini/.

    .venv/bin/python studies/unlearning_mini.py            # the committed results
    .venv/bin/python studies/unlearning_mini.py --quick    # the CI form (seconds)
    .venv/bin/python studies/unlearning_mini.py --real     # on SmolLM2-135M (`make real`)
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _common import machine  # noqa: E402

from moxkit.apps.unlearning_mini import main  # noqa: E402

if __name__ == "__main__":
    main(results=Path(__file__).parent / "results" / "unlearning_mini", machine=machine)
