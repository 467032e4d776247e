"""Targeted MOX: which reading of the paper's "additional forgetting loss" makes the forget
model give the replacement answer while keeping the retain facts?

Four ways to train θ_mem on the same tiny Llama that learned 32 made-up facts (8 forget,
24 retain) by heart, each extrapolated at the same α, compared with the reference:
  plain        memorize the forget set + KL on retain (MOX without a target)
  ascent       the earlier reading: also subtract NLL(target | θ_mem) inside memorization
               (weight 1): gradient ascent, unbounded
  descent-nll  also add NLL(target | θ_for), θ_for = (1+α)θ_ref − αθ_mem: ordinary descent
               in forget-model space (the gradient reaches θ_mem via −α), nothing else
  descent      moxkit's reading: descent-nll plus the retain KL at θ_for as well
Per forget model: how many forget questions it answers (greedy) with exactly the target, how
many still with the true answer, how many retain questions it answers correctly, and the mean
answer NLLs. Several reference seeds; everything on CPU in about a minute.

    .venv/bin/python studies/targeted_mox.py   # writes results/targeted_mox/targeted_mox.{md,json}
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import subprocess
import time
from pathlib import Path

import torch

from moxkit.apps.tiny import build_tiny_llama, build_word_tokenizer, tiny_facts
from moxkit.text import IGNORE, encode, load_rows
from moxkit.train import ExtrapolationConfig, TrainConfig, finetune, unlearn
from moxkit.train import session as session_module
from moxkit.train.objectives import sequence_nll
from moxkit.train.trainer import MoxTrainer

FORGET, RETAIN = tiny_facts(8, offset=0), tiny_facts(24, offset=8)
TARGET = "I don't know ."
REF = TrainConfig(epochs=150, lr=3e-3, batch_size=8, warmup_epochs=1, progress=False)
MEM = TrainConfig(epochs=32, lr=1e-3, batch_size=8, warmup_epochs=0, progress=False)
READINGS = ("plain", "ascent", "descent-nll", "descent")
RESULTS = Path(__file__).parent / "results" / "targeted_mox"


class AscentTargets(MoxTrainer):
    """The earlier reading, for comparison: L_mem − NLL(target | θ_mem)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        spec = self.spec
        self.spec = dataclasses.replace(spec, target_weight=0.0)
        try:
            loss = super().compute_loss(model, inputs)
        finally:
            self.spec = spec
        logits = self._forward(model, inputs, "target")
        return loss - sequence_nll(logits, inputs["target_labels"]).mean()


class TargetNllOnly(MoxTrainer):
    """Descent at θ_for on the target NLL alone (no retain KL at θ_for), for comparison."""

    def _targeted_terms(self, model, inputs, terms):
        logits = self._forget_model_logits(model, inputs, "target")
        return sequence_nll(logits, inputs["target_labels"]).mean()


def answers(model, tok, rows) -> list[list[int]]:
    """Greedy answer token ids (up to EOS) for each question."""
    out = []
    for row in rows:
        ids = torch.tensor([tok(row["question"])["input_ids"]])
        with torch.no_grad():
            gen = model.generate(
                ids,
                max_new_tokens=16,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
            )
        new = gen[0, ids.shape[1] :].tolist()
        out.append(new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new)
    return out


def answer_ids(tok, rows) -> list[list[int]]:
    examples = encode(load_rows(rows, "rows"), tok, 64, chat_template=False)
    return [[t for t in e.labels if t != IGNORE][:-1] for e in examples]  # without EOS


def nll(model, tok, rows) -> float:
    """Mean over rows of transformers' own answer NLL, one row at a time."""
    examples = encode(load_rows(rows, "rows"), tok, 64, chat_template=False)
    with torch.no_grad():
        losses = [
            model(torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss.item()
            for e in examples
        ]
    return sum(losses) / len(losses)


def measure(model, tok) -> dict:
    idk = [{"question": r["question"], "answer": TARGET} for r in FORGET]
    target = answer_ids(tok, idk)[0]
    forget_said = answers(model, tok, FORGET)
    retain_said = answers(model, tok, RETAIN)
    return {
        "forget_says_target": sum(a == target for a in forget_said) / len(FORGET),
        "forget_says_truth": sum(
            a == t for a, t in zip(forget_said, answer_ids(tok, FORGET), strict=True)
        )
        / len(FORGET),
        "retain_correct": sum(
            a == t for a, t in zip(retain_said, answer_ids(tok, RETAIN), strict=True)
        )
        / len(RETAIN),
        "target_nll": nll(model, tok, idk),
        "forget_nll": nll(model, tok, FORGET),
        "retain_nll": nll(model, tok, RETAIN),
        "example": tok.decode(forget_said[0]),
    }


def run_reading(reading: str, ref, tok, alpha: float) -> dict:
    target = None if reading == "plain" else TARGET
    trainer_class = {"ascent": AscentTargets, "descent-nll": TargetNllOnly}.get(reading, MoxTrainer)
    session_module.MoxTrainer = trainer_class
    try:
        result = unlearn(
            ref,
            FORGET,
            RETAIN,
            config=MEM,
            tokenizer=tok,
            target_answer=target,
            extrapolation=ExtrapolationConfig(alpha=alpha),
        )
    finally:
        session_module.MoxTrainer = MoxTrainer
    return measure(result.model, tok)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--alphas", default="2,4")
    args = parser.parse_args()
    torch.set_num_threads(1)
    alphas = [float(a) for a in args.alphas.split(",")]
    tok = build_word_tokenizer(
        [f"{r['question']} {r['answer']}" for r in FORGET + RETAIN] + [TARGET]
    )
    start = time.time()
    rows = []
    for seed in range(args.seeds):
        model = build_tiny_llama(
            len(tok), hidden_size=64, num_heads=4, intermediate_size=128, seed=seed
        )
        ref = finetune(model, FORGET + RETAIN, config=REF, tokenizer=tok).model
        rows.append({"seed": seed, "reading": "reference", "alpha": None, **measure(ref, tok)})
        for alpha in alphas:
            for reading in READINGS:
                rows.append(
                    {
                        "seed": seed,
                        "reading": reading,
                        "alpha": alpha,
                        **run_reading(reading, ref, tok, alpha),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    elapsed = time.time() - start
    write(rows, args, elapsed)


def write(rows: list[dict], args, elapsed: float) -> None:
    keys = (
        "forget_says_target",
        "forget_says_truth",
        "retain_correct",
        "target_nll",
        "forget_nll",
        "retain_nll",
    )
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["reading"], r["alpha"]), []).append(r)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    lines = [
        "# Targeted MOX: ascent inside θ_mem vs descent at θ_for",
        "",
        f"`.venv/bin/python studies/targeted_mox.py --seeds {args.seeds} --alphas "
        f"{args.alphas}` at commit {commit}, {platform.machine()} CPU, torch "
        f"{torch.__version__}, {elapsed:.0f} s.",
        f"Tiny Llama (hidden 64, 2 layers) fine-tuned on 32 made-up facts (150 epochs, lr "
        f"3e-3); forget 8, retain 24; target answer {TARGET!r}; θ_mem: 32 epochs, lr 1e-3, "
        f"batch 8, KL weight 1 (all positions), target weight 1. Mean over {args.seeds} "
        f"reference seeds (min–max in brackets); answers are greedy, compared token by token.",
        "",
        "| reading | α | " + " | ".join(keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for (reading, alpha), group in groups.items():
        cells = []
        for k in keys:
            values = [g[k] for g in group]
            cells.append(f"{statistics.mean(values):.3g} [{min(values):.3g}–{max(values):.3g}]")
        lines.append(
            f"| {reading} | {'' if alpha is None else f'{alpha:g}'} | " + " | ".join(cells) + " |"
        )
    lines += ["", "Greedy answer of the first forget question, seed 0:", ""]
    lines += [f"- {r['reading']} α={r['alpha']}: `{r['example']}`" for r in rows if r["seed"] == 0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "targeted_mox.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "targeted_mox.json").write_text(json.dumps(rows, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
