"""`moxkit eval`: TOFU and MUSE metrics of one model on an evaluation directory.

TOFU (per QA set): answer probability, ROUGE-L recall of the greedy answer, truth ratio; on the
forget set, forget quality (KS test against the retain-only model's truth ratios); model utility
(harmonic mean over the retain and secondary sets). MUSE: VerbMem (ROUGE-L F1 of the greedy
continuation of the first half of each forget text), KnowMem (ROUGE-L F1 of answers on forget and
retain QA), PrivLeak (Min-K% membership AUC, forget vs holdout texts, relative to the
retain-only model's).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import MoxError
from . import metrics as M
from .data import load_eval_data
from .generation import greedy_answers, greedy_generate_ids
from .rouge import rouge_l
from .scoring import answer_logprobs, text_token_stats


@dataclass
class EvalConfig:
    batch_size: int = 32
    max_new_tokens: int = 32
    max_items: int | None = None  # per non-forget set, evenly spaced
    min_k: float = 0.2
    mia: str = "min_k"  # or "min_k_pp"
    verbmem_prefix: float = 0.5  # fraction of each forget text given as the prefix
    chat_template: bool = False  # format questions with the tokenizer's chat template
    generate: bool = True  # False: likelihood metrics only (no ROUGE, VerbMem, KnowMem, utility)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MoxError("--device cuda: no CUDA device is available")
    return torch.device(device)


def load_model(path: str | Path, device: str = "auto"):
    """(model, tokenizer) from a transformers model directory, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moxkit.train.models import no_transformers_bars

    p = Path(path)
    if not (p / "config.json").is_file():
        raise MoxError(f"{p}: not a model directory (no config.json)")
    dev = pick_device(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(p)
    except (OSError, ValueError) as exc:
        raise MoxError(f"{p}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None
    dtype = torch.float32 if dev.type == "cpu" else "auto"
    try:
        with no_transformers_bars():  # one bar per model would flood the demo's log
            model = AutoModelForCausalLM.from_pretrained(p, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise MoxError(f"{p}: cannot load the model ({str(exc).splitlines()[0]})") from None
    return model.to(dev).eval(), tokenizer


def _qa_set(model, tokenizer, rows: list[dict], kind: str, cfg: EvalConfig) -> dict:
    """Per-item and aggregate TOFU numbers of one QA set. kind: forget, retain or secondary."""
    qs = [r["question"] for r in rows]
    gold = answer_logprobs(model, tokenizer, qs, [r["answer"] for r in rows], cfg.batch_size,
                           cfg.chat_template)
    para = answer_logprobs(model, tokenizer, qs, [r["paraphrased_answer"] for r in rows],
                           cfg.batch_size, cfg.chat_template)
    flat_q = [q for q, r in zip(qs, rows, strict=True) for _ in r["perturbed_answer"]]
    flat_a = [p for r in rows for p in r["perturbed_answer"]]
    flat = iter(answer_logprobs(model, tokenizer, flat_q, flat_a, cfg.batch_size,
                                cfg.chat_template))
    pert = [[next(flat) for _ in r["perturbed_answer"]] for r in rows]
    items = [{"question": r["question"], "answer": r["answer"],
              "prob": M.option_prob(pa, pe) if kind == "secondary" else M.normalized_prob(*g),
              "truth_ratio": M.truth_ratio(pa, pe)}
             for r, g, pa, pe in zip(rows, gold, para, pert, strict=True)]
    if cfg.generate:
        generated = greedy_answers(model, tokenizer, qs, cfg.max_new_tokens, cfg.batch_size,
                                   cfg.chat_template)
        for it, gen in zip(items, generated, strict=True):
            rouge = rouge_l(it["answer"], gen)
            it.update(generated=gen, rouge_recall=rouge.recall, rouge_f1=rouge.f1)
    n = len(items)
    summary = {"items": n, "prob": sum(it["prob"] for it in items) / n}
    if cfg.generate:
        summary["rouge_recall"] = sum(it["rouge_recall"] for it in items) / n
        summary["rouge_f1"] = sum(it["rouge_f1"] for it in items) / n
    summary["truth_ratio"] = M.truth_ratio_stat([it["truth_ratio"] for it in items],
                                                forget=kind == "forget")
    return {"summary": summary, "items": items}


def _text_set(model, tokenizer, rows: list[dict], cfg: EvalConfig, verbmem: bool) -> dict:
    """Membership scores of each text and, for forget texts, VerbMem."""
    texts = [r["text"] for r in rows]
    token_stats = text_token_stats(model, tokenizer, texts, cfg.batch_size)
    items = [{"min_k": M.min_k(s.logprobs, cfg.min_k),
              "min_k_pp": M.min_k_plus_plus(s.logprobs, s.mu, s.sigma, cfg.min_k)}
             for s in token_stats]
    if verbmem and cfg.generate:
        encoded = [tokenizer(t)["input_ids"] for t in texts]
        cuts = [max(2, int(len(e) * cfg.verbmem_prefix)) for e in encoded]
        pairs = list(zip(encoded, cuts, strict=True))
        longest = max(len(e) - c for e, c in pairs) or 1
        conts = greedy_generate_ids(model, tokenizer, [e[:c] for e, c in pairs], longest,
                                    cfg.batch_size)
        for it, e, c, gen in zip(items, encoded, cuts, conts, strict=True):
            truth = tokenizer.decode(e[c:], skip_special_tokens=True)
            it["continuation"] = truth
            it["generated"] = tokenizer.decode(gen[: len(e) - c], skip_special_tokens=True)
            it["rouge_f1"] = rouge_l(truth, it["generated"]).f1
    return {"items": items}


def retain_reference(retain: str | Path | dict, data_dir: str | Path, cfg: EvalConfig,
                     device: str = "auto") -> dict:
    """What forget quality and PrivLeak compare against: the retain-only model's forget-set truth
    ratios and membership AUC, from a saved `moxkit eval` report (a .json file or dict) or by
    evaluating the retain-only model directory on the forget and membership sets. Its summary
    comes along: a sweep compares forget metrics with it."""
    if isinstance(retain, dict):
        report = retain
    elif Path(retain).is_file():
        try:
            report = json.loads(Path(retain).read_text())
            report["sets"]["forget"]["items"]
        except (ValueError, KeyError, TypeError):
            raise MoxError(f"--retain-model {retain}: not a `moxkit eval` report") from None
    else:
        model, tokenizer = load_model(retain, device)
        report = evaluate_model(model, tokenizer, data_dir, cfg=cfg,
                                only=("forget", "forget_text", "holdout_text"))
    ratios = [it["truth_ratio"] for it in report["sets"]["forget"]["items"]]
    return {"truth_ratios": ratios, "mia_auc": report["summary"].get("mia_auc"),
            "summary": report["summary"]}


def evaluate_model(model, tokenizer, data_dir: str | Path, *, retain: dict | None = None,
                   cfg: EvalConfig | None = None, only: tuple[str, ...] | None = None,
                   progress: bool = False) -> dict:
    """The report of a loaded model: per-set items and summaries, and the summary metrics.
    `retain` is `retain_reference(...)`; without it forget quality and PrivLeak are omitted."""
    cfg = cfg or EvalConfig()
    sets = load_eval_data(data_dir, cfg.max_items)
    names = [n for n in sets if only is None or n in only]
    out: dict = {}
    for name in tqdm(names, desc="eval", disable=not progress, unit="set"):
        if name.endswith("_text"):
            out[name] = _text_set(model, tokenizer, sets[name], cfg, name == "forget_text")
        else:
            kind = name if name in ("forget", "retain") else "secondary"
            out[name] = _qa_set(model, tokenizer, sets[name], kind, cfg)

    summary: dict = {}
    for name, res in out.items():
        for key, value in res.get("summary", {}).items():
            if key != "items":
                summary[f"{name}_{key}"] = value
    utility_sets = [n for n in out if n not in ("forget",) and "summary" in out[n]]
    if utility_sets and cfg.generate:
        summary["model_utility"] = M.harmonic_mean(
            [out[n]["summary"][k] for n in utility_sets
             for k in ("prob", "rouge_recall", "truth_ratio")])
    if "forget" in out and cfg.generate:
        summary["knowmem_forget"] = out["forget"]["summary"]["rouge_f1"]
    if "retain" in out and cfg.generate:
        summary["knowmem_retain"] = out["retain"]["summary"]["rouge_f1"]
    if "forget_text" in out and cfg.generate:
        its = out["forget_text"]["items"]
        summary["verbmem_forget"] = sum(it["rouge_f1"] for it in its) / len(its)
    if "forget_text" in out and "holdout_text" in out:
        summary["mia_auc"] = M.membership_auc([it[cfg.mia] for it in out["forget_text"]["items"]],
                                              [it[cfg.mia] for it in out["holdout_text"]["items"]])
    report = {"data": str(data_dir), "config": asdict(cfg), "summary": summary, "sets": out}
    if retain is not None and "forget" in out:
        summary.update(compare_with_retain(report, retain))
    return report


def compare_with_retain(report: dict, retain: dict) -> dict:
    """Forget quality (KS p-value and statistic) and PrivLeak of a report against the
    retain-only model's reference (see retain_reference)."""
    fq, ks = M.forget_quality([it["truth_ratio"] for it in report["sets"]["forget"]["items"]],
                              retain["truth_ratios"])
    out = {"forget_quality": fq, "ks_statistic": ks}
    auc = report["summary"].get("mia_auc")
    if retain.get("mia_auc") and auc is not None:  # undefined for a retain AUC of 0
        out["privleak"] = M.priv_leak(auc, retain["mia_auc"])
    return out


def evaluate(model_dir: str | Path, data_dir: str | Path, *, retain_model: str | Path | None = None,
             cfg: EvalConfig | None = None, device: str = "auto", progress: bool = True) -> dict:
    """Evaluate the model directory `model_dir` on `data_dir` (see moxkit.eval.data for the
    layout). `retain_model`: the retain-only model's directory or its saved report."""
    cfg = cfg or EvalConfig()
    load_eval_data(data_dir)  # a bad directory fails before any model is loaded
    ref = retain_reference(retain_model, data_dir, cfg, device) if retain_model else None
    model, tokenizer = load_model(model_dir, device)
    report = evaluate_model(model, tokenizer, data_dir, retain=ref, cfg=cfg, progress=progress)
    report["model"] = str(model_dir)
    return report
