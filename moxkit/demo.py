"""`moxkit demo`: the whole MOX story on tofu-mini, from nothing, on a CPU.

Generate the benchmark, train a small Llama on general text, fine-tune it on every author (the
reference θ_ref, the model to unlearn) and on the retain authors only (the retain-only model,
the gold standard of forgetting), unlearn the forget authors with MOX and with the baselines
under one training budget, evaluate everything and show a table and a plot. Each stage writes
its result under OUT and is skipped when that result is already there, so reruns are quick.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import MoxError
from .eval.report import HEADLINE, format_table, write_json

CONFIG_FILE = "demo_config.json"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes and budgets. The defaults take a few minutes on two CPU cores and are the main
    condition of benchmarks/unlearning_mini.py (pretrained on general text first, width 128,
    unlearning lr 3e-4: the settings it found most selective); QUICK is for CI."""

    authors: int = 40
    split: str = "forget10"
    seed: int = 0
    hidden: int = 128
    layers: int = 4
    pretrain_epochs: float = 10.0  # 0: no general-text pretraining
    pretrain_lr: float = 3e-3
    finetune_epochs: float = 15.0
    finetune_lr: float = 1e-3
    unlearn_epochs: float = 10.0
    unlearn_lr: float = 3e-4
    batch_size: int = 32
    alpha: float = 4.0
    kl_weight: float = 1.0
    max_items: int | None = 40  # evaluated rows per retain/general set
    methods: tuple[str, ...] = ("mox", "mox-momentum", "mox-targeted", "task-vector", "ga",
                                "graddiff", "npo")


QUICK = DemoConfig(authors=10, hidden=32, layers=2, pretrain_epochs=0.0, finetune_epochs=2.0,
                   finetune_lr=3e-3, unlearn_epochs=2.0, max_items=16, batch_size=32,
                   methods=("mox", "ga"))


def unlearn_kwargs(method: str, cfg: DemoConfig) -> dict:
    """moxkit.train.unlearn's arguments for a demo method name."""
    from .tofu_mini import REFUSAL

    base, _, variant = method.partition("-")
    if method == "task-vector":
        return {"method": "task-vector", "alpha": cfg.alpha}
    if base == "mox":
        kw = {"method": "mox", "alpha": cfg.alpha, "kl_weight": cfg.kl_weight}
        if variant == "momentum":
            kw["momentum_eta"] = 0.675
        elif variant == "targeted":
            kw["target_answer"] = REFUSAL
        elif variant:
            raise MoxError(f"demo method {method!r}: unknown MOX variant")
        return kw
    from .train import METHODS

    if method not in METHODS:
        raise MoxError(f"demo method {method!r}: expected mox[-momentum|-targeted] or one of "
                       f"{', '.join(METHODS)}")
    return {"method": method}


@dataclass
class DemoResult:
    rows: list[dict]  # one per model: name + summary metrics
    table: str
    plot: Path
    summary: Path


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _check_config(out: Path, cfg: DemoConfig, force: bool) -> None:
    """Results under OUT are reused only if they were made with the same settings."""
    path = out / CONFIG_FILE
    wanted = json.loads(json.dumps(asdict(cfg)))
    if path.is_file() and not force:
        if json.loads(path.read_text()) != wanted:
            raise MoxError(f"{out} holds a demo made with other settings ({path}); "
                           "choose another --out or pass --force to start over")
        return
    if force and out.exists():
        import shutil

        shutil.rmtree(out)
    write_json(path, wanted)


def run_demo(out: str | Path, cfg: DemoConfig = DemoConfig(), *, force: bool = False,
             progress: bool = True, log: Callable[[str], None] = print) -> DemoResult:
    """Run (or resume) the demo under `out`; returns the comparison."""
    import torch

    from .eval.evaluate import (
        EvalConfig,
        compare_with_retain,
        evaluate_model,
        load_model,
        retain_reference,
    )
    from .eval.plots import plot_methods
    from .tiny import build_tiny_llama
    from .tofu_mini import write
    from .train import TrainConfig, finetune, unlearn

    out = Path(out)
    _check_config(out, cfg, force)
    data = out / "data"
    if not data.is_dir():
        log(f"demo: writing tofu-mini ({cfg.authors} authors) to {data}")
        write(data, n_authors=cfg.authors, seed=cfg.seed)
    split = data / cfg.split
    if not split.is_dir():
        raise MoxError(f"demo split {cfg.split!r}: not in {data}")
    models = out / "models"

    def train_config(epochs: float, lr: float) -> TrainConfig:
        return TrainConfig(epochs=epochs, lr=lr, batch_size=cfg.batch_size, seed=cfg.seed,
                           warmup_epochs=min(1.0, epochs / 4), bf16=False, progress=progress)

    def trained(name: str, what: str, fn) -> Path:
        path = models / name
        if path.is_dir():
            log(f"demo: reusing {what} ({path})")
        else:
            log(f"demo: training {what}")
            fn(path)
        return path

    start = models / "base"
    if not start.is_dir():
        from transformers import AutoTokenizer

        from .tiny import save_tiny_model

        tok = AutoTokenizer.from_pretrained(data / "tokenizer")
        model = build_tiny_llama(len(tok), hidden_size=cfg.hidden, num_layers=cfg.layers,
                                 intermediate_size=2 * cfg.hidden, seed=cfg.seed)
        save_tiny_model(model, tok, start)
    if cfg.pretrain_epochs > 0:
        base = start
        start = trained("pretrained", "the base model on general text",
                        lambda p: finetune(base, str(data / "pretrain.jsonl"), p,
                                           config=train_config(cfg.pretrain_epochs,
                                                               cfg.pretrain_lr)))
    ft = train_config(cfg.finetune_epochs, cfg.finetune_lr)
    reference = trained("reference", "the reference model on all authors",
                        lambda p: finetune(start, _rows(data / "full.jsonl")
                                           + _rows(data / "full_text.jsonl"), p, config=ft))
    retain = trained("retain", "the retain-only model",
                     lambda p: finetune(start, _rows(split / "retain_train.jsonl")
                                        + _rows(split / "retain_text.jsonl"), p, config=ft))
    ul = train_config(cfg.unlearn_epochs, cfg.unlearn_lr)
    forgot = {}
    for method in cfg.methods:
        kwargs = unlearn_kwargs(method, cfg)
        forgot[method] = trained(
            method, f"{method} (unlearning {cfg.split})",
            lambda p, kw=kwargs: unlearn(reference, str(split / "forget.jsonl"),
                                         str(split / "retain.jsonl"), p, config=ul, **kw))

    ecfg = EvalConfig(max_items=cfg.max_items, max_new_tokens=20)
    reports = out / "reports"

    def report(name: str, path: Path, ref: dict | None) -> dict:
        file = reports / f"{name}.json"
        if file.is_file():
            return json.loads(file.read_text())
        log(f"demo: evaluating {name}")
        model, tok = load_model(path, "cpu")
        with torch.no_grad():
            rep = evaluate_model(model, tok, split, retain=ref, cfg=ecfg)
        rep["model"] = str(path)
        write_json(file, rep)
        return rep

    retain_rep = report("retain", retain, None)
    ref = retain_reference(retain_rep, split, ecfg)
    # the retain-only model against itself: forget quality 1 and PrivLeak 0 by construction
    rows = [{"name": "retain-only (target)", **retain_rep["summary"],
             **compare_with_retain(retain_rep, ref)},
            {"name": "reference (before)", **report("reference", reference, ref)["summary"]}]
    rows += [{"name": m, **report(m, forgot[m], ref)["summary"]} for m in cfg.methods]
    table = format_table(rows, HEADLINE, "name")
    plot = plot_methods(rows, out / "demo.png",
                        f"tofu-mini {cfg.split}: unlearning methods (α = {cfg.alpha:g} for MOX)")
    summary = write_json(out / "demo_summary.json", {"config": asdict(cfg), "rows": rows})
    return DemoResult(rows, table, plot, summary)

