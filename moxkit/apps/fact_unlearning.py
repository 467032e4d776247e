"""Unlearning facts a pretrained model already knows: MOX and the baselines under one training
budget, each measured along its training, and one operating point per method chosen on
validation facts by a rule fixed before any run.

The forget request is forget_val + forget_test (both are unlearned); the rule looks only at
forget_val and heldout_val, and the reported numbers are on forget_test and heldout_test, so
the choice of strength (α, learning rate, steps) never sees the facts it is judged on. MOX
trains θ_mem once per learning rate and reads its whole α grid off that one run (α costs an
extrapolation, not a training run); the baselines' strength is their learning rate and step.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from transformers import TrainerCallback

from ..train import TrainConfig, extrapolate_model, train_mem, unlearn
from .facts import Fact, chat_probes, general_nll, score_facts, split_facts

SPLITS = ("forget_val", "forget_test", "retain", "heldout_val", "heldout_test")


@dataclass
class StudyConfig:
    """One budget for every method: the same steps, batch, schedule and data order."""

    sizes: dict[str, int] = field(
        default_factory=lambda: {
            "forget_val": 6,
            "forget_test": 6,
            "retain": 8,
            "heldout_val": 6,
            "heldout_test": 6,
        }
    )
    steps: int = 6
    batch_size: int = 4
    eval_steps: tuple[int, ...] = (3, 6)  # baselines: measured after these steps
    mox_lrs: tuple[float, ...] = (3e-5,)
    alphas: tuple[float, ...] = (0.5, 1.0, 2.0, 4.0, 8.0)
    mox_eval_steps: tuple[int, ...] = (3, 6)  # MOX: the α grid at these θ_mem steps
    baseline_lrs: tuple[float, ...] = (3e-5, 1e-4)  # run in this order (all methods at each)
    methods: tuple[str, ...] = ("mox", "ga", "graddiff", "npo")
    seed: int = 0
    chat: bool = True  # greedy chat answers at the reference and after the last step


# The selection rule, fixed before the runs: keep a method's points whose retain and held-out
# (validation) accuracy stay within KEEP of the reference's and whose general-text NLL rises by
# at most NLL_SLACK nats; among them take the lowest forget_val accuracy (then the lowest
# forget_val log-probability). With no point kept, the method has no operating point.
KEEP = 0.9
NLL_SLACK = 0.1


@dataclass
class Point:
    """One model measured: a method at a strength and a step."""

    method: str
    lr: float | None
    alpha: float | None
    step: int
    metrics: dict[str, float]
    chat: list[dict] = field(default_factory=list)
    seconds: float = 0.0  # spent measuring this point


def measure(model, tokenizer, splits: dict[str, list[Fact]], chat: bool) -> tuple[dict, list]:
    """Accuracy (greedy answer correct) and mean answer log-probability per split, the
    general-text NLL, and (with chat) the chat probes."""
    was_training = model.training
    model.eval()
    names = [n for n in SPLITS if splits.get(n)]
    facts = [f for n in names for f in splits[n]]
    scores = iter(score_facts(model, tokenizer, facts))
    metrics: dict[str, float] = {}
    for name in names:
        got = [next(scores) for _ in splits[name]]
        metrics[f"{name}_acc"] = sum(s.correct for s in got) / len(got)
        metrics[f"{name}_logprob"] = sum(s.logprob for s in got) / len(got)
    metrics["general_nll"] = general_nll(model, tokenizer)
    answers = chat_probes(model, tokenizer) if chat else []
    if chat:
        metrics["chat_ok"] = sum(a["ok"] for a in answers) / len(answers)
    model.train(was_training)
    return metrics, answers


class _MeasureAt(TrainerCallback):
    """Measures the model being trained after the given optimizer steps; `models` turns the
    trained model into the ones to measure (itself, or MOX's extrapolations)."""

    def __init__(self, steps: Sequence[int], models: Callable, record: Callable):
        self.steps, self.models, self.record = set(steps), models, record

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.steps:
            with torch.no_grad():
                for labels, measured in self.models(model):
                    self.record(state.global_step, labels, measured)


def run_study(
    model,
    tokenizer,
    splits: dict[str, list[Fact]],
    cfg: StudyConfig,
    log: Callable[[str], None] = print,
    after_run: Callable[[dict], None] | None = None,
) -> dict:
    """Every method at every strength; returns the points, the reference's measures, the
    chosen operating points and the wall time of each run (after_run gets the same, so far,
    after each training run: a cut-short study still leaves its results). `model` is not
    modified."""
    start = time.perf_counter()
    ref_metrics, ref_chat = measure(model, tokenizer, splits, cfg.chat)
    points = [Point("reference", None, None, 0, ref_metrics, ref_chat, time.perf_counter() - start)]
    log(f"reference: {_line(ref_metrics)}")
    forget = [f.row() for f in splits["forget_val"] + splits["forget_test"]]
    retain = [f.row() for f in splits["retain"]]
    runs = []

    def record(method, lr, step, alpha, measured):
        t0 = time.perf_counter()
        metrics, answers = measure(measured, tokenizer, splits, cfg.chat and step == cfg.steps)
        points.append(Point(method, lr, alpha, step, metrics, answers, time.perf_counter() - t0))
        strength = f"α={alpha:g}" if alpha is not None else f"lr={lr:g}"
        log(f"{method} {strength} step {step}: {_line(metrics)}")

    for method, lr in _run_order(cfg):
        config = TrainConfig(
            epochs=1e6,
            max_steps=cfg.steps,
            lr=lr,
            batch_size=cfg.batch_size,
            max_length=64,
            seed=cfg.seed,
            bf16=False,
            progress=False,
        )
        n_before = len(points)
        t0 = time.perf_counter()
        if method == "mox":

            def extrapolations(mem, lr=lr):
                for alpha in cfg.alphas:
                    yield alpha, extrapolate_model(model, mem, alpha)

            cb = _MeasureAt(
                cfg.mox_eval_steps,
                extrapolations,
                lambda step, a, m, lr=lr: record("mox", lr, step, a, m),
            )
            train_mem(
                model, forget, retain, None, config=config, tokenizer=tokenizer, callbacks=[cb]
            )
        else:
            cb = _MeasureAt(
                cfg.eval_steps,
                lambda m: [(None, m)],
                lambda step, _, m, method=method, lr=lr: record(method, lr, step, None, m),
            )
            unlearn(
                model,
                forget,
                retain,
                None,
                method=method,
                config=config,
                tokenizer=tokenizer,
                callbacks=[cb],
            )
        total = time.perf_counter() - t0
        measuring = sum(p.seconds for p in points[n_before:])
        runs.append(
            {
                "method": method,
                "lr": lr,
                "steps": cfg.steps,
                "seconds": round(total, 1),
                "train_seconds": round(total - measuring, 1),
            }
        )
        log(f"{method} lr={lr:g}: {total:.0f} s ({total - measuring:.0f} s training)")
        if after_run is not None:
            after_run(_summary(cfg, splits, points, runs, start))
    return _summary(cfg, splits, points, runs, start)


def _run_order(cfg: StudyConfig) -> list[tuple[str, float]]:
    """MOX first, then every baseline at the first lr, then at the next: a study cut short
    still compares all methods."""
    order = [("mox", lr) for lr in cfg.mox_lrs if "mox" in cfg.methods]
    baselines = [m for m in cfg.methods if m != "mox"]
    return order + [(m, lr) for lr in cfg.baseline_lrs for m in baselines]


def _summary(cfg: StudyConfig, splits, points: list[Point], runs: list[dict], start: float):
    ref_metrics = points[0].metrics
    chosen = {
        m: select([p for p in points if p.method == m], ref_metrics)
        for m in cfg.methods
        if any(p.method == m for p in points)
    }
    return {
        "config": asdict(cfg),
        "sizes": {k: len(v) for k, v in splits.items()},
        "rule": {"keep": KEEP, "nll_slack": NLL_SLACK},
        "points": [asdict(p) for p in points],
        "runs": list(runs),
        "chosen": {m: (asdict(p) if p else None) for m, p in chosen.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }


def select(points: Sequence[Point], reference: dict[str, float]) -> Point | None:
    """The operating point by the fixed rule (see KEEP), from validation facts only."""

    def keeps(p: Point) -> bool:
        m = p.metrics
        return (
            m["retain_acc"] >= KEEP * reference["retain_acc"]
            and m["heldout_val_acc"] >= KEEP * reference["heldout_val_acc"]
            and m["general_nll"] <= reference["general_nll"] + NLL_SLACK
        )

    kept = [p for p in points if keeps(p)]
    if not kept:
        return None
    return min(kept, key=lambda p: (p.metrics["forget_val_acc"], p.metrics["forget_val_logprob"]))


def _line(m: dict[str, float]) -> str:
    parts = [
        f"forget {m['forget_val_acc']:.2f}/{m['forget_test_acc']:.2f}",
        f"retain {m['retain_acc']:.2f}",
        f"heldout {m['heldout_val_acc']:.2f}/{m['heldout_test_acc']:.2f}",
        f"nll {m['general_nll']:.3f}",
    ]
    if "chat_ok" in m:
        parts.append(f"chat {m['chat_ok']:.2f}")
    return ", ".join(parts)


def tiny_stand_in(seed: int = 0):
    """(model, tokenizer, facts): a tiny random Llama with a word tokenizer covering the facts,
    the general text and the chat probes. It knows nothing, so every candidate fact stands in
    for a known one: the code path is what it checks, in seconds, not the method."""
    from .facts import CHAT_PROBES, GENERAL_TEXT, candidate_facts
    from .tiny import build_tiny_llama, build_word_tokenizer

    facts = candidate_facts()
    texts = [f"{f.prompt} {f.answer}" for f in facts] + list(GENERAL_TEXT)
    texts += [q + " " + " ".join(words) for q, words in CHAT_PROBES]
    tokenizer = build_word_tokenizer(texts)
    return build_tiny_llama(len(tokenizer), seed=seed), tokenizer, facts


def prepare(name: str, work: Path, log: Callable[[str], None] = print):
    """(model, tokenizer, known facts) for packaged model `name`: converted once into
    work/name (fp32), its known facts checked once and cached in work/known_facts.json."""
    from ..hf import load_model
    from .facts import known_facts
    from .real_model import export_packaged

    folder = work / name
    if not folder.exists():
        log(f"converting {name} to {folder}")
        export_packaged(name, folder, dtype="fp32")
    loaded = load_model(folder, "model")
    cache = work / "known_facts.json"
    if cache.exists():
        facts = [Fact(**f) for f in json.loads(cache.read_text())]
    else:
        log("checking which facts the model knows (one forward pass per batch of facts)")
        facts = known_facts(loaded.model, loaded.tokenizer)
        cache.write_text(json.dumps([asdict(f) for f in facts], indent=1) + "\n")
    return loaded.model, loaded.tokenizer, facts


DEMO = StudyConfig(
    sizes={"forget_val": 4, "forget_test": 4, "retain": 4, "heldout_val": 4, "heldout_test": 4},
    steps=4,
    eval_steps=(4,),
    mox_eval_steps=(4,),
    alphas=(1.0, 2.0),
    baseline_lrs=(3e-5,),
    methods=("mox", "ga"),
)


def real_demo(name: str, out: str | os.PathLike, log: Callable[[str], None] = print) -> str:
    """The MOX story on a real pretrained model: forget 8 facts it knows with MOX and with
    gradient ascent under the same budget; returns the comparison as a table (the study is
    also written to out/real_demo.json)."""
    work = Path(out)
    work.mkdir(parents=True, exist_ok=True)
    model, tokenizer, facts = prepare(name, work, log)
    splits = split_facts(facts, DEMO.sizes, seed=DEMO.seed)
    log(
        f"{len(facts)} facts the model knows; forgetting {len(splits['forget_val']) * 2}, "
        f"keeping {len(splits['retain'])} (trained on) and "
        f"{len(splits['heldout_val']) * 2} (never seen); seconds per point on a quiet CPU"
    )
    study = run_study(model, tokenizer, splits, DEMO, log)
    (work / "real_demo.json").write_text(json.dumps(study, indent=1) + "\n")
    return summary_table(study)


def summary_table(study: dict) -> str:
    """Every point of a study, one row each, then the chat answers after the last step."""
    rows = [
        ("method", "strength", "forget acc", "retain acc", "held-out acc", "text NLL", "chat ok")
    ]
    for p in study["points"]:
        m = p["metrics"]
        strength = (
            ""
            if p["method"] == "reference"
            else f"α={p['alpha']:g} step {p['step']}"
            if p["alpha"] is not None
            else f"lr={p['lr']:g} step {p['step']}"
        )
        forget = (m["forget_val_acc"] + m["forget_test_acc"]) / 2
        heldout = (m["heldout_val_acc"] + m["heldout_test_acc"]) / 2
        rows.append(
            (
                p["method"],
                strength,
                f"{forget:.2f}",
                f"{m['retain_acc']:.2f}",
                f"{heldout:.2f}",
                f"{m['general_nll']:.3f}",
                f"{m['chat_ok']:.2f}" if "chat_ok" in m else "–",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    for p in study["points"]:
        if p["chat"]:
            lines.append(f"\n{p['method']} {p['alpha'] or ''}".rstrip() + ":")
            lines += [f"  {a['question']} -> {a['answer']!r}" for a in p["chat"][:4]]
    return "\n".join(lines)


# --- reading the runs of several seeds (studies/real_model.py) ---------------------------

METHOD_NAMES = {
    "reference": "reference",
    "mox": "MOX",
    "ga": "GA",
    "graddiff": "GradDiff",
    "npo": "NPO",
    "simnpo": "SimNPO",
}


def setting_table(reports: list[dict]) -> list[str]:
    """Markdown rows: every setting run in all seeds, the mean over seeds ± the 95 % t
    half-width (scipy), forget and held-out accuracy pooled over validation and test facts."""
    from scipy import stats

    def cell(xs: list[float], digits: int) -> str:
        mean = sum(xs) / len(xs)
        if len(xs) < 2:
            return f"{mean:.{digits}f}"
        half = stats.t.ppf(0.975, len(xs) - 1) * stats.sem(xs)
        return f"{mean:.{digits}f} ± {half:.{digits}f}"

    lines = [
        "| method | strength | seeds | forget acc | held-out acc | retain acc | text NLL |",
        "|---|---|---|---|---|---|---|",
    ]
    values = setting_values(reports)
    for (method, lr, alpha, step), rows in sorted(values.items(), key=lambda kv: str(kv[0])):
        if method == "reference" or len(rows) < len(reports):
            continue  # the starting point, or not run in every seed
        knob = f"α={alpha:g}, " if alpha is not None else ""
        lines.append(
            f"| {METHOD_NAMES[method]} | {knob}lr={lr:g}, step {step} | {len(rows)} | "
            + " | ".join(
                cell([row[key] for row in rows], 3 if key == "nll" else 2)
                for key in ("forget", "heldout", "retain", "nll")
            )
            + " |"
        )
    return lines


def setting_values(reports: list[dict]) -> dict[tuple, list[dict[str, float]]]:
    """Each setting (method, lr, α, step) with its metrics in every seed that ran it; forget
    and held-out accuracy pool validation and test facts (a description, not a choice)."""
    values: dict[tuple, list[dict]] = {}
    for r in reports:
        for p in r["study"]["points"]:
            m = p["metrics"]
            values.setdefault((p["method"], p["lr"], p["alpha"], p["step"]), []).append(
                {
                    "forget": (m["forget_val_acc"] + m["forget_test_acc"]) / 2,
                    "heldout": (m["heldout_val_acc"] + m["heldout_test_acc"]) / 2,
                    "retain": m["retain_acc"],
                    "nll": m["general_nll"],
                }
            )
    return values


def setting_means(reports: list[dict]) -> dict[tuple, dict[str, float]]:
    """Each setting with its metrics averaged over the seeds that ran it."""
    return {
        k: {key: sum(d[key] for d in v) / len(v) for key in v[0]} | {"seeds": len(v)}
        for k, v in setting_values(reports).items()
    }
