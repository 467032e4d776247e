"""Does gradient ascent collapse a real pretrained model while MOX does not? Unlearning facts
SmolLM2-135M-Instruct already knows (moxkit.apps.facts), every method under one budget.

Protocol (fixed before the run; moxkit.apps.fact_unlearning holds the rule):
- Model: `moxkit model smollm2-135m` (fp32). Facts: moxkit.apps.facts' candidates the model answers
  correctly (greedy), split stratified by category into forget_val, forget_test (both unlearned),
  retain (the methods' retain data), heldout_val and heldout_test (never trained on).
- Budget: the same steps, batch, warm-up and linear schedule, data order and seed for all.
  MOX: θ_mem (NLL on forget + KL to θ_ref on retain) at each MOX lr, the α grid read off it at
  a few steps. GA, GradDiff, NPO: each lr, measured after a few steps (their strength).
- Measured at every point: accuracy and mean answer log-probability per split, the NLL of a
  fixed general text; greedy chat answers to a few questions at the reference and after the
  last step.
- Operating point per method: moxkit.apps.fact_unlearning.select on validation facts only; the
  tables report test facts at it.

    .venv/bin/python studies/real_model.py                 # the committed run
    .venv/bin/python studies/real_model.py --quick         # a tiny random Llama (seconds)

Writes real_model.json (every point), real_model.md (tables) and plots into --out (runs with
--seed N into --out/seeds/); the converted model and the known-fact list are cached under --work.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "benchmarks"))  # the one harness: benchmarks/_common.py
from _common import load_text, result_head, write_json  # noqa: E402

from moxkit.apps.fact_unlearning import (  # noqa: E402
    KEEP,
    METHOD_NAMES,
    NLL_SLACK,
    StudyConfig,
    run_study,
    setting_means,
    setting_table,
)
from moxkit.apps.facts import split_facts  # noqa: E402

COLORS = {  # one colour per method in every plot
    "mox": "tab:blue",
    "ga": "tab:red",
    "graddiff": "tab:orange",
    "npo": "tab:green",
    "simnpo": "tab:purple",
}
RESULTS = ROOT / "studies" / "results" / "real_model"
SEEDS = "seeds"  # the runs with --seed N, in a subfolder of --out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/moxkit-real-model"))
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--quick", action="store_true", help="a tiny random Llama: checks the code")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--methods", default=None, help="comma-separated subset (default: all)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=0, help="fact splits and data order")
    ap.add_argument("--lr", type=float, default=None, help="the baselines' only lr")
    ap.add_argument(
        "--long",
        action="store_true",
        help="MOX and GA only, 4x the steps (does GA collapse with more training?)",
    )
    ap.add_argument(
        "--report",
        action="store_true",
        help="measure nothing: remake tables and plots from the JSON files in --out",
    )
    args = ap.parse_args()
    if args.report:
        write_report(args.out)
        return
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    log_lines: list[str] = []

    def log(msg: str) -> None:
        now = time.strftime("%H:%M:%S", time.gmtime())
        line = f"[{now} UTC, +{time.perf_counter() - t0:.0f} s] {msg}"
        log_lines.append(line)
        print(line, flush=True)

    head = result_head("unlearning known facts on a real model", packages=("torch", "transformers"))
    if args.quick:
        model, tokenizer, facts, name = _tiny()
        cfg = StudyConfig(
            sizes={
                "forget_val": 4,
                "forget_test": 4,
                "retain": 8,
                "heldout_val": 4,
                "heldout_test": 4,
            },
            steps=2,
            batch_size=4,
            eval_steps=(1, 2),
            mox_eval_steps=(2,),
            alphas=(1.0, 2.0),
            baseline_lrs=(1e-3,),
        )
    else:
        model, tokenizer, facts, name = _real(args.work, log)
        cfg = StudyConfig()
        if args.long:
            cfg.steps, cfg.eval_steps, cfg.mox_eval_steps = 24, (6, 12, 24), (24,)
            cfg.baseline_lrs, cfg.methods = (1e-4,), ("mox", "ga")  # --methods: a subset
    cfg.seed = args.seed
    if args.steps:
        cfg.steps = args.steps
    if args.methods:
        cfg.methods = tuple(args.methods.split(","))
    if args.lr:
        cfg.baseline_lrs = (args.lr,)
    splits = split_facts(facts, cfg.sizes, seed=cfg.seed)
    log(
        f"{name}: {len(facts)} known facts; splits "
        + ", ".join(f"{k} {len(v)}" for k, v in splits.items())
    )
    report = {
        **head,
        "model": name,
        "known_facts": len(facts),
        "splits": {k: [f.__dict__ for f in v] for k, v in splits.items()},
    }
    stem = args.out / ("real_model_quick" if args.quick else "real_model")
    if args.long:
        stem = stem.with_name(f"{stem.name}_long")
    if args.methods:  # an addition to a seed's study; the report merges it in
        stem = stem.with_name(f"{stem.name}_{'-'.join(cfg.methods)}")
    if args.lr:
        stem = stem.with_name(f"{stem.name}_lr{args.lr:g}")
    if args.seed:
        stem = stem.parent / SEEDS / f"{stem.name}_seed{args.seed}"

    def save(study: dict) -> None:
        report["study"], report["log"] = study, log_lines
        write_json(report, stem)
        write_tables(report, stem.with_name(stem.name + "_points.md"))
        plot(report, stem)
        stem.with_name(stem.name + "_run.log").write_text("\n".join(log_lines) + "\n")

    save(run_study(model, tokenizer, splits, cfg, log, after_run=save))
    log(f"wrote {stem}.json, _points.md, _frontier.png, _trajectories.png")
    stem.with_name(stem.name + "_run.log").write_text("\n".join(log_lines) + "\n")


def _real(work: Path, log):
    from moxkit.apps.fact_unlearning import prepare

    model, tokenizer, facts = prepare("smollm2-135m", work, log)
    return model, tokenizer, facts, "SmolLM2-135M-Instruct (moxkit model smollm2-135m)"


def _tiny():
    from moxkit.apps.fact_unlearning import tiny_stand_in

    model, tokenizer, facts = tiny_stand_in()
    return model, tokenizer, facts, "tiny random Llama (--quick: checks the code, not the method)"


# --- tables and plots, from the report alone -------------------------------------------------

SUMMARY = (
    ("forget_test_acc", "forget (test)"),
    ("retain_acc", "retain"),
    ("heldout_test_acc", "held-out (test)"),
    ("forget_test_logprob", "forget log p"),
    ("retain_logprob", "retain log p"),
    ("heldout_test_logprob", "held-out log p"),
    ("general_nll", "text NLL"),
    ("chat_ok", "chat ok"),
)


def write_report(out: Path) -> None:
    """Per-seed tables and plots, and real_model.md over all seeds, from the JSON files."""
    paths = [
        p for p in _jsons(out, "real_model*.json") if "quick" not in p.name and "long" not in p.name
    ]
    by_seed: dict[int, dict] = {}
    runs = []
    for path in paths:
        report = json.loads(path.read_text())
        runs.append(
            (
                report["study"]["config"]["seed"],
                report["command"],
                report["date_utc"],
                report["study"]["seconds"],
                load_text(report["machine"]),
            )
        )
        stem = path.with_suffix("")
        write_tables(report, stem.with_name(stem.name + "_points.md"))
        plot(report, stem)
        seed = report["study"]["config"]["seed"]
        if seed not in by_seed:
            by_seed[seed] = report
        else:  # methods run apart for the same seed: the same reference, splits and budget
            study, extra = by_seed[seed]["study"], report["study"]
            study["points"] += extra["points"][1:]
            study["chosen"].update(extra["chosen"])
            study["runs"] += extra["runs"]
    reports = [by_seed[k] for k in sorted(by_seed)]
    methods = [m for m in METHOD_NAMES if m in reports[0]["study"]["chosen"]]
    lines = [
        "# Unlearning facts a real pretrained model knows (SmolLM2-135M-Instruct)",
        "",
        "Protocol " + (__doc__ or "").split("Protocol ", 1)[1].split("    .venv")[0].strip(),
        "",
        "## Chosen operating points, test facts (one row per seed, then the mean)",
        "",
        "| method | seed | strength | " + " | ".join(t for _, t in SUMMARY) + " |",
        "|---|---|---|" + "---|" * len(SUMMARY),
    ]
    for method in ["reference", *methods]:
        chosen = []
        for r in reports:
            study = r["study"]
            if method != "reference" and method not in study["chosen"]:
                continue  # not run for this seed
            p = study["points"][0] if method == "reference" else study["chosen"][method]
            chosen.append(p)
            cells = (
                " | ".join(
                    _fmt(p["metrics"].get(k), 3 if k == "general_nll" else 2) for k, _ in SUMMARY
                )
                if p
                else "no point kept utility" + " |" * (len(SUMMARY) - 1)
            )
            lines.append(
                f"| {METHOD_NAMES[method]} | {r['study']['config']['seed']} | "
                f"{_strength(p) if p else ''} | {cells} |"
            )
        if len(chosen) > 1 and all(chosen):
            means = [_mean([p["metrics"].get(k) for p in chosen]) for k, _ in SUMMARY]
            lines.append(
                f"| **{METHOD_NAMES[method]}** | mean | | "
                + " | ".join(
                    _fmt(v, 3 if k == "general_nll" else 2)
                    for v, (k, _) in zip(means, SUMMARY, strict=True)
                )
                + " |"
            )
    lines += [
        "",
        "Every setting, mean over seeds (forget and held-out pool validation and test facts here):",
        "",
        "![every setting](real_model_mean_frontier.png)",
        "",
        *setting_table(reports),
        "",
        "Trajectories over steps, seed 0: ![trajectories](real_model_trajectories.png)",
    ]
    lines += [
        "",
        "## Runs",
        "",
        "| seed | command | started (UTC) | minutes | load average |",
        "|---|---|---|---|---|",
    ]
    for seed, command, date, seconds, load in runs:
        lines.append(f"| {seed} | `{command}` | {date} | {seconds / 60:.0f} | {load} |")
    lines += [
        "",
        "Every point of each seed, the training time of each run and the chat answers: "
        + ", ".join(f"[{p.stem}_points.md]({_rel(p, out)}_points.md)" for p in paths)
        + ".",
        "Plots: "
        + ", ".join(f"{_rel(p, out)}_frontier.png, {_rel(p, out)}_trajectories.png" for p in paths)
        + ".",
        "",
    ]
    longs = _jsons(out, "real_model_long*.json")
    if longs:
        reports_long = [json.loads(p.read_text()) for p in longs]
        report = reports_long[0]
        for extra in reports_long[1:]:
            report["study"]["points"] += extra["study"]["points"][1:]
            report["study"]["runs"] += extra["study"]["runs"]
        write_tables(report, out / "real_model_long_points.md")
        plot(report, out / "real_model_long")
        lines += [
            "## A longer budget: MOX and GA, 24 steps (seed 0)",
            "",
            "; ".join(
                f"`{r['command']}`, {r['date_utc']} UTC, {r['study']['seconds'] / 60:.0f} min"
                for r in reports_long
            )
            + "; every point in [real_model_long_points.md](real_model_long_points.md).",
            "",
            "| method | strength | " + " | ".join(t for _, t in SUMMARY) + " |",
            "|---|---|" + "---|" * len(SUMMARY),
        ]
        for p in report["study"]["points"]:
            lines.append(
                f"| {METHOD_NAMES[p['method']]} | {_strength(p)} | "
                + " | ".join(
                    _fmt(p["metrics"].get(k), 3 if k == "general_nll" else 2) for k, _ in SUMMARY
                )
                + " |"
            )
        lines += ["", "![24 steps](real_model_long_trajectories.png)", ""]
    (out / "real_model.md").write_text("\n".join(lines) + "\n")
    plot_means(reports, out / "real_model_mean_frontier.png")


def _jsons(out: Path, pattern: str) -> list[Path]:
    """The run files in --out and its seeds/ folder, in the order of their names."""
    return sorted([*out.glob(pattern), *(out / SEEDS).glob(pattern)], key=lambda p: p.name)


def _rel(path: Path, out: Path) -> str:
    """A run file's stem as the report in --out links it (seeds/real_model_seed1)."""
    return path.with_suffix("").relative_to(out).as_posix()


def _mean(values: list[float | None]) -> float | None:
    """The mean, or None when any value is missing (e.g. chat, measured at the last step only)."""
    return None if any(v is None for v in values) else sum(values) / len(values)


def plot_means(reports: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = setting_means(reports)
    colors = {**COLORS, "reference": "k"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3))
    for (method, lr, alpha, step), m in sorted(means.items(), key=lambda kv: kv[0][0]):
        label = METHOD_NAMES[method]
        kw = {
            "c": colors[method],
            "alpha": 0.8,
            "s": 90 if method == "reference" else 30,
            "marker": "*" if method == "reference" else "o",
        }
        axes[0].scatter(m["heldout"], m["forget"], label=label, **kw)
        axes[1].scatter(m["nll"], m["forget"], label=label, **kw)
        text = f"α{alpha:g}/{step}" if alpha is not None else (f"{lr:.0e}/{step}" if lr else "")
        if method in ("mox", "ga"):
            axes[0].annotate(text, (m["heldout"], m["forget"]), fontsize=6, alpha=0.7)
            axes[1].annotate(text, (m["nll"], m["forget"]), fontsize=6, alpha=0.7)
    handles, names = axes[0].get_legend_handles_labels()
    unique = dict(zip(names, handles, strict=True))
    axes[0].legend(unique.values(), unique.keys(), fontsize=8)
    axes[0].set_xlabel("held-out facts accuracy (never trained on; higher = kept)")
    axes[1].set_xlabel("general-text NLL (lower = more fluent)")
    for ax in axes:
        ax.set_ylabel("forget facts accuracy (lower = forgotten)")
    n = len(reports)
    fig.suptitle(
        f"SmolLM2-135M-Instruct, unlearning facts it knows: every setting, mean of {n} "
        f"seed{'s' if n > 1 else ''} (MOX labelled α/step, GA lr/step)",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _fmt(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _strength(p: dict) -> str:
    if p["method"] == "reference":
        return ""
    if p["alpha"] is not None:
        return f"α={p['alpha']:g}, lr={p['lr']:g}, step {p['step']}"
    return f"lr={p['lr']:g}, step {p['step']}"


def write_tables(report: dict, path: Path) -> None:
    study = report["study"]
    ref = study["points"][0]["metrics"]
    cols = (
        "forget_test_acc",
        "forget_val_acc",
        "retain_acc",
        "heldout_test_acc",
        "heldout_val_acc",
        "general_nll",
        "chat_ok",
    )
    lines = [
        f"Model: {report['model']}; {report['known_facts']} known facts; "
        f"{report['study']['seconds'] / 60:.0f} min; {load_text(report['machine'])}.",
        "",
        "## Chosen operating points (test facts; chosen on validation facts)",
        "",
        "| method | strength | " + " | ".join(cols) + " |",
        "|---|---|" + "---|" * len(cols),
    ]
    rows = [("reference", study["points"][0])] + [(m, p) for m, p in study["chosen"].items()]
    for method, p in rows:
        if p is None:
            lines.append(
                f"| {METHOD_NAMES.get(method, method)} | no point kept utility |" + " |" * len(cols)
            )
            continue
        lines.append(
            f"| {METHOD_NAMES.get(method, method)} | {_strength(p)} | "
            + " | ".join(_fmt(p["metrics"].get(c), 3 if c == "general_nll" else 2) for c in cols)
            + " |"
        )
    lines += [
        "",
        f"Rule: retain and heldout_val accuracy ≥ {KEEP} × the reference's "
        f"({ref['retain_acc']:.2f}, {ref['heldout_val_acc']:.2f}), general NLL ≤ "
        f"reference + {NLL_SLACK} ({ref['general_nll']:.3f}); lowest forget_val accuracy.",
        "",
        "## Every point",
        "",
        "| method | strength | " + " | ".join(cols) + " | forget_test_logprob |",
        "|---|---|" + "---|" * (len(cols) + 1),
    ]
    for p in study["points"]:
        lines.append(
            f"| {METHOD_NAMES.get(p['method'], p['method'])} | {_strength(p)} | "
            + " | ".join(_fmt(p["metrics"].get(c), 3 if c == "general_nll" else 2) for c in cols)
            + f" | {_fmt(p['metrics']['forget_test_logprob'])} |"
        )
    lines += [
        "",
        "## Runs (wall time, shared 2-core CPU)",
        "",
        "| method | lr | steps | total s | training s |",
        "|---|---|---|---|---|",
    ]
    for r in study["runs"]:
        lines.append(
            f"| {METHOD_NAMES[r['method']]} | {r['lr']:g} | {r['steps']} | "
            f"{r['seconds']} | {r['train_seconds']} |"
        )
    chat_rows = [("reference", study["points"][0])] + [
        (m, p) for m, p in study["chosen"].items() if p
    ]
    if any(p["chat"] for _, p in chat_rows):
        lines += ["", "## Chat answers at the chosen points", ""]
        for method, p in chat_rows:
            lines.append(f"**{METHOD_NAMES[method]}** ({_strength(p) or 'θ_ref'}):")
            lines += [f"- {a['question']} → {a['answer']!r}" for a in p["chat"]]
            lines.append("")
    path.write_text("\n".join(lines) + "\n")


def plot(report: dict, stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    study = report["study"]
    points = study["points"]
    ref = points[0]["metrics"]
    colors = COLORS
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, color in colors.items():
        ps = [p for p in points if p["method"] == method]
        if ps:
            ax.scatter(
                [p["metrics"]["heldout_test_acc"] for p in ps],
                [p["metrics"]["forget_test_acc"] for p in ps],
                c=color,
                label=METHOD_NAMES[method],
                alpha=0.7,
            )
    for method, p in study["chosen"].items():
        if p:
            ax.scatter(
                p["metrics"]["heldout_test_acc"],
                p["metrics"]["forget_test_acc"],
                s=160,
                facecolors="none",
                edgecolors=colors[method],
                linewidths=2,
            )
    ax.scatter(
        ref["heldout_test_acc"], ref["forget_test_acc"], marker="*", s=200, c="k", label="reference"
    )
    ax.set_xlabel("held-out facts accuracy (kept; higher is better)")
    ax.set_ylabel("forget facts accuracy (lower is better)")
    ax.set_title("Unlearning known facts: every point, chosen ones circled", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(stem.with_name(stem.name + "_frontier.png"), dpi=120)
    plt.close(fig)

    metrics = (
        ("forget_test_acc", "forget accuracy"),
        ("retain_acc", "retain accuracy"),
        ("heldout_test_acc", "held-out accuracy"),
        ("general_nll", "general-text NLL"),
    )
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for ax, (key, title) in zip(axes, metrics, strict=True):
        series: dict[tuple, list] = {}
        for p in points[1:]:
            label = (p["method"], p["lr"], p["alpha"])
            series.setdefault(label, []).append((p["step"], p["metrics"][key]))
        for (method, lr, alpha), xy in series.items():
            xy = [(0, ref[key])] + sorted(xy)
            style = "-" if method != "mox" else "--"
            name = f"MOX α={alpha:g}" if method == "mox" else f"{METHOD_NAMES[method]} lr={lr:g}"
            ax.plot(
                *zip(*xy, strict=True),
                style,
                marker="o",
                ms=3,
                color=colors[method],
                alpha=0.35 + 0.65 * _shade(method, lr, alpha, study["config"]),
                label=name,
            )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("training step")
    axes[-1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(stem.with_name(stem.name + "_trajectories.png"), dpi=110)
    plt.close(fig)


def _shade(method: str, lr: float, alpha: float | None, cfg: dict) -> float:
    """Darker for stronger settings, so the lines of one method can be told apart."""
    grid = cfg["alphas"] if method == "mox" else cfg["baseline_lrs"]
    value = alpha if method == "mox" else lr
    return (grid.index(value) + 1) / len(grid) if value in grid else 1.0


if __name__ == "__main__":
    main()
