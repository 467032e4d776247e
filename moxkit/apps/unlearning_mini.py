"""Is MOX's unlearning as good as the paper says? A pre-registered comparison on tofu-mini.

A configuration of the pipeline (moxkit.apps.pipeline) run over several pipelines and seeds;
studies/unlearning_mini.py runs it. The protocol (also written in
studies/results/unlearning_mini/unlearning_mini.md before the run; moxkit.apps.study holds the
rule):
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

import json
import multiprocessing as mp
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from .pipeline import Pipeline, Recipe, Sweep, sweep_method
from .study import ALPHAS, KEEP, on_epoch_end, rule_utility
from .study_report import plots, summarise, tables

MOX_LR = 3e-4
LRS = (1e-4, 3e-4, 1e-3)
COARSE_ALPHAS = (2.0, 4.0, 6.0, 8.0)
ETAS = (0.1, 0.3, 0.675)
TARGETED_ALPHAS = (2.0, 4.0)
BASELINES = ("ga", "graddiff", "npo", "simnpo")


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

    def recipe(self) -> Recipe:
        """What each pipeline trains (the sweeps' grids stay here: run_seed reads them)."""
        return Recipe.of(self)


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


class StudyPipeline(Pipeline):
    """One pipeline of the study (its models under WORK/pipeline-N, seeded by N), built inside
    a worker process (one thread each: the parallelism is across processes), with the study's
    measurements: summary metrics and name/value-token probabilities."""

    def __init__(self, pipeline: int, budget: Budget, data: Path, work: Path):
        import torch

        from ..eval.evaluate import EvalConfig

        torch.set_num_threads(1)
        self.number, self.budget = pipeline, budget
        super().__init__(
            budget.recipe(),
            data,
            work / f"pipeline-{pipeline}",
            model_seed=pipeline,
            train_seed=pipeline,
            base=work / budget.base if budget.base else None,
            log=self.log,
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
        print(f"[pipeline-{self.number} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    def measure(self, model, sets=("val",), full=False) -> dict:
        """Summary metrics on the validation (and test) sets, with name/value-token
        probabilities of the forget and retain rows; likelihood only unless `full`."""
        import torch

        from ..eval.evaluate import evaluate_model
        from .study import name_value_probs

        cfg = self.ecfg if full else replace(self.ecfg, generate=False)
        model.eval()
        out = {}
        with torch.no_grad():
            for k in sets:
                rep = evaluate_model(
                    model,
                    self.tokenizer,
                    self.dirs[k],
                    cfg=cfg,
                    retain=self.refs[k] if self.refs else None,
                )
                s = _numbers(rep["summary"])
                for which, rows in self.qa[k].items():
                    s.update(
                        {
                            f"{which}_{key}": v
                            for key, v in name_value_probs(model, self.tokenizer, rows).items()
                        }
                    )
                out[k] = s
        return out


def train_stage(job: tuple) -> float:
    """Train one model of a pipeline if it is not there yet (the stages run in order:
    pretrained, then reference and retain-only side by side); returns the seconds spent."""
    pipeline, stage, budget, data, work = job
    pl = StudyPipeline(pipeline, budget, data, work)
    if pl.path(stage).is_dir():
        return 0.0
    t = time.time()
    pl.stage(stage)
    return round(time.time() - t, 1)


def measure_anchors(job: tuple) -> dict:
    """The retain-only model's references and the full measurements of the reference and
    retain-only models, cached."""
    pipeline, budget, data, work = job
    from ..eval.evaluate import evaluate_model, load_model, retain_reference

    pl = StudyPipeline(pipeline, budget, data, work)
    cache = pl.models / "anchors.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    retain_model, _ = load_model(pl.path("retain-only"), "cpu")
    pl.refs = {
        k: retain_reference(evaluate_model(retain_model, pl.tokenizer, d, cfg=pl.ecfg), d, pl.ecfg)
        for k, d in pl.dirs.items()
    }
    retain_only = pl.measure(retain_model, ("val", "test"), full=True)
    ref_model, _ = load_model(pl.path("reference"), "cpu")
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
    from ..eval.evaluate import load_model
    from ..train import UNLEARN_METHODS, extrapolate_model

    pl = StudyPipeline(pipeline, budget, data, work)
    cache = pl.models / f"run-seed{seed}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    anchors = json.loads((pl.models / "anchors.json").read_text())
    pl.refs = anchors["refs"]
    ref_model, _ = load_model(pl.path("reference"), "cpu")
    t_seed = time.time()
    sweep = Sweep(anchors["reference_utility"], pl.measure, family_names)
    chosen: dict[str, dict] = {}

    def full(family: str, i: int, ok: bool, make) -> None:
        """The rule's choice of a family whose sweep has ended, measured in full."""
        chosen[family] = {"point": i, "qualified": ok,
                          **pl.measure(make(), ("val", "test"), full=True)}  # fmt: skip

    def run(method: str, **options):
        return sweep_method(pl, method, sweep, ref_model, seed=seed, **options)

    snaps: list[dict] = []  # θ_mem after each epoch, for MOX's trajectory
    snapshot = on_epoch_end(
        lambda m, e: snaps.append({k: v.clone() for k, v in m.state_dict().items()})
    )
    mem = run("mox", alphas=budget.alphas, callbacks=[snapshot])
    sweep.settle(full)
    if budget.task_vector:
        run("task-vector", alphas=budget.coarse_alphas)
        sweep.settle(full)
    for eta in budget.etas:
        run("mox-momentum", alphas=budget.coarse_alphas, eta=eta)
    sweep.settle(full)
    run("mox-targeted", alphas=budget.targeted_alphas)
    sweep.settle(full)
    pl.log(f"seed {seed}: MOX and its variants swept")
    for method in [m for m in budget.baselines if m in UNLEARN_METHODS]:
        run(method, lrs=budget.lrs)
        sweep.settle(full)
        pl.log(f"seed {seed}: {method} swept")

    points = sweep.points
    alpha = points[chosen["mox"]["point"]]["alpha"]
    trajectory = []
    for epoch, state in enumerate(snaps[:-1], 1):
        mem.load_state_dict(state)
        trajectory.append(
            {"epoch": epoch, "alpha": alpha, **pl.measure(extrapolate_model(ref_model, mem, alpha))}
        )
    pl.log(f"seed {seed}: done in {time.time() - t_seed:.0f} s; the rule's MOX α = {alpha:g}")
    run_record = {
        "pipeline": pipeline,
        "seed": seed,
        "points": points,
        "chosen": chosen,
        "mox_trajectory": trajectory,
        "seconds": round(time.time() - t_seed, 1),
    }
    cache.write_text(json.dumps(run_record) + "\n")
    return run_record


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


def run_budget(
    budget: Budget,
    prefix: str,
    out: Path,
    work: Path,
    *,
    jobs: int = 1,
    report_only: bool = False,
    machine: Callable[[], dict] | None = None,
) -> dict:
    """Run (or report) one budget: the data, the models, the runs, then tables and plots."""
    from .tofu_mini import write

    t0 = time.time()
    work.mkdir(parents=True, exist_ok=True)
    if budget.base and not (work / budget.base).is_dir():
        from .real_model import export_packaged

        export_packaged(budget.base, work / budget.base, dtype="fp32")
    data = work / f"data-{budget.authors}"
    if not data.is_dir():
        write(data, n_authors=budget.authors)
    if report_only:
        results = collect(budget, work)
    else:
        results = run_all(budget, data, work, jobs)
    seconds = round(time.time() - t0, 1)

    summary = summarise(results, budget)
    out.mkdir(parents=True, exist_ok=True)
    record = {
        "budget": asdict(budget),
        "rule": {"mu_keep": KEEP},
        "machine": machine() if machine else None,
        "wall_seconds": seconds,
        "summary": summary,
        "results": results,
    }
    (out / f"{prefix}.json").write_text(json.dumps(record, indent=1) + "\n")
    text = tables(summary, results, budget)
    (out / f"{prefix}_tables.md").write_text(
        f"# {prefix}: tables (generated by studies/unlearning_mini.py)\n\n{text}"
    )
    for path in plots(results, summary, budget, out, prefix):
        print(path)
    print(text)
    print(f"wall time {seconds:.0f} s")
    return record
