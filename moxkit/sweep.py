"""`moxkit sweep`: evaluate the forget model (1+α)·REF − α·MEM at several α and pick one.

Extrapolation costs one pass over the weights, far less than the training that produced MEM,
so choosing α by looking is affordable. Small models are extrapolated in memory; large ones go
through the streaming engine (moxkit.extrapolate) into a scratch directory, one α at a time, so
memory never holds more than the model being evaluated.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .errors import MoxError
from .eval.evaluate import EvalConfig, evaluate_model, load_model, retain_reference
from .eval.report import HEADLINE, format_table, write_json

# forget metrics a rule can use: lower means more forgotten
FORGET_METRICS = ("forget_prob", "forget_rouge_recall", "knowmem_forget", "verbmem_forget")
IN_MEMORY_LIMIT = 2 << 30  # weights up to this size are extrapolated in memory


@dataclass
class SweepResult:
    rows: list[dict]  # one per α (α = 0 is REF itself), with the summary metrics
    picked: float | None  # the α the rule picks, None if no α qualifies
    rule: str
    retain_summary: dict = field(default_factory=dict)
    plot: Path | None = None
    report: Path | None = None

    def table(self) -> str:
        rows = [{**r, "α": f"{r['alpha']:g}" + (" ←" if r["alpha"] == self.picked else "")}
                for r in self.rows]
        return format_table(rows, HEADLINE, "α")


def parse_alphas(text: str) -> list[float]:
    """'0.5,1,2' -> [0.5, 1.0, 2.0]; each α must be a positive number."""
    try:
        alphas = [float(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise MoxError(f"--alphas {text!r}: expected comma-separated numbers") from None
    if not alphas or any(not a > 0 for a in alphas):
        raise MoxError(f"--alphas {text!r}: expected positive numbers")
    return sorted(set(alphas))


def pick_alpha(rows: list[dict], retain_summary: dict, metric: str) -> float | None:
    """The largest-utility α among those whose forget metric is at or below the retain-only
    model's (forgotten as thoroughly as a model that never saw the forget set)."""
    if metric not in retain_summary:
        return None
    ok = [r for r in rows if r["alpha"] > 0 and r.get(metric, float("inf"))
          <= retain_summary[metric]]
    if not ok:
        return None
    return max(ok, key=lambda r: (r.get("model_utility", 0.0), -r["alpha"]))["alpha"]


def _weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def _forget_models(ref: Path, mem: Path, alphas: list[float], on_disk: bool, device: str):
    """Yield (α, model, tokenizer) for α = 0 (REF) and each α, one model alive at a time."""
    import torch

    ref_model, tokenizer = load_model(ref, device)
    yield 0.0, ref_model, tokenizer
    if on_disk:
        from .stream import extrapolate

        del ref_model
        scratch = Path(tempfile.mkdtemp(prefix=".moxkit-sweep-"))
        try:
            for alpha in alphas:
                out = scratch / f"alpha-{alpha:g}"
                extrapolate(ref, mem, out, alpha, device=device, progress=False)
                model, tok = load_model(out, device)
                yield alpha, model, tok
                del model
                shutil.rmtree(out)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    else:
        from .train import extrapolate_model

        mem_model, _ = load_model(mem, device)
        for alpha in alphas:
            with torch.no_grad():
                yield alpha, extrapolate_model(ref_model, mem_model, alpha).eval(), tokenizer


def sweep(ref: str | Path, mem: str | Path, alphas: list[float], data_dir: str | Path, *,
          retain_model: str | Path | None = None, out: str | Path | None = None,
          cfg: EvalConfig | None = None, metric: str = "forget_prob",
          on_disk: bool | None = None, device: str = "auto", progress: bool = True) -> SweepResult:
    """Evaluate REF and (1+α)·REF − α·MEM for each α on `data_dir`; with `retain_model`, pick α
    by the rule (see pick_alpha); with `out`, write sweep.json and sweep.png there."""
    ref, mem = Path(ref), Path(mem)
    for p, name in ((ref, "REF"), (mem, "MEM")):
        if not (p / "config.json").is_file():
            raise MoxError(f"{name} {p}: not a model directory (no config.json)")
    if metric not in FORGET_METRICS:
        raise MoxError(f"--metric {metric}: choose one of {', '.join(FORGET_METRICS)}")
    cfg = cfg or EvalConfig()
    retain = retain_reference(retain_model, data_dir, cfg, device) if retain_model else None
    if on_disk is None:
        on_disk = 3 * _weights_bytes(ref) > IN_MEMORY_LIMIT
    rows = []
    models = _forget_models(ref, mem, alphas, on_disk, device)
    for alpha, model, tok in tqdm(models, total=len(alphas) + 1, desc="sweep", unit="α",
                                  disable=not progress):
        report = evaluate_model(model, tok, data_dir, retain=retain, cfg=cfg)
        rows.append({"alpha": alpha, **report["summary"]})
    retain_summary = retain["summary"] if retain else {}
    result = SweepResult(rows, pick_alpha(rows, retain_summary, metric),
                         f"largest model_utility with {metric} <= the retain-only model's",
                         retain_summary)
    if out is not None:
        out = Path(out)
        result.report = write_json(out / "sweep.json", {
            "ref": str(ref), "mem": str(mem), "data": str(data_dir), "rule": result.rule,
            "picked_alpha": result.picked, "retain_model": retain_summary, "rows": rows})
        from .eval.plots import plot_sweep

        result.plot = plot_sweep(result, out / "sweep.png", metric)
    return result
