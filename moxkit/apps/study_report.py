"""The tofu-mini study's statistics, tables and plots (moxkit.apps.unlearning_mini): the rule's
choices per method and run, the mean over pipelines with a 95 % t-interval over the pipeline
means (the pipelines are the independent units), paired differences MOX − method, and plots of
the sweeps on the validation authors."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import TYPE_CHECKING

from .study import KEEP, rule_utility

if TYPE_CHECKING:
    from .unlearning_mini import Budget

# what the tables show, in order (test set, at the chosen points)
COLUMNS = (
    "forget_quality",
    "ks_statistic",
    "model_utility",
    "forget_prob",
    "forget_value_prob",
    "forget_name_prob",
    "forget_rouge_recall",
    "forget_truth_ratio",
    "retain_prob",
    "retain_value_prob",
    "retain_name_prob",
    "retain_rouge_recall",
    "retain_truth_ratio",
    "general_prob",
    "general_rouge_recall",
    "general_truth_ratio",
    "verbmem_forget",
)


def chosen_points(results: list[dict]) -> dict[str, list[dict]]:
    """method -> the chosen point of every run (pipeline-major), with its knobs and its full
    validation and test measurements."""
    out: dict[str, list[dict]] = {}
    for res in results:
        for run in res["runs"]:
            for method, c in run["chosen"].items():
                knobs = {
                    k: v for k, v in run["points"][c["point"]].items() if k not in ("val", "test")
                }
                out.setdefault(method, []).append(
                    {**knobs, **c, "pipeline": run["pipeline"], "seed": run["seed"]}
                )
    return out


def t_interval(values_by_pipeline: dict[int, list[float]]) -> tuple[float, float, float]:
    """(mean, low, high): the mean over pipelines of per-pipeline means and its 95 %
    t-interval (pipelines are the independent units; seeds within one are not)."""
    from scipy import stats

    means = [
        statistics.fmean(v)
        for v in values_by_pipeline.values()
        if v and all(math.isfinite(x) for x in v)
    ]
    if not means:
        return math.nan, math.nan, math.nan
    m = statistics.fmean(means)
    if len(means) < 2:
        return m, math.nan, math.nan
    half = stats.t.ppf(0.975, len(means) - 1) * statistics.stdev(means) / math.sqrt(len(means))
    return m, m - half, m + half


def _by_pipeline(points: list[dict], key: str, split: str = "test") -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for p in points:
        v = p[split].get(key)
        out.setdefault(p["pipeline"], []).append(math.nan if v is None else v)
    return out


def _fmt(m: float, lo: float = math.nan, hi: float = math.nan) -> str:
    if math.isnan(m):
        return "-"
    digits = ".1e" if m != 0 and abs(m) < 1e-2 else ".3f"
    if math.isnan(lo):
        return format(m, digits)
    return f"{m:{digits}} [{lo:{digits}}, {hi:{digits}}]"


def _knob(p: dict) -> str:
    if "epoch" in p:
        return f"lr {p['lr']:g} ep {p['epoch']}"
    return (f"η {p['eta']:g} " if "eta" in p else "") + f"α {p['alpha']:g}"


def summarise(results: list[dict], budget: Budget) -> dict:
    """Everything the tables and the results page quote."""
    chosen = chosen_points(results)
    summary: dict = {"methods": {}, "paired": {}, "anchors": {}}
    for label, key in (
        ("reference (before)", "reference"),
        ("retain-only (target)", "retain_only"),
    ):
        summary["anchors"][label] = {
            c: t_interval({r["pipeline"]: [r[key]["test"].get(c, math.nan)] for r in results})
            for c in COLUMNS
        }
    for method, pts in chosen.items():
        summary["methods"][method] = {
            "n": len(pts),
            "qualified": sum(p["qualified"] for p in pts),
            "knobs": [_knob(p) for p in pts],
            "test": {c: t_interval(_by_pipeline(pts, c)) for c in COLUMNS},
            "val": {
                c: t_interval(_by_pipeline(pts, c, "val"))
                for c in ("forget_quality", "model_utility", "retain_prob", "general_prob")
            },
        }
    mox = {(p["pipeline"], p["seed"]): p for p in chosen.get("mox", [])}
    for method, pts in chosen.items():
        if method == "mox" or not mox:
            continue
        diffs = {}
        for c in ("forget_quality", "model_utility", "forget_value_prob", "retain_prob"):
            by: dict[int, list[float]] = {}
            for p in pts:
                a, b = mox[(p["pipeline"], p["seed"])]["test"].get(c), p["test"].get(c)
                by.setdefault(p["pipeline"], []).append(
                    a - b if a is not None and b is not None else math.nan
                )
            diffs[c] = t_interval(by)
        summary["paired"][method] = diffs
    return summary


HEAD = {
    "forget_quality": "FQ",
    "ks_statistic": "KS D",
    "model_utility": "MU",
    "forget_prob": "forget P",
    "forget_value_prob": "forget value P",
    "forget_name_prob": "forget name P",
    "forget_rouge_recall": "forget R-L",
    "forget_truth_ratio": "forget TR",
    "retain_prob": "retain P",
    "retain_value_prob": "retain value P",
    "retain_name_prob": "retain name P",
    "retain_rouge_recall": "retain R-L",
    "retain_truth_ratio": "retain TR",
    "general_prob": "general P",
    "general_rouge_recall": "general R-L",
    "general_truth_ratio": "general TR",
    "verbmem_forget": "VerbMem",
}
ORDER = ("mox", "mox-momentum", "mox-targeted", "task-vector", "ga", "graddiff", "npo", "simnpo")


def _ordered(methods) -> list[str]:
    return sorted(
        methods, key=lambda m: (ORDER.index(m.split(" ")[0]) if m.split(" ")[0] in ORDER else 99, m)
    )


def tables(summary: dict, results: list[dict], budget: Budget) -> str:
    n_runs = sum(len(r["runs"]) for r in results)
    lines = [
        f"Test authors, at the operating point the rule chose on the validation authors; "
        f"mean over {n_runs} runs ({len(results)} pipelines × up to {len(budget.seeds)} "
        "unlearning seeds), [95 % t-interval over the pipeline means].",
        "",
    ]
    groups = (("forgetting", COLUMNS[:8]), ("utility (MU's parts) and collateral", COLUMNS[8:]))
    for title, cols in groups:
        lines += [
            f"### {title}",
            "",
            "| model | " + " | ".join(HEAD[c] for c in cols) + " |",
            "|" + "---|" * (len(cols) + 1),
        ]
        for label, s in summary["anchors"].items():
            lines.append(f"| {label} | " + " | ".join(_fmt(*s[c]) for c in cols) + " |")
        for method in _ordered(summary["methods"]):
            s = summary["methods"][method]
            lines.append(f"| {method} | " + " | ".join(_fmt(*s["test"][c]) for c in cols) + " |")
        lines.append("")
    lines += [
        "### the rule's choices",
        "",
        f"| method | runs keeping U ≥ {KEEP:g} × reference's (val) | val FQ | val retain P "
        "| val general P | val MU | chosen operating points (pipeline-major) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in _ordered(summary["methods"]):
        s = summary["methods"][method]
        lines.append(
            f"| {method} | {s['qualified']}/{s['n']} | "
            + " | ".join(
                _fmt(*s["val"][c])
                for c in ("forget_quality", "retain_prob", "general_prob", "model_utility")
            )
            + f" | {', '.join(s['knobs'])} |"
        )
    lines += [
        "",
        f"### paired differences, MOX − method (same pipeline and seed; n = {n_runs})",
        "",
        "| method | Δ FQ | Δ MU | Δ forget value P | Δ retain P |",
        "|---|---|---|---|---|",
    ]
    for method in _ordered(summary["paired"]):
        d = summary["paired"][method]
        lines.append(
            f"| {method} | "
            + " | ".join(
                _fmt(*d[c])
                for c in ("forget_quality", "model_utility", "forget_value_prob", "retain_prob")
            )
            + " |"
        )
    lines += [
        "",
        "### the models",
        "",
        "| pipeline | parameters | train s | run s | reference FQ val / test | "
        "reference U val | reference MU val |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['pipeline']} | {r['parameters']:,} | {r['train_seconds']} | "
            f"{[run['seconds'] for run in r['runs']]} | "
            f"{_fmt(r['reference']['val']['forget_quality'])} / "
            f"{_fmt(r['reference']['test']['forget_quality'])} | "
            f"{r['reference_utility']:.3f} | "
            f"{r['reference']['val']['model_utility']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def _curve(results: list[dict], split: str, key: str, **match) -> tuple[list, list]:
    """x (α or epoch) and the mean of `key` over runs along one method's path (the sweeps
    are measured on the validation sets only)."""
    acc: dict[float, list[float]] = {}
    for res in results:
        for run in res["runs"]:
            for p in run["points"]:
                if all(p.get(k) == v for k, v in match.items()):
                    x = p["epoch"] if "epoch" in p else p["alpha"]
                    v = _value(p[split], key)
                    if v is not None and math.isfinite(v):
                        acc.setdefault(x, []).append(v)
    xs = sorted(acc)
    return xs, [statistics.fmean(acc[x]) for x in xs]


def _value(summary: dict, key: str) -> float | None:
    return rule_utility(summary) if key == "utility" else summary.get(key)


def plots(results: list[dict], summary: dict, budget: Budget, out: Path, prefix: str) -> list[Path]:
    """α curves, the frontier and the trajectories: the sweeps, on the validation sets (where
    the rule looked); the rule's choices marked by their validation means."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def anchor(key: str, which: str) -> float:
        return statistics.fmean(_value(r[which]["val"], key) for r in results)

    def chosen_mean(method: str, key: str) -> float:
        return statistics.fmean(_value(p["val"], key) for p in chosen_points(results)[method])

    written = []
    # 1. α curves of MOX
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for ax, keys in zip(
        axes,
        (
            ("forget_quality",),
            ("utility",),
            ("forget_value_prob", "forget_name_prob", "retain_prob"),
        ),
        strict=True,
    ):
        for ki, key in enumerate(keys):
            xs, ys = _curve(results, "val", key, method="mox")
            ax.plot(xs, ys, "-", marker=".", color=f"C{ki}", label=key)
            ax.axhline(anchor(key, "retain_only"), color=f"C{ki}", ls=":", lw=1)
            ax.axhline(anchor(key, "reference"), color=f"C{ki}", ls="--", lw=0.8)
        ax.set_xlabel("α")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_yscale("log")
    axes[1].axhline(KEEP * anchor("utility", "reference"), color="k", ls="-.", lw=1)
    picked = sorted(p["alpha"] for p in chosen_points(results)["mox"])
    axes[0].set_title(f"forget quality; the rule's α per run: {picked}", fontsize=9)
    axes[1].set_title(f"U (rule's utility); dash-dot: the floor, {KEEP:g} × reference", fontsize=9)
    axes[2].set_title("per-token probabilities", fontsize=9)
    fig.suptitle(
        f"MOX, α swept from one θ_mem per run, validation authors (mean of "
        f"{len(results)} pipelines × {len(budget.seeds)} seeds; dotted: retain-only "
        "model, dashed: reference)",
        fontsize=10,
    )
    fig.tight_layout()
    written.append(out / f"{prefix}_alpha.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # 2. frontier: each method's path over its strength; chosen points marked
    fig, axes = plt.subplots(1, 2, figsize=(15, 6))
    paths = [("mox", {"method": "mox"}), ("task-vector", {"method": "task-vector"})]
    paths += [(f"mox-momentum η={e:g}", {"method": "mox-momentum", "eta": e}) for e in budget.etas]
    paths += [("mox-targeted", {"method": "mox-targeted"})]
    paths += [
        (f"{m} lr {lr:g}", {"method": m, "lr": lr}) for m in budget.baselines for lr in budget.lrs
    ]
    colors: dict[str, str] = {}
    lr_style = dict(zip(budget.lrs, (":", "--", "-."), strict=False))
    for ax, (xk, yk) in zip(
        axes, (("forget_value_prob", "retain_prob"), ("utility", "forget_quality")), strict=True
    ):
        for label, match in paths:
            _, x = _curve(results, "val", xk, **match)
            _, y = _curve(results, "val", yk, **match)
            if not x or len(x) != len(y):
                continue
            base = label.split(" ")[0]
            color = colors.setdefault(base, f"C{len(colors) % 10}")
            ax.plot(
                x,
                y,
                lr_style.get(match.get("lr"), "-") if "lr" in match else "-",
                marker=".",
                ms=4,
                color=color,
                label=label,
                lw=1.2,
            )
        for method in _ordered(summary["methods"]):
            if " " not in method:
                ax.scatter(
                    [chosen_mean(method, xk)],
                    [chosen_mean(method, yk)],
                    marker="D",
                    s=60,
                    edgecolor="k",
                    zorder=5,
                    color=colors.get(method, "w"),
                )
        ax.scatter(
            [anchor(xk, "retain_only")],
            [anchor(yk, "retain_only")],
            marker="*",
            s=250,
            color="gold",
            edgecolor="k",
            zorder=6,
            label="retain-only (target)",
        )
        ax.scatter(
            [anchor(xk, "reference")],
            [anchor(yk, "reference")],
            marker="s",
            s=70,
            color="k",
            zorder=6,
            label="reference (start)",
        )
        ax.set_xlabel(xk + " (validation)")
        ax.set_ylabel(yk + " (validation)")
        ax.grid(alpha=0.3)
    axes[1].set_yscale("log")
    axes[1].axvline(KEEP * anchor("utility", "reference"), color="k", ls="-.", lw=1)
    axes[0].set_title(
        "value tokens of forget answers vs retain answers (left = forgotten, up = kept)", fontsize=9
    )
    axes[1].set_title(
        "forget quality vs U (up = forgets like the target; right of dash-dot: "
        "allowed by the rule)",
        fontsize=9,
    )
    axes[0].legend(fontsize=6.5, ncol=2, loc="lower right")
    fig.suptitle(
        "Paths over each method's strength (MOX: α; baselines: epochs 1-"
        f"{budget.unlearn_epochs} at each lr), validation authors; diamonds: the "
        "rule's choices (mean)",
        fontsize=10,
    )
    fig.tight_layout()
    written.append(out / f"{prefix}_frontier.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)

    # 3. trajectories over unlearning epochs: baselines at each lr, MOX at its chosen α
    keys = ("forget_value_prob", "retain_prob", "forget_quality")
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for ax, key in zip(axes, keys, strict=True):
        start = anchor(key, "reference")
        for mi, m in enumerate(budget.baselines):
            for lr in budget.lrs:
                xs, ys = _curve(results, "val", key, method=m, lr=lr)
                if xs:
                    ax.plot(
                        [0, *xs],
                        [start, *ys],
                        lr_style[lr],
                        marker=".",
                        color=f"C{mi + 1}",
                        label=f"{m} lr {lr:g}",
                    )
        acc: dict[int, list[float]] = {}
        for res in results:
            for run in res["runs"]:
                final = run["points"][run["chosen"]["mox"]["point"]]
                for p in run["mox_trajectory"] + [{**final, "epoch": budget.unlearn_epochs}]:
                    if p["val"].get(key) is not None:
                        acc.setdefault(p["epoch"], []).append(p["val"][key])
        xs = sorted(acc)
        ax.plot(
            [0, *xs],
            [start, *[statistics.fmean(acc[x]) for x in xs]],
            "-",
            marker="o",
            color="C0",
            lw=2,
            label="mox (the rule's α)",
        )
        ax.axhline(anchor(key, "retain_only"), color="gold", lw=1.5, label="retain-only")
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("unlearning epoch")
        ax.grid(alpha=0.3)
    axes[2].set_yscale("log")
    axes[0].legend(fontsize=6.5, ncol=2)
    fig.suptitle("Over training (validation authors, mean of all runs)", fontsize=10)
    fig.tight_layout()
    written.append(out / f"{prefix}_trajectories.png")
    fig.savefig(written[-1], dpi=110)
    plt.close(fig)
    return written


# --- matched forgetting, read off the sweeps (studies/matched_forgetting.py) ------------------
# For a forgetting level x, a method's score is the highest retain answer probability among its
# swept points whose forget value-token probability is at most x (the upper frontier of the
# frontier plot's left panel, per pipeline instead of averaged). A method that never forgets
# down to x has no score there. No choice is made on these numbers; they describe the sweeps.

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


def matched_table(record: dict, levels=LEVELS) -> str:
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


def write_matched(record_path: Path, levels=LEVELS) -> Path:
    """<stem>_matched.md beside a study's JSON; prints the table and returns the file."""
    record = json.loads(record_path.read_text())
    text = matched_table(record, levels)
    out = record_path.with_name(f"{record_path.stem}_matched.md")
    out.write_text(
        f"# {record_path.stem}: retain kept at equal forgetting "
        f"(studies/matched_forgetting.py {record_path.name})\n\n{text}"
    )
    print(text)
    return out
