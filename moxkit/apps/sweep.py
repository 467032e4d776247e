"""`moxkit sweep`: evaluate the forget model (1+α)·REF − α·MEM at several α and pick one.

Extrapolation costs one pass over the weights, far less than the training that produced MEM,
so choosing α by looking is affordable. Small models are extrapolated in memory; large ones go
through the streaming engine (moxkit.extrapolate) into a scratch directory, one α at a time, so
memory never holds more than the model being evaluated. Everything a later step needs (the
settings, the evaluation sets, REF and MEM as a pair, the retain-only reference, the output
folder) is checked before the first evaluation, so no step fails after hours of work.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from .. import hf
from ..atomic import check_output, scratch
from ..engine.formula import check_alpha
from ..errors import InputError
from ..eval.config import EvalConfig
from ..eval.data import EvalData, inputs_of, preflight, resolve_model
from ..eval.report import HEADLINE, format_table, write_json

# forget metrics a rule can use: lower means more forgotten
FORGET_METRICS = ("forget_prob", "forget_rouge_recall", "knowmem_forget", "verbmem_forget")
IN_MEMORY_LIMIT = 2 << 30  # weights up to this size are extrapolated in memory
STUDY_ALPHAS = "1:8:0.5"  # the study's grid (issue 9): MOX's peak lies between the old 2 and 4
MAX_ALPHAS = 200
OUT_FILES = ("sweep.json", "sweep.png")  # what a sweep writes into its -o folder


@dataclass
class SweepResult:
    rows: list[dict]  # one per α (α = 0 is REF itself), with the summary metrics
    picked: float | None  # the α the rule picks, None if no α qualifies
    rule: str
    retain_summary: dict = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)  # departures from the benchmarks
    plot: Path | None = None
    report: Path | None = None
    match: dict | None = None  # matched forgetting: α, level, target, gap, evaluations

    def table(self) -> str:
        rows = [
            {**r, "α": f"{r['alpha']:g}" + (" ←" if r["alpha"] == self.picked else "")}
            for r in self.rows
        ]
        return format_table(rows, HEADLINE, "α", self.notes)


def _grid(part: str, text: str) -> list[float]:
    """START:STOP:STEP with STOP included; values rounded to the step's decimals so that
    1:2:0.1 gives 1.3, not 1.3000000000000003."""
    try:
        start, stop, step = (float(x) for x in part.split(":"))
    except ValueError:
        raise InputError(f"alphas {text!r}: a range is START:STOP:STEP (e.g. 1:8:0.5)",
                         params=("alphas",)) from None  # fmt: skip
    if not (math.isfinite(start) and math.isfinite(stop) and step > 0 and stop >= start):
        raise InputError(f"alphas {text!r}: a range needs START <= STOP and STEP > 0",
                         params=("alphas",))  # fmt: skip
    count = math.floor((stop - start) / step + 1e-9) + 1
    if count > MAX_ALPHAS:
        raise InputError(
            f"alphas {text!r}: {count} values (at most {MAX_ALPHAS})", params=("alphas",)
        )
    digits = max(len(f"{x:.10g}".partition(".")[2]) for x in (start, step))
    return [round(start + i * step, digits) for i in range(count)]


def parse_alphas(text: str) -> list[float]:
    """Comma-separated α values and ranges: '0.5,1,2', '1:8:0.5' (1, 1.5, ..., 8) or both
    ('0.5,1:8:0.5'). Each α must be a positive number moxkit can extrapolate with."""
    alphas: list[float] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if ":" in part:
            alphas += _grid(part, text)
            continue
        try:
            alphas.append(float(part))
        except ValueError:
            raise InputError(f"alphas {text!r}: expected numbers or START:STOP:STEP",
                             params=("alphas",)) from None  # fmt: skip
    if not alphas or any(not a > 0 for a in alphas):
        raise InputError(f"alphas {text!r}: expected positive numbers", params=("alphas",))
    for a in alphas:
        check_alpha(a, "alphas")
    alphas = sorted(set(alphas))
    if len(alphas) > MAX_ALPHAS:
        raise InputError(f"alphas {text!r}: {len(alphas)} values (at most {MAX_ALPHAS})",
                         params=("alphas",))  # fmt: skip
    return alphas


def pick_alpha(rows: list[dict], retain_summary: dict, metric: str) -> float | None:
    """The largest-utility α among those whose forget metric is at or below the retain-only
    model's (forgotten as thoroughly as a model that never saw the forget set)."""
    if metric not in retain_summary:
        return None
    ok = [
        r for r in rows if r["alpha"] > 0 and r.get(metric, float("inf")) <= retain_summary[metric]
    ]
    if not ok:
        return None
    return max(ok, key=lambda r: (r.get("model_utility", 0.0), -r["alpha"]))["alpha"]


def _weights_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


def on_disk_needed(ref: Path) -> bool:
    """Three fp32-sized copies (REF, MEM, the forget model) do not fit the in-memory limit."""
    return 3 * _weights_bytes(ref) > IN_MEMORY_LIMIT


def match_inputs(match, revision: str | None) -> list[Path]:
    """Check a matched-forgetting request before any model loads; the paths it reads."""
    from ..atomic import tree_inputs
    from ..text import load_rows
    from ..train.config import parse_target

    match.validate()
    load_rows(match.match_rows, "match_rows")
    paths = [Path(match.match_rows)]
    kind, value = parse_target(match.match_target)
    if kind == "model":
        paths += tree_inputs(hf.check_model_dir(value, "match_target", True, revision))
    elif kind == "unknown":
        load_rows(value, "match_target")
        paths.append(Path(value))
    return paths


def matched_alpha(ref: Path, mem: Path, match, revision: str | None, device: str) -> dict:
    """The α at which (1+α)·REF − α·MEM reaches the match target (moxkit.matching)."""
    import torch

    from ..eval.evaluate import load_model
    from ..matching import answer_logprob, match_alpha, target_level
    from ..text import load_rows
    from ..train.config import parse_target

    ref_model, tok = load_model(ref, device, "ref")
    mem_model, _ = load_model(mem, device, "mem")
    rows = load_rows(match.match_rows, "match_rows")

    def level(model) -> float:
        with torch.no_grad():
            return answer_logprob(model, tok, rows)

    kind, value = parse_target(match.match_target)
    if kind == "model":
        value = hf.check_model_dir(value, "match_target", True, revision)
    target = target_level(
        kind, value, reference=ref_model, level=level,
        level_of_rows=lambda model, source: answer_logprob(model, tok, source),
        load=lambda folder: load_model(folder, device, "match_target")[0],
    )  # fmt: skip
    found, _ = match_alpha(ref_model, mem_model, level, target)
    if not found.reached:
        raise InputError(f"match_target: no α up to {found.evaluations[-1][0]:g} brings the "
                       f"level to {target:.4g} (at that α: {found.level:.4g})",
                       params=("match_target",))  # fmt: skip
    return {"strength": found.strength, "level": found.level, "target": target,
            "gap": found.gap, "evaluations": len(found.evaluations)}  # fmt: skip


def _forget_models(
    ref: Path, mem: Path, alphas: list[float], on_disk: bool, device: str, scratch: Path | None
):
    """Yield (α, model, tokenizer) for α = 0 (REF) and each α, one model alive at a time."""
    import torch

    from ..eval.evaluate import load_model

    ref_model, tokenizer = load_model(ref, device, "ref")
    yield 0.0, ref_model, tokenizer
    if on_disk:
        from ..engine.stream import extrapolate

        del ref_model
        for alpha in alphas:
            out = scratch / f"alpha-{alpha:g}"
            extrapolate(ref, mem, alpha, out, device=device, progress=False)
            model, tok = load_model(out, device, f"the forget model at α = {alpha:g}")
            yield alpha, model, tok
            del model
            shutil.rmtree(out)
    else:
        from ..train import extrapolate_model

        mem_model, _ = load_model(mem, device, "mem")
        for alpha in alphas:
            with torch.no_grad():
                yield alpha, extrapolate_model(ref_model, mem_model, alpha).eval(), tokenizer


def check_sweep(
    ref: str | Path,
    mem: str | Path,
    alphas: list[float],
    data_dir,
    retain_model,
    out,
    cfg: EvalConfig,
    metric: str,
    revision: str | None = None,
    force: bool = False,
    match=None,
) -> tuple[Path, Path, Path | None, EvalData]:
    """Every check a sweep needs, before any model is loaded: the settings and evaluation sets,
    REF, MEM and retain_model (hub ids resolved to local paths, returned), REF and MEM as a
    pair the engine accepts (a dry run: headers only), and that OUT's report and plot can be
    written: not over an existing one without `force`, never inside or over an input."""
    if metric not in FORGET_METRICS:
        raise InputError(
            f"metric {metric}: choose one of {', '.join(FORGET_METRICS)}", params=("metric",)
        )
    if not alphas:
        raise InputError("alphas: no α to evaluate", params=("alphas",))
    for alpha in alphas:
        check_alpha(alpha, "alphas")
    data, ref, retain_model = preflight(ref, data_dir, retain_model, cfg, revision, "ref")
    mem = hf.check_model_dir(resolve_model(mem, revision, "mem"), "mem", need_tokenizer=False)
    measured = {
        "forget_prob": "forget" in data.qa,
        "forget_rouge_recall": "forget" in data.qa,
        "knowmem_forget": "forget" in data.knowmem,
        "verbmem_forget": bool(data.verbmem),
    }
    if retain_model is not None and not measured[metric]:
        raise InputError(f"metric {metric}: {data.directory} ({data.layout} layout) has no set "
                       "that measures it", params=("metric",))  # fmt: skip
    from ..engine.stream import extrapolate

    if match is not None and match.active:
        if on_disk_needed(ref):
            raise InputError("match_rows: matched forgetting extrapolates in memory; REF is too "
                           "large for the in-memory sweep", params=("match_rows",))  # fmt: skip
        match_inputs(match, revision)
    with tempfile.TemporaryDirectory(prefix=".moxkit-sweep-check-") as tmp:
        extrapolate(ref, mem, alphas[-1], Path(tmp) / "forget", device="cpu", dry_run=True,
                    progress=False)  # fmt: skip
    if out is not None:
        inputs = inputs_of(data, ref, mem, retain_model)
        if match is not None and match.active:
            inputs += match_inputs(match, revision)
        for name in OUT_FILES:
            check_output(Path(out) / name, force=force, inputs=inputs, folder=False)
    return ref, mem, retain_model, data


def sweep(
    ref: str | Path,
    mem: str | Path,
    alphas: list[float],
    data_dir: str | Path,
    *,
    retain_model: str | Path | None = None,
    out: str | Path | None = None,
    cfg: EvalConfig | None = None,
    metric: str = "forget_prob",
    on_disk: bool | None = None,
    device: str = "auto",
    progress: bool = True,
    revision: str | None = None,
    force: bool = False,
    match=None,
) -> SweepResult:
    """Evaluate REF and (1+α)·REF − α·MEM for each α on `data_dir`; with `retain_model`, pick α
    by the rule (see pick_alpha); with `out`, write sweep.json and sweep.png in that folder
    (replacing earlier ones only with `force`). REF, MEM and `retain_model` may be hub ids
    (org/name[@revision])."""
    cfg = cfg or EvalConfig()
    ref, mem, retain_model, data = check_sweep(
        ref, mem, alphas, data_dir, retain_model, out, cfg, metric, revision, force, match
    )
    from ..eval.evaluate import evaluate_model, retain_reference  # torch: after the checks

    matched = None
    if match is not None and match.active:
        matched = matched_alpha(ref, mem, match, revision, device)
        alphas = sorted({*alphas, matched["strength"]})
        on_disk = False
    retain = retain_reference(retain_model, data, cfg, device) if retain_model else None
    if on_disk is None:
        on_disk = on_disk_needed(ref)
    rows = []
    work = Path(tempfile.mkdtemp(prefix=".moxkit-sweep-")) if on_disk else None
    try:
        with scratch(work) if work is not None else contextlib.nullcontext():
            models = _forget_models(ref, mem, alphas, on_disk, device, work)
            for alpha, model, tok in tqdm(
                models, total=len(alphas) + 1, desc="sweep", unit="α", disable=not progress
            ):
                report = evaluate_model(model, tok, data, retain=retain, cfg=cfg)
                rows.append({"alpha": alpha, **report["summary"]})
    finally:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
    retain_summary = retain["summary"] if retain else {}
    result = SweepResult(
        rows,
        pick_alpha(rows, retain_summary, metric),
        f"largest model_utility with {metric} <= the retain-only model's",
        retain_summary,
        report["notes"],
    )
    if matched is not None:
        result.picked, result.match = matched["strength"], matched
        result.rule = (f"matched forgetting: the α where the mean answer log-probability of "
                       f"the match rows reaches {matched['target']:.4g}")  # fmt: skip
    if out is not None:
        out = Path(out)
        result.report = write_json(
            out / "sweep.json",
            force=force,
            obj={
                "ref": str(ref),
                "mem": str(mem),
                "data": str(data_dir),
                "files": data.files,
                "config": asdict(cfg),
                "rule": result.rule,
                "picked_alpha": result.picked,
                "match": result.match,
                "retain_model": retain_summary,
                "notes": result.notes,
                "rows": rows,
            },
        )
        from ..eval.plots import plot_sweep

        result.plot = plot_sweep(result, out / "sweep.png", metric, force=force)
    return result
