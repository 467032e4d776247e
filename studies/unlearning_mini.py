"""Is MOX's unlearning as good as the paper says? A pre-registered comparison on tofu-mini.

The protocol (also written in results/unlearning_mini/unlearning_mini.md before the run;
moxkit.apps.study holds the rule):
- Data: tofu-mini (BPE tokenizer, names in pieces), split Budget.split: validation forget
  authors and disjoint test (reported) forget authors are unlearned together; evaluation scores
  one row per fact on retain authors that no method trains on.
- Pipelines: for each init seed, a base Llama is built, pretrained on general text, fine-tuned on
  all authors (the reference θ_ref) and on the retain authors only (the retain-only model), all
  with that seed. Each pipeline is unlearned with every method under each unlearning seed
  (the order of forget and retain batches).
- Strength swept for every method: MOX α ∈ {1, 1.5, ..., 8} from one θ_mem (lr MOX_LR); the
  task vector (λ = 0) and MOX-momentum (every η in ETAS, a tick every step) over the coarse α
  grid; targeted MOX trained at each α in TARGETED_ALPHAS; GA, GradDiff, NPO, SimNPO at each lr
  in LRS, evaluated after every epoch.
- Operating point per method and run: moxkit.apps.study.choose on the validation sets only.
- Reported: test metrics at the chosen points, mean over pipelines × seeds with a 95 %
  t-interval over the pipeline means (the pipelines are the independent units), and paired
  differences MOX − baseline likewise; name-token and value-token probabilities apart.

    .venv/bin/python studies/unlearning_mini.py            # the committed results
    .venv/bin/python studies/unlearning_mini.py --quick    # the CI form (seconds)
    .venv/bin/python studies/unlearning_mini.py --real     # on SmolLM2-135M (`make real`)

Writes unlearning_mini.json (every point of every run), unlearning_mini_tables.md and plots
into --out. Models and per-pipeline results are cached under --work, so an interrupted run
resumes; pipelines run in parallel worker processes (--jobs), one thread each.
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from moxkit.apps.study import ALPHAS, KEEP, Choice, rule_utility

MOX_LR = 3e-4
LRS = (1e-4, 3e-4, 1e-3)
COARSE_ALPHAS = (2.0, 4.0, 6.0, 8.0)
ETAS = (0.1, 0.3, 0.675)
TARGETED_ALPHAS = (2.0, 4.0)
BASELINES = ("ga", "graddiff", "npo", "simnpo")
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


@dataclass(frozen=True)
class Budget:
    authors: int = 40
    split: str = "forget10"
    hidden: int = 64
    layers: int = 3
    pretrain_epochs: float = 5.0
    pretrain_lr: float = 3e-3
    finetune_epochs: float = 15.0
    finetune_lr: float = 1e-3
    unlearn_epochs: int = 4
    unlearn_batch: int = 32
    mox_lr: float = MOX_LR
    lrs: tuple[float, ...] = LRS
    alphas: tuple[float, ...] = ALPHAS
    coarse_alphas: tuple[float, ...] = COARSE_ALPHAS
    etas: tuple[float, ...] = ETAS
    targeted_alphas: tuple[float, ...] = TARGETED_ALPHAS
    baselines: tuple[str, ...] = BASELINES
    task_vector: bool = False
    pipelines: tuple[int, ...] = (0, 1, 2)
    seeds: tuple[int, ...] = (0, 1, 2)
    max_new_tokens: int = 48
    # a packaged pretrained model (moxkit.apps.real_model) in place of the tiny Llama:
    # pipelines then differ in their fine-tuning data order, and its own tokenizer reads tofu-mini
    base: str = ""


# issue 10's TOFU-style study on a real model, reduced to fit 2 CPU cores (about 65 training
# tokens/s per core): 20 authors, the pretrained model in place of pretraining, 3 fine-tuning
# epochs, 2 pipelines × 1 seed, short unlearning in small batches at lrs an order of magnitude
# under the tiny model's, two lrs per baseline (6 points each against MOX's 6 α), no momentum
# or targeted MOX (targeted kept utility in no tiny run).
REAL = Budget(
    authors=20,
    base="smollm2-135m",
    pretrain_epochs=0.0,
    finetune_epochs=3.0,
    finetune_lr=3e-4,
    unlearn_epochs=3,
    unlearn_batch=8,
    mox_lr=3e-5,
    lrs=(3e-5, 1e-4),
    alphas=(1.0, 2.0, 3.0, 4.0, 6.0, 8.0),
    coarse_alphas=(),
    etas=(),
    targeted_alphas=(),
    pipelines=(0, 1),
    seeds=(0,),
    max_new_tokens=32,
)

QUICK = Budget(
    authors=10,
    hidden=16,
    layers=1,
    pretrain_epochs=0.0,
    finetune_epochs=2.0,
    unlearn_epochs=2,
    lrs=(1e-3,),
    alphas=(1.0, 2.0),
    coarse_alphas=(2.0,),
    etas=(0.5,),
    targeted_alphas=(),
    baselines=("ga",),
    task_vector=False,
    pipelines=(0, 1),
    seeds=(0,),
    max_new_tokens=4,
)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _numbers(summary: dict) -> dict:
    return {
        k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class Pipeline:
    """One pipeline's files and the tools every stage needs, built inside a worker process
    (one thread each: the parallelism is across processes)."""

    def __init__(self, pipeline: int, budget: Budget, data: Path, work: Path):
        import torch
        from transformers import AutoTokenizer

        from moxkit.eval.evaluate import EvalConfig

        torch.set_num_threads(1)
        self.pipeline, self.budget, self.data = pipeline, budget, data
        self.split = data / budget.split
        self.wd = work / f"pipeline-{pipeline}"
        self.tok = AutoTokenizer.from_pretrained(
            work / budget.base if budget.base else data / "tokenizer"
        )
        self.ecfg = EvalConfig(
            max_new_tokens=budget.max_new_tokens, verbmem_max_new_tokens=budget.max_new_tokens
        )
        self.dirs = {"val": self.split / "val", "test": self.split}
        self.qa = {
            k: {s: _rows(d / f"{s}.jsonl") for s in ("forget", "retain")}
            for k, d in self.dirs.items()
        }
        self.refs: dict | None = None  # the retain-only model's references (FQ's target)

    def log(self, msg: str) -> None:
        print(f"[pipeline-{self.pipeline} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def config(self, epochs: float, lr: float, seed: int, batch_size: int = 32):
        from moxkit.train import TrainConfig

        return TrainConfig(
            epochs=epochs,
            lr=lr,
            seed=seed,
            batch_size=batch_size,
            warmup_epochs=1.0,
            bf16=False,
            progress=False,
        )

    def measure(self, model, sets=("val",), full=False) -> dict:
        """Summary metrics on the validation (and test) sets, with name/value-token
        probabilities of the forget and retain rows; likelihood only unless `full`."""
        import torch

        from moxkit.apps.study import name_value_probs
        from moxkit.eval.evaluate import evaluate_model

        cfg = self.ecfg if full else replace(self.ecfg, generate=False)
        model.eval()
        out = {}
        with torch.no_grad():
            for k in sets:
                rep = evaluate_model(
                    model,
                    self.tok,
                    self.dirs[k],
                    cfg=cfg,
                    retain=self.refs[k] if self.refs else None,
                )
                s = _numbers(rep["summary"])
                for which, rows in self.qa[k].items():
                    s.update(
                        {
                            f"{which}_{key}": v
                            for key, v in name_value_probs(model, self.tok, rows).items()
                        }
                    )
                out[k] = s
        return out


def train_stage(job: tuple) -> float:
    """Train one model of a pipeline if it is not there yet (the stages run in order:
    pretrained, then reference and retain-only side by side); returns the seconds spent."""
    pipeline, stage, budget, data, work = job
    from moxkit.apps.tiny import build_tiny_llama, save_tiny_model
    from moxkit.train import finetune

    pl = Pipeline(pipeline, budget, data, work)
    path = pl.wd / stage
    if path.is_dir():
        return 0.0
    t = time.time()
    base = work / budget.base if budget.base else pl.wd / "base"
    if not base.is_dir():
        save_tiny_model(
            build_tiny_llama(
                len(pl.tok),
                hidden_size=budget.hidden,
                num_layers=budget.layers,
                intermediate_size=2 * budget.hidden,
                seed=pipeline,
            ),
            pl.tok,
            base,
        )
    start = pl.wd / "pretrained" if budget.pretrain_epochs else base
    pl.log(f"training {stage}")
    if stage == "pretrained":
        finetune(
            base,
            str(data / "pretrain.jsonl"),
            path,
            config=pl.config(budget.pretrain_epochs, budget.pretrain_lr, pipeline),
        )
    else:
        rows = data / "full.jsonl" if stage == "reference" else pl.split / "train_retain_only.jsonl"
        finetune(
            start,
            str(rows),
            path,
            config=pl.config(budget.finetune_epochs, budget.finetune_lr, pipeline),
        )
    return round(time.time() - t, 1)


def measure_anchors(job: tuple) -> dict:
    """The retain-only model's references and the full measurements of the reference and
    retain-only models, cached."""
    pipeline, budget, data, work = job
    from moxkit.apps.study import rule_utility
    from moxkit.eval.evaluate import evaluate_model, load_model, retain_reference

    pl = Pipeline(pipeline, budget, data, work)
    cache = pl.wd / "anchors.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    retain_model, _ = load_model(pl.wd / "retain-only", "cpu")
    pl.refs = {
        k: retain_reference(evaluate_model(retain_model, pl.tok, d, cfg=pl.ecfg), d, pl.ecfg)
        for k, d in pl.dirs.items()
    }
    retain_only = pl.measure(retain_model, ("val", "test"), full=True)
    ref_model, _ = load_model(pl.wd / "reference", "cpu")
    reference = pl.measure(ref_model, ("val", "test"), full=True)
    anchors = {
        "pipeline": pipeline,
        "refs": pl.refs,
        "reference": reference,
        "retain_only": retain_only,
        "reference_utility": rule_utility(reference["val"]),
        "parameters": sum(p.numel() for p in ref_model.parameters()),
    }
    pl.log(
        f"reference FQ val {reference['val']['forget_quality']:.3g} test "
        f"{reference['test']['forget_quality']:.3g}; U val {anchors['reference_utility']:.3f}"
    )
    cache.write_text(json.dumps(anchors) + "\n")
    return anchors


def run_seed(job: tuple) -> dict:
    """One unlearning run: every method's sweep on the validation sets, the rule's choice per
    method, and the chosen models measured in full on validation and test. Cached."""
    pipeline, seed, budget, data, work = job
    from moxkit.apps.study import momentum_average, on_epoch_end
    from moxkit.apps.tofu_mini import REFUSAL
    from moxkit.eval.evaluate import load_model
    from moxkit.train import (
        UNLEARN_METHODS,
        ExtrapolationConfig,
        LossConfig,
        extrapolate_model,
        train_mem,
        unlearn,
    )

    pl = Pipeline(pipeline, budget, data, work)
    cache = pl.wd / f"run-seed{seed}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    anchors = json.loads((pl.wd / "anchors.json").read_text())
    pl.refs = anchors["refs"]
    ref_dir = pl.wd / "reference"
    ref_model, _ = load_model(ref_dir, "cpu")
    forget = str(pl.split / "unlearn_forget.jsonl")
    retain = str(pl.split / "unlearn_retain.jsonl")
    t_seed = time.time()
    points: list[dict] = []
    # rebuilds the model of each point the rule may still choose (None once it cannot: a
    # sweep over a large model must not hold every checkpoint)
    makers: list = []
    choices: dict[str, Choice] = {}
    chosen: dict[str, dict] = {}

    def add(point: dict, model, maker) -> None:
        points.append({**point, **pl.measure(model)})
        makers.append(maker)
        for family in family_names(points[-1]):
            choices.setdefault(family, Choice(anchors["reference_utility"]))
            choices[family].offer(len(points) - 1, points[-1]["val"])
        prune()

    def prune() -> None:
        alive = set().union(*(c.candidates for f, c in choices.items() if f not in chosen))
        for j in range(len(makers)):
            if j not in alive:
                makers[j] = None

    def settle() -> None:
        """The rule's choice for every family whose sweep has ended, measured in full."""
        for family, choice in choices.items():
            if family not in chosen:
                i, ok = choice.result()
                chosen[family] = {
                    "point": i,
                    "qualified": ok,
                    **pl.measure(makers[i](), ("val", "test"), full=True),
                }
        prune()

    ul = pl.config(budget.unlearn_epochs, budget.mox_lr, seed, budget.unlearn_batch)
    snaps: list[dict] = []  # θ_mem after each epoch, for MOX's trajectory
    mem = train_mem(
        ref_dir,
        forget,
        retain,
        None,
        config=ul,
        callbacks=[
            on_epoch_end(
                lambda m, e: snaps.append({k: v.clone() for k, v in m.state_dict().items()})
            )
        ],
    ).model
    for alpha in budget.alphas:

        def mox(alpha=alpha):
            return extrapolate_model(ref_model, mem, alpha)

        add({"method": "mox", "alpha": alpha, "lr": budget.mox_lr}, mox(), mox)
    settle()
    if budget.task_vector:
        tv = train_mem(ref_dir, forget, None, None, config=ul, loss=LossConfig(kl_weight=0.0)).model
        for alpha in budget.coarse_alphas:

            def task_vector(alpha=alpha):
                return extrapolate_model(ref_model, tv, alpha)

            add(
                {"method": "task-vector", "alpha": alpha, "lr": budget.mox_lr},
                task_vector(),
                task_vector,
            )
        settle()

    def unlearn_mox(extrapolation, **options):
        """MOX end to end (a variant) under the run's data and budget: the trained model."""
        return unlearn(
            ref_dir,
            forget,
            retain,
            None,
            method="mox",
            config=ul,
            extrapolation=extrapolation,
            **options,
        ).model

    for eta in budget.etas:
        one = unlearn_mox(ExtrapolationConfig(alpha=1.0, eta=eta))
        average = momentum_average(ref_model, one)
        for alpha in budget.coarse_alphas:

            def momentum(alpha=alpha, average=average):
                return extrapolate_model(ref_model, average, alpha)

            add(
                {"method": "mox-momentum", "eta": eta, "alpha": alpha, "lr": budget.mox_lr},
                momentum(),
                momentum,
            )
    settle()
    for alpha in budget.targeted_alphas:
        targeted = unlearn_mox(ExtrapolationConfig(alpha=alpha), target_answer=REFUSAL)
        add(
            {"method": "mox-targeted", "alpha": alpha, "lr": budget.mox_lr},
            targeted,
            lambda targeted=targeted: targeted,
        )
    settle()
    pl.log(f"seed {seed}: MOX and its variants swept")
    for method in [m for m in budget.baselines if m in UNLEARN_METHODS]:
        for lr in budget.lrs:

            def keep(model, epoch, method=method, lr=lr):
                state = {k: v.detach().clone() for k, v in model.state_dict().items()}

                def checkpoint(state=state):
                    m = load_model(ref_dir, "cpu")[0]
                    m.load_state_dict(state)
                    return m

                add({"method": method, "lr": lr, "epoch": epoch}, model, checkpoint)

            unlearn(
                ref_dir,
                forget,
                retain,
                None,
                method=method,
                config=pl.config(budget.unlearn_epochs, lr, seed, budget.unlearn_batch),
                callbacks=[on_epoch_end(keep)],
            )
        settle()
        pl.log(f"seed {seed}: {method} swept")

    alpha = points[chosen["mox"]["point"]]["alpha"]
    trajectory = []
    for epoch, state in enumerate(snaps[:-1], 1):
        mem.load_state_dict(state)
        trajectory.append(
            {"epoch": epoch, "alpha": alpha, **pl.measure(extrapolate_model(ref_model, mem, alpha))}
        )
    pl.log(f"seed {seed}: done in {time.time() - t_seed:.0f} s; the rule's MOX α = {alpha:g}")
    run = {
        "pipeline": pipeline,
        "seed": seed,
        "points": points,
        "chosen": chosen,
        "mox_trajectory": trajectory,
        "seconds": round(time.time() - t_seed, 1),
    }
    cache.write_text(json.dumps(run) + "\n")
    return run


def run_all(budget: Budget, data: Path, work: Path, jobs: int) -> list[dict]:
    """Every stage, each spread over worker processes: pretraining, reference and
    retain-only models, their measurements, then the pipelines × seeds unlearning runs."""
    pipes = list(budget.pipelines)
    pairs = [(p, s) for p in pipes for s in budget.seeds]
    stages = [[(p, "pretrained") for p in pipes]] if budget.pretrain_epochs else []
    stages.append([(p, st) for p in pipes for st in ("reference", "retain-only")])

    pool = mp.get_context("spawn").Pool(jobs) if jobs > 1 else None  # one pool: one import

    def pool_map(fn, args: list) -> list:
        return pool.map(fn, args, chunksize=1) if pool else [fn(a) for a in args]

    try:
        seconds: dict[int, dict[str, float]] = {p: {} for p in pipes}
        for stage in stages:
            done = pool_map(train_stage, [(p, st, budget, data, work) for p, st in stage])
            for (p, st), t in zip(stage, done, strict=True):
                seconds[p][st] = t
        anchors = pool_map(measure_anchors, [(p, budget, data, work) for p in pipes])
        runs = pool_map(run_seed, [(p, s, budget, data, work) for p, s in pairs])
    finally:
        if pool:
            pool.close()
            pool.join()
    return [
        {
            **{k: v for k, v in a.items() if k != "refs"},
            "train_seconds": seconds[a["pipeline"]],
            "runs": [r for r in runs if r["pipeline"] == a["pipeline"]],
        }
        for a in anchors
    ]


def collect(budget: Budget, work: Path) -> list[dict]:
    """What the cached stages hold so far (--report-only): pipelines with their anchors and
    the runs that finished."""
    out = []
    for p in budget.pipelines:
        wd = work / f"pipeline-{p}"
        if (wd / "anchors.json").is_file():
            anchors = json.loads((wd / "anchors.json").read_text())
            runs = [
                json.loads((wd / f"run-seed{s}.json").read_text())
                for s in budget.seeds
                if (wd / f"run-seed{s}.json").is_file()
            ]
            if runs:
                out.append(
                    {
                        **{k: v for k, v in anchors.items() if k != "refs"},
                        "train_seconds": {},
                        "runs": runs,
                    }
                )
    return out


def family_names(point: dict) -> list[str]:
    """The families the rule chooses within that hold this point: its method (momentum also one
    family per η, besides the one over every η, where the rule also picks η)."""
    if point["method"] == "mox-momentum":
        return [point["method"], f"mox-momentum η={point['eta']:g}"]
    return [point["method"]]


# --- the rule applied, statistics, tables and plots ------------------------------------------


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


def machine() -> dict:
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", type=Path, default=Path(__file__).parent / "results" / "unlearning_mini"
    )
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
    if args.jobs is None:
        args.jobs = 2 if args.real else 9
    budget = QUICK if args.quick else REAL if args.real else Budget()
    prefix = "real_tofu" if args.real else "unlearning_mini"
    prefix += "_quick" if args.quick else ""
    if args.work is None:
        args.work = Path(f"/tmp/moxkit-{prefix.replace('_', '-')}")
    return run_budget(budget, prefix, args)


def run_budget(budget: Budget, prefix: str, args: argparse.Namespace) -> dict:
    """Run (or report) one budget: the data, the models, the runs, then tables and plots."""
    from moxkit.apps.tofu_mini import write

    t0 = time.time()
    args.work.mkdir(parents=True, exist_ok=True)
    if budget.base and not (args.work / budget.base).is_dir():
        from moxkit.apps.real_model import export_packaged

        export_packaged(budget.base, args.work / budget.base, dtype="fp32")
    data = args.work / f"data-{budget.authors}"
    if not data.is_dir():
        write(data, n_authors=budget.authors)
    if args.report_only:
        results = collect(budget, args.work)
    else:
        results = run_all(budget, data, args.work, args.jobs)
    seconds = round(time.time() - t0, 1)

    summary = summarise(results, budget)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "budget": asdict(budget),
        "rule": {"mu_keep": KEEP},
        "machine": machine(),
        "wall_seconds": seconds,
        "summary": summary,
        "results": results,
    }
    (args.out / f"{prefix}.json").write_text(json.dumps(record, indent=1) + "\n")
    text = tables(summary, results, budget)
    (args.out / f"{prefix}_tables.md").write_text(
        f"# {prefix}: tables (generated by studies/unlearning_mini.py)\n\n{text}"
    )
    for path in plots(results, summary, budget, args.out, prefix):
        print(path)
    print(text)
    print(f"wall time {seconds:.0f} s")
    return record


if __name__ == "__main__":
    main()
