"""MOX's whole bill against the baselines', each run to the same forgetting level: `moxkit unlearn`
on SmolLM2-135M with matched forgetting (--match-rows, --match-target: MOX's α by bisection,
a baseline stops at the first step at or past the target), each method a fresh process, the
methods interleaved round by round; wall time (load, train, match, write OUT) and peak RSS.

    python benchmarks/unlearn_bill.py              # about 6 min on 2 cores
    python benchmarks/unlearn_bill.py --methods mox,ga --max-steps 4   # a smoke run

Forget, retain and match rows are facts SmolLM2 knows (known_facts.json beside the model);
the target is the reference's level on the match rows minus --drop nats. Every method gets the
same budget (--max-steps at --lr, batch 4); a baseline that does not reach the target in it is
reported as such, with its cost. The study's committed per-run timings
(studies/results/matched_facts/seeds/*.json) are summarised beside them for a cross-check.
Writes benchmarks/results/unlearn_bill.json.
"""

from __future__ import annotations

import argparse
import glob
import json
import statistics
import sys
import tempfile
from pathlib import Path

from _common import RESULTS, ROOT, load_text, result_head, write_json
from _process import measure
from _train import SMOLLM2

METHODS = {  # name: extra arguments
    "mox": ["--method", "mox"],
    "mox-momentum": ["--method", "mox", "--eta", "0.675", "--extrapolate-every", "2"],
    "ga": ["--method", "ga"],
    "graddiff": ["--method", "graddiff"],
    "npo": ["--method", "npo"],
    "simnpo": ["--method", "simnpo"],
}


def write_rows(folder: Path) -> tuple[Path, Path, Path]:
    facts = json.loads((SMOLLM2.parent / "known_facts.json").read_text())
    qa = [{"question": f["prompt"], "answer": f["answer"]} for f in facts]
    files = []
    for name, part in (("forget", qa[0:16:2]), ("retain", qa[1:17:2]), ("match", qa[0:16:2])):
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in part))
        files.append(path)
    return tuple(files)


def reference_level(model: Path, rows: Path) -> float:
    import torch

    from moxkit.hf import load_model
    from moxkit.matching import answer_logprob

    ref = load_model(model, "model")
    with torch.no_grad():
        return answer_logprob(ref.model, ref.tokenizer, rows)


def one_run(name: str, args, forget: Path, retain: Path, match: Path, target: float,
            out: Path) -> dict:  # fmt: skip
    cmd = [sys.executable, "-m", "moxkit.cli.main", "unlearn", str(SMOLLM2),
           "--forget", str(forget), "--match-rows", str(match), "--match-target", f"{target}",
           "--lr", f"{args.lr}", "--batch-size", "4", "--max-steps", str(args.max_steps),
           "--warmup-epochs", "1", "--max-length", "32", "-o", str(out), "--force", "-q",
           *METHODS[name]]  # fmt: skip
    if name != "ga":
        cmd += ["--retain", str(retain)]
    run = measure(name, cmd, cold=False, guard=2 << 30)
    result = {"method": name, "seconds": run.seconds, "peak_rss_mib": run.peak_rss / 2**20,
              "load_before": run.load_before, "returncode": run.returncode}  # fmt: skip
    log = out / "moxkit_log.jsonl"
    if run.returncode == 0 and log.is_file():
        records = [json.loads(line) for line in log.read_text().splitlines()]
        result["steps"] = max(r["step"] for r in records if "step" in r)
        matched = [r for r in records if r.get("event") == "match"]
        if matched:
            result.update(strength=matched[-1]["strength"], level=matched[-1]["level"],
                          evaluations=matched[-1]["evaluations"])  # fmt: skip
    else:
        result["error"] = run.output_tail.strip().splitlines()[-1:] or ["?"]
    print(f"{name}: {result}", file=sys.stderr)
    return result


def study_timings() -> dict:
    """Per method at lr 3e-5 (the study's higher lr), from the committed seeds: median seconds
    per run and per training step (a run's seconds include its level checks and metrics)."""
    runs = [r for f in sorted(glob.glob(str(ROOT / "studies/results/matched_facts/seeds/*.json")))
            for r in json.loads(Path(f).read_text())["runs"] if r["lr"] == 3e-5]  # fmt: skip
    out = {}
    for method in sorted({r["method"] for r in runs}):
        rs = [r for r in runs if r["method"] == method]
        steps = [len(r["path"]) if "path" in r else 40 for r in rs]
        per_step = [r["seconds"] / s for r, s in zip(rs, steps, strict=True)]
        out[method] = {"runs": len(rs), "median_seconds_per_step": statistics.median(per_step),
                       "median_seconds": statistics.median(r["seconds"] for r in rs)}  # fmt: skip
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1, help="rounds over all methods")
    parser.add_argument("--max-steps", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--drop", type=float, default=3.0, help="nats below the reference")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--stem", default="unlearn_bill")
    args = parser.parse_args()

    report = result_head("MOX's bill against the baselines", measured=("moxkit/train",))
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
        forget, retain, match = write_rows(Path(tmp))
        level = reference_level(SMOLLM2, match)
        target = level - args.drop
        report.update(model=str(SMOLLM2), forget_rows=8, retain_rows=8, match_rows=8,
                      reference_level=level, target=target, lr=args.lr, batch=4,
                      max_steps=args.max_steps, max_length=32, runs=[])  # fmt: skip
        for _ in range(args.repeats):
            for name in args.methods.split(","):
                out = Path(tmp) / f"out-{name}"
                report["runs"].append(one_run(name, args, forget, retain, match, target, out))
    summary = {}
    for name in args.methods.split(","):
        rs = [r for r in report["runs"] if r["method"] == name]
        ok = [r for r in rs if r["returncode"] == 0]
        summary[name] = {
            "reached": len(ok) == len(rs),
            "median_seconds": statistics.median(r["seconds"] for r in rs),
            "median_peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in rs),
            "steps": [r.get("steps") for r in rs],
            "strength": [r.get("strength") for r in rs],
        }
    base = summary.get("mox", {}).get("median_seconds")
    for s in summary.values():
        s["seconds_vs_mox"] = s["median_seconds"] / base if base else None
    report["summary"] = summary
    report["study_timings_lr_3e-5"] = study_timings()
    path = write_json(report, RESULTS / args.stem)
    print(f"{path} ({load_text(report['machine'])}); reference level {level:.3f}, "
          f"target {target:.3f}")  # fmt: skip
    for name, s in summary.items():
        print(f"{name:13} {'reached' if s['reached'] else 'NOT reached'}: "
              f"{s['median_seconds']:.1f} s, {s['median_peak_rss_mib']:.0f} MiB, steps "
              f"{s['steps']}, strength {s['strength']}")  # fmt: skip


if __name__ == "__main__":
    main()
