"""`moxkit demo`: the whole MOX story on tofu-mini, from nothing, on a CPU.

Generate the benchmark, train a small Llama on general text, fine-tune it on every author (the
reference θ_ref, the model to unlearn) and on the retain authors only (the retain-only model,
the gold standard of forgetting), unlearn the forget authors with MOX and with the baselines,
set each method's strength by the pre-registered rule (moxkit.apps.study.choose) on the
*validation* forget authors, and evaluate the chosen models on the *test* authors: a table and
a plot. Each stage writes its result under OUT and is skipped when it is already there, so
reruns are quick.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from ..errors import InputError, OutputError
from ..eval.report import HEADLINE, format_table, write_json
from .study import ALPHAS

CONFIG_FILE = "demo_config.json"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and budgets: one pipeline and one seed of studies/unlearning_mini.py (same data,
    methods, training schedule and rule; a wider model, 96 instead of 64, pretrained 8 epochs
    instead of 5), 2 min 40 s on two free CPU cores. Every strength is chosen at
    run time by the rule (moxkit.apps.study.choose) on this run's validation authors, never on the
    test authors the table reports: MOX's α over `alphas`, the baselines' learning rate (over
    `unlearn_lrs`) and epoch. MOX memorizes at `mox_lr` (fixed in the study's protocol: MOX's
    strength is α). QUICK is for CI."""

    authors: int = 40
    split: str = "forget10"
    seed: int = 0
    hidden: int = 96
    layers: int = 3
    pretrain_epochs: float = 8.0  # 0: no general-text pretraining
    pretrain_lr: float = 3e-3
    finetune_epochs: float = 15.0
    finetune_lr: float = 1e-3
    unlearn_epochs: int = 4
    mox_lr: float = 3e-4
    unlearn_lrs: tuple[float, ...] = (1e-4, 3e-4, 1e-3)
    eta: float = 0.675  # MOX-momentum's η (the paper's)
    alphas: tuple[float, ...] = ALPHAS
    batch_size: int = 32
    max_new_tokens: int = 48
    methods: tuple[str, ...] = (
        "mox",
        "mox-momentum",
        "task-vector",
        "ga",
        "graddiff",
        "npo",
        "simnpo",
    )


QUICK = DemoConfig(
    authors=10,
    hidden=16,
    layers=1,
    pretrain_epochs=0.0,
    finetune_epochs=2.0,
    finetune_lr=3e-3,
    unlearn_epochs=2,
    unlearn_lrs=(1e-3,),
    alphas=(1.0, 2.0),
    max_new_tokens=4,
    methods=("mox", "ga"),
)


# MUSE's PrivLeak compares how well forget texts, the texts unlearning removed, are told from a
# holdout of the same kind, against the retain-only model. The demo unlearns the forget
# authors' QA rows, not the bios its membership sets hold, so every model (the reference, each
# method) still knows them: PrivLeak read -100 for all, measuring a removal nobody asked for,
# on so few bios that the AUC moves in steps of 1/(forget x holdout). Left out, and said so.
PRIVLEAK_LEFT_OUT = (
    "PrivLeak left out: MUSE computes it on the texts unlearning removes; the demo unlearns the "
    "forget authors' QA rows, not the {forget} forget and {holdout} holdout bios the membership "
    "test reads (an AUC in steps of 1/{pairs})"
)


def _count_rows(path: Path) -> int:
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


@dataclass
class DemoResult:
    rows: list[dict]  # one per model: name, chosen setting, test summary metrics
    table: str
    plot: Path
    summary: Path


def _check_config(out: Path, cfg: DemoConfig, force: bool) -> None:
    """Results under OUT are reused only if they were made with the same settings; --force
    starts over, which deletes OUT: only a folder a demo made (it holds CONFIG_FILE), and
    never the current folder or one above it."""
    from ..atomic import check_output

    path = out / CONFIG_FILE
    check_output(out, force=True)
    if out.exists() and not path.is_file() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"{out}: exists and holds no demo ({CONFIG_FILE}); choose another out",
                          params=("out",))  # fmt: skip
    wanted = json.loads(json.dumps(asdict(cfg)))
    if path.is_file() and not force:
        if json.loads(path.read_text()) != wanted:
            raise OutputError(
                f"{out} holds a demo made with other settings ({path}); "
                "choose another out or pass force=True to start over",
                params=("out", "force"),
            )
        return
    if force and out.exists():
        import shutil

        shutil.rmtree(out)
    write_json(path, wanted, force=True)


class _Demo:
    """One demo run's pipeline (moxkit.apps.pipeline: one seed, the models under OUT/models)
    and its reports (OUT/reports, one JSON per model and set, reused when there)."""

    def __init__(self, out: Path, cfg: DemoConfig, progress: bool, log: Callable[[str], None]):
        from ..eval.evaluate import EvalConfig
        from .pipeline import Pipeline, Recipe

        self.out, self.cfg, self.log = out, cfg, log
        data = out / "data"
        recipe = Recipe.of(cfg, unlearn_batch=cfg.batch_size, warmup_epochs=None, progress=progress)
        self.pipeline = Pipeline(
            recipe,
            data,
            out / "models",
            model_seed=cfg.seed,
            train_seed=cfg.seed,
            names={"retain-only": "retain"},
            log=lambda message: log(f"demo: {message}"),
        )
        self.split, self.val = self.pipeline.split, self.pipeline.split / "val"
        self.reports = out / "reports"
        self.ecfg = EvalConfig(max_new_tokens=cfg.max_new_tokens)

    def report(self, name: str, model_dir: Path, where: Path, ref: dict | None) -> dict:
        import torch

        from ..eval.evaluate import evaluate_model, load_model

        file = self.reports / f"{name}.json"
        if file.is_file():
            return json.loads(file.read_text())
        self.log(f"demo: evaluating {name}")
        model, tok = load_model(model_dir, "cpu")
        with torch.no_grad():
            rep = evaluate_model(model, tok, where, retain=ref, cfg=self.ecfg)
        rep["model"] = str(model_dir)
        write_json(file, rep, force=True)
        return rep

    def val_summary(self, model) -> dict:
        """What the rule reads, likelihood only (as in the study): no generation per point."""
        import torch

        from ..eval.evaluate import evaluate_model

        with torch.no_grad():
            return evaluate_model(
                model.eval(), self.tok, self.val, retain=self.ref_val,
                cfg=replace(self.ecfg, generate=False),
            )["summary"]  # fmt: skip

    def unlearned(self, method: str) -> Path:
        """The method's model at the operating point the rule picks on the validation
        authors; the sweep it chose from is saved beside the reports."""
        from ..train import METHODS
        from .pipeline import Sweep, sweep_method
        from .tiny import save_tiny_model

        path = self.pipeline.models / method
        if path.is_dir():
            self.log(f"demo: reusing {method} ({path})")
            return path
        self.log(f"demo: unlearning with {method}, strength set on the validation authors")
        cfg, alpha = self.cfg, METHODS[method].extrapolates
        sweep = Sweep(self.reference_u, lambda model: {"val": self.val_summary(model)})
        sweep_method(self.pipeline, method, sweep, self.ref_model, seed=cfg.seed,
                     alphas=cfg.alphas, lrs=cfg.unlearn_lrs, eta=cfg.eta)  # fmt: skip
        keys = ("alpha", "val") if alpha else ("epoch", "lr", "val")
        points = [{k: p[k] for k in keys} for p in sweep.points]

        def take(family: str, i: int, qualified: bool, make) -> None:
            write_json(
                self.reports / f"{method}.sweep.json",
                force=True,
                obj={
                    "rule": "moxkit.apps.study.choose",
                    "reference_utility": self.reference_u,
                    "chosen": i,
                    "qualified": qualified,
                    "points": points,
                },
            )
            save_tiny_model(make(), self.tok, path)

        sweep.settle(take)
        return path

    def setting(self, method: str) -> str:
        sweep = json.loads((self.reports / f"{method}.sweep.json").read_text())
        p = sweep["points"][sweep["chosen"]]
        knob = f"α {p['alpha']:g}" if "alpha" in p else f"lr {p['lr']:g}, epoch {p['epoch']}"
        return knob + ("" if sweep["qualified"] else " (no point kept MU)")

    def run(self) -> DemoResult:
        from ..eval.evaluate import compare_with_retain, load_model, retain_reference
        from ..eval.plots import plot_methods
        from .study import rule_utility
        from .tofu_mini import write

        cfg, pl, split, val = self.cfg, self.pipeline, self.split, self.val
        if not pl.data.is_dir():
            self.log(f"demo: writing tofu-mini ({cfg.authors} authors) to {pl.data}")
            write(pl.data, n_authors=cfg.authors, seed=cfg.seed)
        if not split.is_dir():
            raise InputError(f"demo split {cfg.split!r}: not in {pl.data}")
        pl.base()
        reference, retain_dir = [pl.stage(stage) for stage in pl.stages()][-2:]
        retain_val = self.report("retain.val", retain_dir, val, None)
        retain_test = self.report("retain", retain_dir, split, None)
        self.ref_val = retain_reference(retain_val, val, self.ecfg)
        ref_test = retain_reference(retain_test, split, self.ecfg)
        summary = self.report("reference.val", reference, val, self.ref_val)["summary"]
        self.reference_u = rule_utility(summary)
        self.ref_model, self.tok = load_model(reference, "cpu")
        chosen = {m: self.unlearned(m) for m in cfg.methods}
        # the retain-only model against itself: forget quality 1 and PrivLeak 0 by construction
        rows = [
            {
                "name": "retain-only (target)",
                "setting": "",
                **retain_test["summary"],
                **compare_with_retain(retain_test, ref_test),
            },
            {
                "name": "reference (before)",
                "setting": "",
                **self.report("reference", reference, split, ref_test)["summary"],
            },
        ]
        rows += [
            {"name": m, "setting": self.setting(m),
             **self.report(m, chosen[m], split, ref_test)["summary"]}
            for m in cfg.methods
        ]  # fmt: skip
        for row in rows:  # see PRIVLEAK_LEFT_OUT
            row.pop("privleak", None)
        texts = {n: _count_rows(split / f"{n}_text.jsonl") for n in ("forget", "holdout")}
        note = PRIVLEAK_LEFT_OUT.format(**texts, pairs=texts["forget"] * texts["holdout"])
        table = format_table(rows, {"setting": "setting (val)", **HEADLINE}, "name")
        table += f"\n{note}"
        plot = plot_methods(
            rows,
            self.out / "demo.png",
            f"tofu-mini {cfg.split}, test authors: each method at the setting the "
            "rule chose on the validation authors",
            force=True,
        )
        summary_file = write_json(
            self.out / "demo_summary.json",
            {"config": asdict(cfg), "rows": rows, "notes": {"privleak": note}},
            force=True,
        )
        return DemoResult(rows, table, plot, summary_file)


def run_demo(
    out: str | Path,
    cfg: DemoConfig = DemoConfig(),
    *,
    force: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoResult:
    """Run (or resume) the demo under `out`; returns the comparison on the test authors."""
    from .pipeline import check_methods

    check_methods(cfg.methods)
    out = Path(out)
    _check_config(out, cfg, force)
    return _Demo(out, cfg, progress, log).run()
