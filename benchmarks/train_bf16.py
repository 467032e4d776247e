"""Does bf16 autocast keep what a memorization reaches? The same short `train-mem` on SmolLM2-135M
(made-up answers it does not know, KL to the reference on retain rows) in fp32 and under bf16
autocast (fp32 master weights), for a few seeds each (the seed orders the data and pairs the
retain rows), interleaved; afterwards every θ_mem is scored in fp32 without autocast: the forget
rows' mean answer log-probability (the level matched forgetting uses), the retain rows' one, and
the KL to the reference on retain. Wall time and tokens/s of each run are recorded too.

    python benchmarks/train_bf16.py            # about 6 min on 2 cores
    python benchmarks/train_bf16.py --seeds 1 --steps 4   # a smoke run

Writes benchmarks/results/train_bf16.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from _common import RESULTS, load_text, result_head, write_json
from _train import model_folder, rows

from moxkit.hf import load_model
from moxkit.matching import answer_logprob
from moxkit.text import encode, load_rows
from moxkit.train import TrainConfig, train_mem
from moxkit.train.precision import cpu_flags, cpu_has_bf16

FORGET, RETAIN = rows(8, 0, answer_words=8), rows(8, 10_000, answer_words=8)


def retain_kl(ref, model, tok) -> float:
    """Mean over retain rows of KL(p_ref ‖ p_θ) per position, fp32, no autocast."""
    total = 0.0
    for e in encode(load_rows(RETAIN, "retain"), tok, 64, False):
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)
            lr = torch.log_softmax(ref(input_ids=ids).logits.float(), -1)
        total += (lr.exp() * (lr - lp)).sum(-1).mean().item()
    return total / len(RETAIN)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    parser.add_argument("--stem", default="train_bf16")
    args = parser.parse_args()

    folder = model_folder(args.model)
    report = result_head("bf16 autocast keeps the memorization", measured=("moxkit/train",))
    ref = load_model(folder, "model")
    tok = ref.tokenizer
    before = {"forget_logprob": answer_logprob(ref.model, tok, FORGET),
              "retain_logprob": answer_logprob(ref.model, tok, RETAIN)}  # fmt: skip
    tokens = sum(len(e.input_ids) for e in encode(load_rows(FORGET + RETAIN, "r"), tok, 64, False))
    report.update(model=args.model, steps=args.steps, lr=args.lr, batch=4, forget_rows=8,
                  retain_rows=8, cpu_has_native_bf16=cpu_has_bf16(),
                  cpu_bf16_flags=sorted({"avx512_bf16", "amx_bf16"} & cpu_flags()),
                  before=before, runs=[])  # fmt: skip
    for seed in range(args.seeds):
        for bf16 in (False, True):
            config = TrainConfig(max_steps=args.steps, batch_size=4, lr=args.lr, seed=seed,
                                 warmup_epochs=0.5, bf16=bf16, progress=False)  # fmt: skip
            start = time.perf_counter()
            mem = train_mem(folder, FORGET, RETAIN, config=config).model
            seconds = time.perf_counter() - start
            run = {"seed": seed, "precision": "bf16" if bf16 else "fp32", "seconds": seconds,
                   # forget and retain rows of each step: batch/len(FORGET) of the set
                   "tokens_per_s_incl_load": tokens * args.steps * 4 / len(FORGET) / seconds,
                   "forget_logprob": answer_logprob(mem, tok, FORGET),
                   "retain_logprob": answer_logprob(mem, tok, RETAIN),
                   "retain_kl": retain_kl(ref.model, mem, tok)}  # fmt: skip
            report["runs"].append(run)
            print(run, file=sys.stderr)
    summary = {}
    for precision in ("fp32", "bf16"):
        runs = [r for r in report["runs"] if r["precision"] == precision]
        summary[precision] = {
            key: {"mean": statistics.mean(r[key] for r in runs),
                  "sd": statistics.stdev(r[key] for r in runs) if len(runs) > 1 else None}
            for key in ("forget_logprob", "retain_logprob", "retain_kl", "seconds")
        }  # fmt: skip
    pairs = [
        (a, b)
        for a in report["runs"]
        for b in report["runs"]
        if a["seed"] == b["seed"] and (a["precision"], b["precision"]) == ("fp32", "bf16")
    ]
    report["summary"] = summary
    report["paired_forget_logprob_diff"] = [b["forget_logprob"] - a["forget_logprob"]
                                            for a, b in pairs]  # fmt: skip
    path = write_json(report, RESULTS / args.stem)
    print(f"{path} ({load_text(report['machine'])})")
    for precision, s in summary.items():
        print(f"{precision}: forget log-prob {s['forget_logprob']['mean']:.3f} "
              f"(sd {s['forget_logprob']['sd'] or 0:.3f}; before {before['forget_logprob']:.3f}),"
              f" retain {s['retain_logprob']['mean']:.3f} (before "
              f"{before['retain_logprob']:.3f}), KL {s['retain_kl']['mean']:.4f}, "
              f"{s['seconds']['mean']:.1f} s per run")  # fmt: skip


if __name__ == "__main__":
    main()
