"""`moxkit eval`: TOFU and MUSE metrics of one model, computed as those benchmarks define them.

TOFU (per QA set): answer probability (per-token geometric mean; on real authors and world facts
the true answer's share among it and the perturbed ones), ROUGE-L recall with Porter stemming of
the greedy answer (up to 200 new tokens) against the answer, truth ratio (paraphrased answer vs
perturbed on forget/retain, the answer itself on real authors/world facts); forget quality (KS
test against the retain-only model's forget-set truth ratios); model utility (harmonic mean of
those 3 numbers over retain, real authors and world facts: TOFU's 9). MUSE: KnowMem (ROUGE-L F1,
no stemming, of few-shot greedy answers, 32 new tokens), VerbMem (ROUGE-L F1 of 128-token greedy
continuations of the verbmem prompts), PrivLeak (Min-40% membership AUC, forget vs holdout,
relative to the retain-only model's). Where moxkit departs from a definition, the report's
`notes` say so beside the number.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import hf
from ..fields import check
from ..hf import resolve_device
from . import metrics as M
from .config import (
    MUSE_KNOWMEM_TOKENS,
    MUSE_MIN_K,
    MUSE_VERBMEM_TOKENS,
    TOFU_DS_SIZE,
    TOFU_MAX_NEW_TOKENS,
    TOFU_UTILITY_SETS,
    EvalConfig,
)
from .data import (
    EvalData,
    KnowMemSet,
    QASet,
    check_retain_source,
    load_eval_data,
    preflight,
    retain_summary,
)
from .generation import (
    cut_at_next_question,
    decode_as_muse,
    few_shot_prompt,
    greedy_answers,
    greedy_generate_ids,
    greedy_text_continuations,
)
from .report import write_json
from .rouge import rouge_l
from .scoring import answer_logprobs, text_token_stats


def load_model(path: str | Path, device: str = "auto", name: str = "model"):
    """(model, tokenizer) from a model folder, in eval mode (through moxkit.hf): fp32 on the CPU,
    the stored dtype on a GPU."""
    dev = resolve_device(device)
    loaded = hf.load_model(
        path, name, dtype=torch.float32 if dev.type == "cpu" else "auto", device=dev
    )
    return loaded.model, loaded.tokenizer


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _qa_set(model, tokenizer, qa: QASet, cfg: EvalConfig) -> dict:
    """Per-item and aggregate TOFU numbers of one QA set."""
    rows = qa.rows
    qs = [r["question"] for r in rows]

    def logprobs(questions, answers):
        return answer_logprobs(
            model, tokenizer, questions, answers, cfg.batch_size, cfg.chat_template
        )

    gold = logprobs(qs, [r["answer"] for r in rows])
    base = gold if qa.base_key == "answer" else logprobs(qs, [r[qa.base_key] for r in rows])
    flat = iter(
        logprobs(
            [q for q, r in zip(qs, rows, strict=True) for _ in r["perturbed_answer"]],
            [p for r in rows for p in r["perturbed_answer"]],
        )
    )
    pert = [[next(flat) for _ in r["perturbed_answer"]] for r in rows]
    secondary = qa.kind == "secondary"
    items = [
        {
            "question": r["question"],
            "answer": r["answer"],
            "prob": M.option_prob(g, pe) if secondary else M.normalized_prob(*g),
            "truth_ratio": M.truth_ratio(b, pe),
        }
        for r, g, b, pe in zip(rows, gold, base, pert, strict=True)
    ]
    summary = {"items": len(items), "prob": _mean(it["prob"] for it in items)}
    if cfg.generate:
        generated = greedy_answers(
            model, tokenizer, qs, cfg.max_new_tokens, cfg.batch_size, cfg.chat_template
        )
        for it, gen in zip(items, generated, strict=True):
            it.update(generated=gen, rouge_recall=rouge_l(it["answer"], gen, stem=True).recall)
        summary["rouge_recall"] = _mean(it["rouge_recall"] for it in items)
    summary["truth_ratio"] = M.truth_ratio_stat(
        [it["truth_ratio"] for it in items], forget=qa.kind == "forget"
    )
    return {"summary": summary, "items": items, "source": qa.source}


def _knowmem_set(model, tokenizer, km: KnowMemSet, cfg: EvalConfig, done: dict) -> dict:
    """MUSE's KnowMem items: ROUGE-L F1 (no stemming) of each answer against the gold one."""
    if km.icl is None:  # zero-shot: the answers the QA set already generated
        generated = [it["generated"] for it in done[km.qa_set]["items"]]
    else:
        prompts = [few_shot_prompt(km.icl, r["question"]) for r in km.rows]
        raw = greedy_text_continuations(
            model, tokenizer, prompts, cfg.knowmem_max_new_tokens, cfg.batch_size
        )
        generated = [cut_at_next_question(g) for g in raw]
    items = [
        {
            "question": r["question"],
            "answer": r["answer"],
            "generated": g,
            "rouge_f1": rouge_l(r["answer"], g).f1,
        }
        for r, g in zip(km.rows, generated, strict=True)
    ]
    return {"items": items, "source": km.source}


def _verbmem(model, tokenizer, rows: list[dict], cfg: EvalConfig, source: str) -> dict:
    """MUSE's VerbMem items: ROUGE-L F1 (no stemming) of the greedy continuation against the
    true one, both at most verbmem_max_new_tokens tokens. MUSE rows give {prompt, gt} (the gt
    cut to that many tokens, as MUSE does); moxkit rows give {text}: the first verbmem_prefix
    of its tokens is the prompt and what follows the truth."""
    n = cfg.verbmem_max_new_tokens
    if "text" in rows[0]:
        encoded = [tokenizer(r["text"])["input_ids"] for r in rows]
        cuts = [max(2, int(len(e) * cfg.verbmem_prefix)) for e in encoded]
        truth_ids = [e[c : c + n] for e, c in zip(encoded, cuts, strict=True)]
        gen = greedy_generate_ids(
            model,
            tokenizer,
            [e[:c] for e, c in zip(encoded, cuts, strict=True)],
            max(len(t) for t in truth_ids) or 1,
            cfg.batch_size,
        )
        truths = [decode_as_muse(tokenizer, t) for t in truth_ids]
        outputs = [
            decode_as_muse(tokenizer, g[: len(t)]) for g, t in zip(gen, truth_ids, strict=True)
        ]
    else:
        truths = [decode_as_muse(tokenizer, tokenizer(r["gt"])["input_ids"][:n]) for r in rows]
        outputs = greedy_text_continuations(
            model, tokenizer, [r["prompt"] for r in rows], n, cfg.batch_size
        )
    items = [
        {"truth": t, "generated": o, "rouge_f1": rouge_l(t, o).f1}
        for t, o in zip(truths, outputs, strict=True)
    ]
    return {"items": items, "source": source}


def _membership(model, tokenizer, texts: list[str], cfg: EvalConfig) -> dict:
    """Min-K% and Min-K%++ scores of each text (higher = looks more like training data)."""
    stats = text_token_stats(model, tokenizer, texts, cfg.batch_size)
    return {
        "items": [
            {
                "min_k": M.min_k(s.logprobs, cfg.min_k),
                "min_k_pp": M.min_k_plus_plus(s.logprobs, s.mu, s.sigma, cfg.min_k),
            }
            for s in stats
        ]
    }


def _notes(data: EvalData, out: dict, summary: dict, cfg: EvalConfig) -> dict[str, str]:
    """Where a number departs from the benchmark's own definition, and how."""
    notes: dict[str, str] = {}
    if "model_utility" in summary:
        sets = [n for n in out if n in data.qa and data.qa[n].kind != "forget"]
        if sorted(sets) != sorted(TOFU_UTILITY_SETS):
            notes["model_utility"] = (
                f"over {', '.join(sets)} ({3 * len(sets)} numbers); "
                "TOFU's: retain, real_authors, world_facts (9)"
            )
    forget = data.qa.get("forget")
    if forget is not None and len(forget.rows) > TOFU_DS_SIZE:
        notes["forget_quality"] = (
            f"all {len(forget.rows)} forget rows (TOFU's script: the "
            f"first {TOFU_DS_SIZE}; open-unlearning: all)"
        )
    if cfg.max_new_tokens != TOFU_MAX_NEW_TOKENS:
        for name in data.qa:
            if f"{name}_rouge_recall" in summary:
                notes[f"{name}_rouge_recall"] = (
                    f"answers cut at {cfg.max_new_tokens} new tokens (TOFU: {TOFU_MAX_NEW_TOKENS})"
                )
    for name, km in data.knowmem.items():
        if f"knowmem_{name}" not in summary:
            continue
        if km.icl is None:
            notes[f"knowmem_{name}"] = (
                "zero-shot on the trained prompt format, TOFU's answers "
                "(MUSE: few-shot, add knowmem_icl.jsonl)"
            )
        elif cfg.knowmem_max_new_tokens != MUSE_KNOWMEM_TOKENS:
            notes[f"knowmem_{name}"] = (
                f"answers cut at {cfg.knowmem_max_new_tokens} new tokens "
                f"(MUSE: {MUSE_KNOWMEM_TOKENS})"
            )
    if "verbmem_forget" in summary and data.layout == "moxkit":
        notes["verbmem_forget"] = (
            f"continuation of the first {cfg.verbmem_prefix:g} of each "
            f"forget text (MUSE: its verbmem prompts, "
            f"{MUSE_VERBMEM_TOKENS} tokens)"
        )
    elif "verbmem_forget" in summary and cfg.verbmem_max_new_tokens != MUSE_VERBMEM_TOKENS:
        notes["verbmem_forget"] = (
            f"continuations cut at {cfg.verbmem_max_new_tokens} new "
            f"tokens (MUSE: {MUSE_VERBMEM_TOKENS})"
        )
    if "mia_auc" in summary and (cfg.mia != "min_k" or cfg.min_k != MUSE_MIN_K):
        score = "Min-K%++" if cfg.mia == "min_k_pp" else "Min-K%"
        note = f"{score} with k = {cfg.min_k:g} (MUSE: Min-K% with k = {MUSE_MIN_K:g})"
        notes["mia_auc"] = note
        notes["privleak"] = note
    return notes


def evaluate_model(
    model,
    tokenizer,
    data: str | Path | EvalData,
    *,
    retain: dict | None = None,
    cfg: EvalConfig | None = None,
    only: tuple[str, ...] | None = None,
    progress: bool = False,
) -> dict:
    """The report of a loaded model: per-set items and summaries, the summary metrics, notes
    on departures from the benchmarks' definitions, and the files read. `data` is an evaluation
    directory or its load_eval_data(); `retain` is retain_reference(...) (without it, forget
    quality and PrivLeak are left out); `only` restricts to these sets (QA set names,
    "forget_text", "holdout_text", "knowmem_*", "verbmem_forget")."""
    cfg = cfg or EvalConfig()
    check(cfg)
    if not isinstance(data, EvalData):
        data = load_eval_data(data, split=cfg.split, max_items=cfg.max_items)
    jobs = [(n, lambda qa=qa: _qa_set(model, tokenizer, qa, cfg)) for n, qa in data.qa.items()]
    jobs += [
        (f"{n}_text", lambda t=t: _membership(model, tokenizer, t, cfg))
        for n, t in data.texts.items()
    ]
    if cfg.generate:
        jobs += [
            (f"knowmem_{n}", lambda km=km: _knowmem_set(model, tokenizer, km, cfg, out))
            for n, km in data.knowmem.items()
        ]
        if data.verbmem:
            jobs.append(
                (
                    "verbmem_forget",
                    lambda: _verbmem(model, tokenizer, data.verbmem, cfg, data.verbmem_source),
                )
            )
    jobs = [(n, job) for n, job in jobs if only is None or n in only]
    out: dict = {}
    with torch.inference_mode():
        for name, job in tqdm(jobs, desc="eval", disable=not progress, unit="set"):
            out[name] = job()

    summary: dict = {}
    for name, res in out.items():
        for key, value in res.get("summary", {}).items():
            if key != "items":
                summary[f"{name}_{key}"] = value
    utility = [n for n in out if n in data.qa and data.qa[n].kind != "forget"]
    if utility and cfg.generate:
        summary["model_utility"] = M.harmonic_mean(
            [out[n]["summary"][k] for n in utility for k in ("prob", "rouge_recall", "truth_ratio")]
        )
    for name in ("knowmem_forget", "knowmem_retain", "verbmem_forget"):
        if name in out:
            summary[name] = _mean(it["rouge_f1"] for it in out[name]["items"])
    if "forget_text" in out and "holdout_text" in out:
        summary["mia_auc"] = M.membership_auc(
            [it[cfg.mia] for it in out["forget_text"]["items"]],
            [it[cfg.mia] for it in out["holdout_text"]["items"]],
        )
    report = {
        "data": data.directory,
        "layout": data.layout,
        "files": data.files,
        "config": asdict(cfg),
        "summary": summary,
        "sets": out,
    }
    if retain is not None:
        summary.update(compare_with_retain(report, retain))
    report["notes"] = _notes(data, out, summary, cfg)
    return report


def compare_with_retain(report: dict, retain: dict) -> dict:
    """Forget quality (KS p-value and statistic) and PrivLeak of a report against the
    retain-only model's reference (see retain_reference)."""
    out = {}
    if "forget" in report["sets"] and retain.get("truth_ratios"):
        fq, ks = M.forget_quality(
            [it["truth_ratio"] for it in report["sets"]["forget"]["items"]], retain["truth_ratios"]
        )
        out.update(forget_quality=fq, ks_statistic=ks)
    auc = report["summary"].get("mia_auc")
    if retain.get("mia_auc") and auc is not None:  # undefined for a retain AUC of 0
        out["privleak"] = M.priv_leak(auc, retain["mia_auc"])
    return out


# what the retain-only model is evaluated on: the forget side, which the others are compared with
RETAIN_REFERENCE_SETS = (
    "forget",
    "knowmem_forget",
    "verbmem_forget",
    "forget_text",
    "holdout_text",
)


def retain_reference(
    retain: str | Path | dict, data: str | Path | EvalData, cfg: EvalConfig, device: str = "auto"
) -> dict:
    """What forget quality and PrivLeak compare against: the retain-only model's forget-set truth
    ratios and membership AUC, from a saved `moxkit eval` report (a .json file or dict, checked
    by moxkit.eval.data.retain_summary) or by evaluating the retain-only model directory on the
    forget and membership sets. Its summary comes along: a sweep compares forget metrics with
    it."""
    if isinstance(retain, dict):
        return retain_summary(retain, "retain report")
    checked = check_retain_source(retain)
    if checked is not None:
        return checked
    model, tokenizer = load_model(retain, device, "retain_model")
    report = evaluate_model(model, tokenizer, data, cfg=cfg, only=RETAIN_REFERENCE_SETS)
    return retain_summary(report, "retain_model")


def evaluate(
    model_dir: str | Path,
    data_dir: str | Path,
    *,
    retain_model: str | Path | None = None,
    cfg: EvalConfig | None = None,
    device: str = "auto",
    progress: bool = True,
    revision: str | None = None,
    out: str | Path | None = None,
    force: bool = False,
) -> dict:
    """Evaluate the model `model_dir` (a folder or a hub id) on `data_dir` (any layout
    moxkit.eval.data reads). `retain_model`: the retain-only model (folder or hub id) or its
    saved report. With `out`, the report is also written there as JSON (an existing file only
    with `force`, never an input). Every input and `out` are checked before a model is
    loaded."""
    cfg = cfg or EvalConfig()
    data, model_path, retain_path = preflight(
        model_dir, data_dir, retain_model, cfg, revision, out=out, force=force
    )
    ref = retain_reference(retain_path, data, cfg, device) if retain_path else None
    model, tokenizer = load_model(model_path, device)
    report = evaluate_model(model, tokenizer, data, retain=ref, cfg=cfg, progress=progress)
    report["model"] = str(model_dir)
    if out is not None:
        write_json(out, report, force=force)
    return report
