"""Does MOX beat gradient ascent on tofu-mini, and what makes it selective at small scale?

Every method unlearns the same forget split (tofu-mini forget10) from the same reference model
with the same trainer, data pipeline, epochs and learning rate; only the loss differs. Several
model conditions are compared (trained from scratch or pretrained on general text first, and
two widths), each with its own reference and retain-only models; unlearning runs repeat over
seeds (the seed sets the order of forget and retain batches). Per run we record the final
TOFU/MUSE metrics and a trajectory over training epochs (likelihood metrics only, no
generation, to keep it cheap).

    .venv/bin/python benchmarks/unlearning_mini.py                # the committed results
    .venv/bin/python benchmarks/unlearning_mini.py --quick         # a smoke run (~1-2 min)

Writes unlearning_mini.json (everything), unlearning_mini_tables.md and three plots into
--out (default benchmarks/results). Trained models are cached under --work, so an interrupted
run resumes. Conditions run in parallel worker processes (--jobs), one thread each.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

ALPHAS = (0.5, 1.0, 2.0, 4.0, 8.0)
MAIN_ALPHA = 4.0  # the paper's default; MOX rows in the method table use it, untuned
TRAJ_KEYS = ("forget_prob", "retain_prob", "general_prob", "forget_truth_ratio",
             "forget_quality")


@dataclass(frozen=True)
class Condition:
    name: str
    hidden: int
    layers: int
    pretrain_epochs: float  # 0: trained from scratch on the authors
    full_methods: bool = False  # run every baseline here (the main condition)


@dataclass(frozen=True)
class Budget:
    authors: int = 40
    split: str = "forget10"
    finetune_epochs: float = 15.0
    finetune_lr: float = 1e-3
    pretrain_lr: float = 3e-3
    unlearn_epochs: float = 10.0
    lrs: tuple[float, ...] = (1e-3, 3e-4)  # unlearning learning rates (the first is the main)
    seeds: tuple[int, ...] = (0, 1, 2)
    traj_epochs: tuple[float, ...] = (2.0, 5.0)  # plus the end of training
    max_items: int = 40
    kl_ablation: tuple[float, ...] = (0.0, 10.0)  # besides the default λ = 1 (0 = task vector)


CONDITIONS = (
    Condition("pretrained-h128", 128, 4, 10.0, full_methods=True),
    Condition("scratch-h128", 128, 4, 0.0),
    Condition("pretrained-h256", 256, 4, 10.0),
)
QUICK_CONDITIONS = (Condition("pretrained-h32", 32, 2, 1.0, full_methods=True),
                    Condition("scratch-h32", 32, 2, 0.0))
QUICK = Budget(authors=10, finetune_epochs=3.0, unlearn_epochs=2.0, lrs=(1e-3,), seeds=(0, 1),
               traj_epochs=(1.0,), max_items=8, kl_ablation=(0.0,))


@dataclass
class Run:
    condition: str
    method: str
    seed: int
    lr: float
    kl_weight: float | None = None
    alpha: float | None = None
    summary: dict = field(default_factory=dict)
    trajectory: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _keep(summary: dict) -> dict:
    return {k: v for k, v in summary.items() if isinstance(v, (int, float))}


def run_condition(cond: Condition, budget: Budget, data: Path, work: Path) -> dict:
    """Train (or reuse) one condition's models, then every unlearning run on it."""
    import torch
    from transformers import AutoTokenizer, TrainerCallback

    from moxkit.eval.evaluate import (
        EvalConfig,
        compare_with_retain,
        evaluate_model,
        load_model,
        retain_reference,
    )
    from moxkit.tiny import build_tiny_llama, save_tiny_model
    from moxkit.tofu_mini import REFUSAL
    from moxkit.train import TrainConfig, extrapolate_model, finetune, train_mem, unlearn

    torch.set_num_threads(1)
    t_start = time.time()
    log = lambda msg: print(f"[{cond.name} {time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    split = data / budget.split
    wd = work / cond.name
    timings: dict[str, float] = {}

    def cfg(epochs: float, lr: float, seed: int = 0) -> TrainConfig:
        return TrainConfig(epochs=epochs, lr=lr, seed=seed, warmup_epochs=1.0, bf16=False,
                           progress=False)

    def cached(name: str, fn) -> Path:
        path = wd / name
        if not path.is_dir():
            t = time.time()
            log(f"training {name}")
            fn(path)
            timings[name] = round(time.time() - t, 1)
        return path

    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    start = wd / "base"
    if not start.is_dir():
        save_tiny_model(build_tiny_llama(len(tok), hidden_size=cond.hidden,
                                         num_layers=cond.layers,
                                         intermediate_size=2 * cond.hidden), tok, start)
    n_params = sum(p.numel() for p in load_model(start, "cpu")[0].parameters())
    if cond.pretrain_epochs:
        base = start
        start = cached("pretrained", lambda p: finetune(
            base, str(data / "pretrain.jsonl"), p,
            config=cfg(cond.pretrain_epochs, budget.pretrain_lr)))
    ft = cfg(budget.finetune_epochs, budget.finetune_lr)
    ref_dir = cached("reference", lambda p: finetune(
        start, _rows(data / "full.jsonl") + _rows(data / "full_text.jsonl"), p, config=ft))
    retain_dir = cached("retain", lambda p: finetune(
        start, _rows(split / "retain_train.jsonl") + _rows(split / "retain_text.jsonl"), p,
        config=ft))

    full = EvalConfig(max_items=budget.max_items, max_new_tokens=20)
    light = replace(full, generate=False)
    retain_rep = evaluate_model(*load_model(retain_dir, "cpu"), split, cfg=full)
    retain_ref = retain_reference(retain_rep, split, full)
    retain_summary = {**_keep(retain_rep["summary"]), **compare_with_retain(retain_rep,
                                                                             retain_ref)}
    ref_model, _ = load_model(ref_dir, "cpu")
    ref_summary = _keep(evaluate_model(ref_model, tok, split, retain=retain_ref,
                                       cfg=full)["summary"])
    forget, retain = str(split / "forget.jsonl"), str(split / "retain.jsonl")

    def evaluate(model, light_eval: bool = False) -> dict:
        model.eval()
        with torch.no_grad():
            rep = evaluate_model(model, tok, split, retain=retain_ref,
                                 cfg=light if light_eval else full)
        return _keep(rep["summary"])

    class Trajectory(TrainerCallback):
        """Light metrics at chosen epochs; for MOX runs, of the model extrapolated from the
        current θ_mem at MAIN_ALPHA (what MOX would return if training stopped there)."""

        def __init__(self, extrapolate: bool):
            self.extrapolate, self.points = extrapolate, []

        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            if not any(abs(state.epoch - e) < 1e-6 for e in budget.traj_epochs):
                return
            with torch.no_grad():
                m = extrapolate_model(ref_model, model, MAIN_ALPHA) if self.extrapolate \
                    else model
                point = evaluate(m, light_eval=True)
            model.train()
            self.points.append({"epoch": state.epoch, "step": state.global_step,
                                **{k: point.get(k) for k in TRAJ_KEYS}})

    runs: list[Run] = []

    def record(run: Run, t0: float) -> None:
        run.seconds = round(time.time() - t0, 1)
        runs.append(run)

    for seed in budget.seeds:
        for li, lr in enumerate(budget.lrs):
            ul = cfg(budget.unlearn_epochs, lr, seed)
            kls = [1.0] + (list(budget.kl_ablation) if li == 0 else [])
            for kl in kls:  # MOX (λ = 1), task vector (λ = 0), strong KL; all α from one θ_mem
                t0 = time.time()
                traj = Trajectory(extrapolate=True)
                mem = train_mem(ref_dir, forget, retain if kl else None, None, config=ul,
                                kl_weight=kl, callbacks=[traj]).model
                method = "task-vector" if kl == 0 else "mox"
                for alpha in ALPHAS:
                    run = Run(cond.name, method, seed, lr, kl, alpha,
                              evaluate(extrapolate_model(ref_model, mem, alpha)))
                    if alpha == MAIN_ALPHA:
                        run.trajectory = traj.points + [
                            {"epoch": budget.unlearn_epochs, "step": None,
                             **{k: run.summary.get(k) for k in TRAJ_KEYS}}]
                    record(run, t0)
                del mem
                log(f"seed {seed} lr {lr:g} λ {kl:g}: α grid done")
            if not cond.full_methods:
                continue
            variants = [("mox-momentum", {"method": "mox", "momentum_eta": 0.675}),
                        ("mox-targeted", {"method": "mox", "target_answer": REFUSAL}),
                        ("ga", {"method": "ga"}), ("graddiff", {"method": "graddiff"}),
                        ("npo", {"method": "npo"})]
            for name, kw in variants:
                t0 = time.time()
                traj = Trajectory(extrapolate=False)
                extrapolates = kw["method"] == "mox"
                res = unlearn(ref_dir, forget, retain, None, config=ul,
                              alpha=MAIN_ALPHA, callbacks=[] if extrapolates else [traj], **kw)
                run = Run(cond.name, name, seed, lr, 1.0 if extrapolates else None,
                          MAIN_ALPHA if extrapolates else None, evaluate(res.model))
                if not extrapolates:
                    run.trajectory = traj.points + [
                        {"epoch": budget.unlearn_epochs, "step": res.steps,
                         **{k: run.summary.get(k) for k in TRAJ_KEYS}}]
                record(run, t0)
            log(f"seed {seed} lr {lr:g}: baselines done")
    return {"condition": asdict(cond), "parameters": n_params, "train_seconds": timings,
            "seconds": round(time.time() - t_start, 1),
            "retain_only": retain_summary, "reference": ref_summary,
            "runs": [asdict(r) for r in runs]}


def _worker(args: tuple) -> dict:
    """One condition, its result cached as JSON beside its models (reruns only re-plot)."""
    cond, budget, data, work = args
    cache = work / cond.name / "results.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    result = run_condition(*args)
    cache.write_text(json.dumps(result) + "\n")
    return result


# --- aggregation, tables and plots -----------------------------------------------------------


def _mean_std(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _group(runs: list[dict], **match) -> list[dict]:
    return [r for r in runs if all(r.get(k) == v for k, v in match.items())]


def selectivity(ref: dict, s: dict) -> float:
    """How many times more the forget set's per-token NLL rose than the retain set's:
    log(p_f,ref / p_f) / log(p_r,ref / p_r). Above 1 = selective."""
    df = math.log(ref["forget_prob"] / s["forget_prob"])
    dr = math.log(ref["retain_prob"] / s["retain_prob"])
    return df / dr if dr > 1e-9 else math.inf  # retain untouched or improved


def _fmt(m: float, s: float, digits: int = 3) -> str:
    if math.isnan(m):
        return "-"
    if abs(m) < 1e-3 and m != 0:
        return f"{m:.1e} ± {s:.0e}"
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def tables(results: list[dict], budget: Budget) -> str:
    cols = ("forget_quality", "model_utility", "forget_prob", "retain_prob", "general_prob",
            "forget_rouge_recall", "verbmem_forget", "privleak")
    lines = []
    for res in results:
        cond, runs = res["condition"]["name"], res["runs"]
        lines += [f"### {cond} ({res['parameters'] / 1e6:.2f} M parameters)", "",
                  "| model | lr | " + " | ".join(cols) + " | selectivity |",
                  "|" + "---|" * (len(cols) + 3)]
        for label, s in (("retain-only (target)", res["retain_only"]),
                         ("reference (before)", res["reference"])):
            lines.append(f"| {label} | | " + " | ".join(
                _fmt(s.get(c, math.nan), 0.0) for c in cols) + " | |")
        keys = sorted({(r["method"], r["lr"], r["kl_weight"], r["alpha"]) for r in runs},
                      key=lambda k: (k[1] != budget.lrs[0], k[0], k[2] or 0, k[3] or 0))
        for method, lr, kl, alpha in keys:
            group = _group(runs, method=method, lr=lr, kl_weight=kl, alpha=alpha)
            label = method + (f" λ={kl:g}" if method == "mox" and kl != 1.0 else "") + (
                f" α={alpha:g}" if alpha is not None else "")
            cells = [_fmt(*_mean_std([g["summary"].get(c, math.nan) for g in group]))
                     for c in cols]
            means = {k: _mean_std([g["summary"][k] for g in group])[0]
                     for k in ("forget_prob", "retain_prob")}
            sel = f"{selectivity(res['reference'], means):.2f}"
            lines.append(f"| {label} (n={len(group)}) | {lr:g} | " + " | ".join(cells)
                         + f" | {sel} |")
        lines.append("")
    return "\n".join(lines)


def plots(results: list[dict], budget: Budget, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    # 1. α curves: forget vs retain likelihood per condition and learning rate
    fig, axes = plt.subplots(1, len(results), figsize=(5.2 * len(results), 4.2), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        for li, lr in enumerate(budget.lrs):
            for key, style, label in (("forget_prob", "-", "forget"),
                                      ("retain_prob", "--", "retain")):
                xs = [0.0, *ALPHAS]
                ms = [res["reference"][key]]
                for a in ALPHAS:
                    ms.append(_mean_std([r["summary"][key] for r in _group(
                        res["runs"], method="mox", lr=lr, kl_weight=1.0, alpha=a)])[0])
                ax.plot(xs, ms, style, marker="o", color=f"C{li}",
                        label=f"{label} P, lr {lr:g}")
        ax.axhline(res["retain_only"]["forget_prob"], color="gray", ls=":",
                   label="retain-only model on forget")
        ax.set_title(f"{res['condition']['name']}: MOX, λ = 1")
        ax.set_xlabel("α")
        ax.set_ylabel("answer probability (per token)")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8, loc="lower left")
    fig.suptitle("Selectivity: forget (solid) should fall before retain (dashed) as α grows "
                 f"(mean of {len(budget.seeds)} seeds)", fontsize=10)
    fig.tight_layout()
    written.append(out / "unlearning_mini_alpha.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # 2. the selectivity frontier: retain against forget likelihood along each method's path
    # (MOX and task vector: α = 0 → 8; GA-style: training epochs), the retain-only model as the
    # target point; down-left is forgetting, and staying high is keeping
    fig, axes = plt.subplots(1, len(results), figsize=(5.6 * len(results), 5), squeeze=False)
    colors: dict[str, str] = {}  # one colour per path label across panels
    for ax, res in zip(axes[0], results, strict=True):
        ref = res["reference"]
        paths = []
        for lr in budget.lrs:
            for method, kl in (("mox", 1.0), ("task-vector", 0.0), ("mox", 10.0)):
                pts = [(ref["forget_prob"], ref["retain_prob"])]
                for a in ALPHAS:
                    g = _group(res["runs"], method=method, lr=lr, kl_weight=kl, alpha=a)
                    if g:
                        pts.append(tuple(_mean_std([x["summary"][k] for x in g])[0]
                                         for k in ("forget_prob", "retain_prob")))
                name = "mox" if kl == 1.0 else ("task vector" if kl == 0 else f"mox λ={kl:g}")
                if len(pts) > 1:
                    paths.append((f"{name} α-path, lr {lr:g}", pts, "-" if lr ==
                                  budget.lrs[0] else ":"))
            for method in ("ga", "graddiff", "npo"):
                g = [x for x in _group(res["runs"], method=method, lr=lr) if x["trajectory"]]
                if g:
                    pts = [(ref["forget_prob"], ref["retain_prob"])] + [
                        tuple(_mean_std([x["trajectory"][j][k] for x in g])[0]
                              for k in ("forget_prob", "retain_prob"))
                        for j in range(len(g[0]["trajectory"]))]
                    paths.append((f"{method} epochs, lr {lr:g}", pts,
                                  "--" if lr == budget.lrs[0] else "-."))
        for label, pts, style in paths:
            color = colors.setdefault(label, f"C{len(colors) % 10}")
            ax.plot(*zip(*pts, strict=True), style, marker=".", color=color, label=label)
        ax.scatter([res["retain_only"]["forget_prob"]], [res["retain_only"]["retain_prob"]],
                   marker="*", s=250, color="gold", edgecolor="k", zorder=5,
                   label="retain-only model (target)")
        ax.scatter([ref["forget_prob"]], [ref["retain_prob"]], marker="s", s=80, color="k",
                   zorder=5, label="reference (start)")
        ax.set_xlabel("forget-set answer probability (← forgotten)")
        ax.set_ylabel("retain-set answer probability (kept ↑)")
        ax.set_title(res["condition"]["name"])
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Selectivity frontier (means of {len(budget.seeds)} seeds): ideal = left "
                 "along the top, to the star", fontsize=10)
    fig.tight_layout()
    written.append(out / "unlearning_mini_frontier.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    main = next(r for r in results if r["condition"]["full_methods"])
    # 3. forget quality vs utility, main condition, per learning rate
    fig, axes = plt.subplots(1, len(budget.lrs), figsize=(6.5 * len(budget.lrs), 5),
                             squeeze=False)
    for ax, lr in zip(axes[0], budget.lrs, strict=True):
        points = [("retain-only", [main["retain_only"]]), ("reference", [main["reference"]])]
        for method in ("mox", "mox-momentum", "mox-targeted", "task-vector", "ga",
                       "graddiff", "npo"):
            group = [g for g in _group(main["runs"], method=method, lr=lr)
                     if g["alpha"] in (None, MAIN_ALPHA) and g["kl_weight"] in (None, 1.0, 0.0)]
            if group:
                points.append((method, [g["summary"] for g in group]))
        for i, (name, ss) in enumerate(points):
            xm, xs = _mean_std([s.get("model_utility", math.nan) for s in ss])
            ym, ys = _mean_std([max(s.get("forget_quality", 1e-12), 1e-12) for s in ss])
            ax.errorbar([xm], [ym], xerr=[xs], yerr=[ys], fmt="o", color=f"C{i}", capsize=3)
            ax.annotate(name, (xm, ym), textcoords="offset points", fontsize=9,
                        xytext=(6, 4 if i % 2 else -12))
        ax.set_yscale("log")
        ax.set_xlabel("model utility →")
        ax.set_ylabel("forget quality (KS p-value) →")
        ax.set_title(f"{main['condition']['name']}, unlearning lr {lr:g}, "
                     f"{budget.unlearn_epochs:g} epochs (α = {MAIN_ALPHA:g})")
        ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    written.append(out / "unlearning_mini_methods.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)

    # 4. trajectories over training, main condition, main lr
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, method in enumerate(("mox", "ga", "graddiff", "npo")):
        group = _group(main["runs"], method=method, lr=budget.lrs[0])
        group = [g for g in group if g["trajectory"] and g["kl_weight"] in (None, 1.0)]
        if not group:
            continue
        epochs = [p["epoch"] for p in group[0]["trajectory"]]
        for ax, key in zip(axes, ("forget_prob", "retain_prob", "forget_quality"),
                           strict=True):
            ms = [_mean_std([g["trajectory"][j].get(key) for g in group])[0]
                  for j in range(len(epochs))]
            if key == "forget_quality":
                ms = [max(m, 1e-12) for m in ms]
            ax.plot([0.0, *epochs], [main["reference"].get(key, math.nan)
                                     if key != "forget_quality"
                                     else max(main["reference"]["forget_quality"], 1e-12),
                                     *ms], marker="o", color=f"C{i}",
                    label=f"{method} (α={MAIN_ALPHA:g})" if method == "mox" else method)
            ax.set_title(key)
            ax.set_xlabel("unlearning epoch")
            ax.grid(alpha=0.3)
            if key == "forget_quality":
                ax.set_yscale("log")
    axes[0].legend(fontsize=9)
    fig.suptitle(f"{main['condition']['name']}: trajectories over training, lr "
                 f"{budget.lrs[0]:g} (mean of {len(budget.seeds)} seeds)", fontsize=10)
    fig.tight_layout()
    written.append(out / "unlearning_mini_trajectories.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def machine() -> dict:
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines()
                 if ln.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"platform": platform.platform(), "python": sys.version.split()[0],
            "torch": torch.__version__, "cpu": cpu,
            "logical_cpus": os.cpu_count(), "memory_gib": round(
                psutil.virtual_memory().total / 2**30, 1),
            "note": "CPU shared with other jobs while running; one thread per worker"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--work", type=Path, default=Path("/tmp/moxkit-unlearning-mini"))
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--jobs", type=int, default=2, help="conditions trained in parallel")
    args = ap.parse_args()
    budget, conditions = (QUICK, QUICK_CONDITIONS) if args.quick else (Budget(), CONDITIONS)
    prefix = "unlearning_mini_quick" if args.quick else "unlearning_mini"

    from moxkit.tofu_mini import write

    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / f"data-{budget.authors}"
    if not data.is_dir():
        write(data, n_authors=budget.authors)
    t0 = time.time()
    jobs = [(c, budget, data, args.work) for c in conditions]
    cached = [c.name for c in conditions if (args.work / c.name / "results.json").is_file()]
    ctx = mp.get_context("spawn")
    with ctx.Pool(min(args.jobs, len(jobs))) as pool:
        results = pool.map(_worker, jobs, chunksize=1)
    seconds = round(time.time() - t0, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    record = {"budget": asdict(budget), "alphas": ALPHAS, "main_alpha": MAIN_ALPHA,
              "machine": machine(), "wall_seconds": seconds, "from_cache": cached,
              "results": results}
    (args.out / f"{prefix}.json").write_text(json.dumps(record, indent=1) + "\n")
    text = tables(results, budget)
    (args.out / f"{prefix}_tables.md").write_text(
        f"# {prefix}: tables (generated by benchmarks/unlearning_mini.py)\n\n"
        "Mean ± std over seeds; selectivity = rise of forget NLL / rise of retain NLL "
        "relative to the reference (above 1 = selective).\n\n" + text)
    if not args.quick:
        plots(results, budget, args.out)
    else:
        for p in plots(results, budget, args.work):
            print(p)
    print(text)
    print(f"wall time {seconds:.0f} s")


if __name__ == "__main__":
    main()
