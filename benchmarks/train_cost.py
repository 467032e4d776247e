"""What moxkit's trainer costs against a plain PyTorch loop computing the same loss on the same
model, batches, sequence length and optimizer: `train-mem` (forget NLL + KL to the frozen
reference on retain, the reference's forward included) and one baseline, GradDiff (−NLL on
forget + NLL on retain), in fp32 and under bf16 autocast (fp32 master weights).

    python benchmarks/train_cost.py            # about 12 min on 2 cores
    python benchmarks/train_cost.py --quick    # about 3 min: tiny model, fewer steps

Each arm is a fresh process (peak RSS = that process's high-water mark, imports included);
arms run interleaved (moxkit, plain, moxkit, plain, ...) so load hits both. tokens/s counts
the tokens the trained model reads per optimizer step (forget + retain rows, batch × length
each), over the steps after `--warmup`. Both arms clip gradients at 1.0 and use AdamW with the
Trainer's parameter groups and linear schedule, and see batches in the same order: their
losses are compared step by step (`loss_max_rel_diff`). Writes benchmarks/results/train_cost.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from _common import RESULTS, load_text, result_head, write_json
from _train import model_folder, report_child, rows, run_child

MEASURED = ("moxkit/train", "moxkit/text.py")
SETTINGS = {  # model: batch, length, steps (quick: steps, models)
    "tiny": {"batch": 8, "length": 128, "steps": 40, "quick_steps": 20},
    "smollm2": {"batch": 4, "length": 32, "steps": 6, "quick_steps": 4},
}
LR = 1e-5


# --- the two arms (run in a child process) -------------------------------------------------


def moxkit_arm(spec: dict) -> dict:
    from transformers import TrainerCallback

    from moxkit.train import TrainConfig, train_mem, unlearn

    class Clock(TrainerCallback):
        def __init__(self):
            self.times: list[float] = []
            self.cpu: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())
            self.cpu.append(time.process_time())

    clock = Clock()
    config = TrainConfig(max_steps=spec["steps"], batch_size=spec["batch"], lr=LR,
                         max_length=spec["length"], bf16=spec["bf16"], progress=False)  # fmt: skip
    forget, retain = _rows(spec)
    if spec["method"] == "memorize":
        done = train_mem(spec["model"], forget, retain, None, config=config, callbacks=[clock])
    else:
        done = unlearn(spec["model"], forget, retain, None, method=spec["method"],
                       config=config, callbacks=[clock])  # fmt: skip
    losses = [r["loss"] for r in done.log if "loss" in r]
    return {"times": clock.times, "cpu": clock.cpu, "losses": losses}


def plain_arm(spec: dict) -> dict:
    """The loop anyone would write: model, a frozen deep copy as the reference, AdamW,
    forward / loss / backward / clip / step."""
    import contextlib
    import copy

    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moxkit.text import encode, load_rows, pad_id
    from moxkit.train.data import Collator, PairDataset, PairSampler

    tok = AutoTokenizer.from_pretrained(spec["model"])
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=torch.float32)
    memorize = spec["method"] == "memorize"
    ref = copy.deepcopy(model).eval().requires_grad_(False) if memorize else None
    model.train()
    forget, retain = (encode(load_rows(r, "rows"), tok, spec["length"], False) for r in _rows(spec))
    data = PairDataset(forget, retain)
    sampler, collate = PairSampler(len(forget), len(retain), 0), Collator(pad_id(tok))
    no_decay = [p for n, p in model.named_parameters() if "norm" in n or "bias" in n]
    decay = [p for n, p in model.named_parameters() if not ("norm" in n or "bias" in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                             {"params": no_decay, "weight_decay": 0.0}], lr=LR)  # fmt: skip
    steps, warm = spec["steps"], round(len(forget) / spec["batch"])  # warm-up: one epoch

    def linear(s: int) -> float:  # transformers' linear schedule with warm-up
        return s / max(1, warm) if s < warm else max(0.0, (steps - s) / max(1, steps - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear)
    autocast = (lambda: torch.autocast("cpu", torch.bfloat16)) if spec["bf16"] else (
        contextlib.nullcontext)  # fmt: skip

    def logits_of(m, batch, group):
        with autocast():
            return m(input_ids=batch[f"{group}_input_ids"], use_cache=False,
                     attention_mask=batch[f"{group}_attention_mask"]).logits.float()  # fmt: skip

    def row_nll(logits, labels):
        flat = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                               reduction="none").view(labels.shape[0], -1)  # fmt: skip
        return flat.sum(-1) / (labels[:, 1:] != -100).sum(-1).clamp_min(1)

    times, cpu, losses = [], [], []
    while len(times) < steps:
        order = list(sampler)
        for b in range(0, len(order), spec["batch"]):
            batch = collate([data[i] for i in order[b : b + spec["batch"]]])
            forget_nll = row_nll(logits_of(model, batch, "forget"), batch["forget_labels"])
            retain_logits = logits_of(model, batch, "retain")
            if memorize:
                with torch.no_grad():
                    ref_logits = logits_of(ref, batch, "retain")
                mask = batch["retain_attention_mask"].bool()
                kl = F.kl_div(F.log_softmax(retain_logits, -1), F.log_softmax(ref_logits, -1),
                              log_target=True, reduction="none").sum(-1)  # fmt: skip
                loss = forget_nll.mean() + ((kl * mask).sum(-1) / mask.sum(-1)).mean()
            else:  # graddiff
                retain_nll = row_nll(retain_logits, batch["retain_labels"])
                loss = -forget_nll.mean() + retain_nll.mean()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
            times.append(time.perf_counter())
            cpu.append(time.process_time())
            if len(times) == steps:
                break
    return {"times": times, "cpu": cpu, "losses": losses}


def _rows(spec: dict) -> tuple[list[dict], list[dict]]:
    n = spec["batch"] * spec["steps"]  # one epoch: every step sees new rows
    return rows(n, 0), rows(n, 10_000)


def child(spec: dict) -> None:
    import torch

    torch.manual_seed(0)
    result = (moxkit_arm if spec["arm"] == "moxkit" else plain_arm)(spec)
    report_child(result)


# --- the parent: interleaved arms, ratios --------------------------------------------------


def tokens_per_s(result: dict, spec: dict, warmup: int, clock: str = "times") -> float:
    """Per second of wall time ("times") or of the process's CPU time ("cpu")."""
    times = result[clock]
    per_step = 2 * spec["batch"] * spec["length"]  # forget + retain rows, each cut to length
    return per_step * (len(times) - warmup) / (times[-1] - times[warmup - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="tiny model, fewer steps")
    parser.add_argument("--models", default="tiny,smollm2")
    parser.add_argument("--methods", default="memorize,graddiff")
    parser.add_argument("--precisions", default="fp32,bf16")
    parser.add_argument("--repeats", type=int, default=2, help="rounds of moxkit, plain")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of tokens/s")
    parser.add_argument("--stem", default="train_cost")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    models = ["tiny"] if args.quick else args.models.split(",")
    report = result_head("trainer vs plain loop", measured=MEASURED)
    report.update(lr=LR, warmup_steps_excluded=args.warmup, repeats=args.repeats, cases=[])
    for name in models:
        s = SETTINGS[name]
        folder = str(model_folder(name))
        for method in args.methods.split(","):
            for precision in args.precisions.split(","):
                spec = {"model": folder, "method": method, "bf16": precision == "bf16",
                        "batch": s["batch"], "length": s["length"],
                        "steps": s["quick_steps"] if args.quick else s["steps"]}  # fmt: skip
                runs: dict[str, list[dict]] = {"moxkit": [], "plain": []}
                for _ in range(args.repeats):
                    for arm in runs:
                        label = f"{name} {method} {precision} {arm}"
                        result = run_child(__file__, {**spec, "arm": arm}, label)
                        result["tokens_per_s"] = tokens_per_s(result, spec, args.warmup)
                        result["tokens_per_cpu_s"] = tokens_per_s(result, spec, args.warmup, "cpu")
                        runs[arm].append(result)
                        print(f"{label}: {result['tokens_per_s']:.0f} tokens/s "
                              f"({result['tokens_per_cpu_s']:.0f} per CPU s), peak RSS "
                              f"{result['peak_rss_mib']:.0f} MiB", file=sys.stderr)  # fmt: skip
                report["cases"].append(summarize(name, method, precision, spec, runs))
    path = write_json(report, RESULTS / args.stem)
    print(f"{path} ({load_text(report['machine'])})")
    for c in report["cases"]:
        tps, rss = c["tokens_per_s"], c["peak_rss_mib"]
        print(f"{c['model']:8} {c['method']:9} {c['precision']}: tokens/s {tps['moxkit']:.0f} vs "
              f"{tps['plain']:.0f} ({c['speed_ratio']:.1%}; per CPU s {c['cpu_speed_ratio']:.1%})"
              f", peak RSS {rss['moxkit']:.0f} vs {rss['plain']:.0f} MiB ({c['memory_ratio']:.1%})"
              f", loss diff {c['loss_max_rel_diff']:.1e}")  # fmt: skip


def summarize(name: str, method: str, precision: str, spec: dict, runs: dict) -> dict:
    med = {arm: statistics.median(r["tokens_per_s"] for r in rs) for arm, rs in runs.items()}
    cpu = {arm: statistics.median(r["tokens_per_cpu_s"] for r in rs) for arm, rs in runs.items()}
    rss = {arm: statistics.median(r["peak_rss_mib"] for r in rs) for arm, rs in runs.items()}
    a, b = runs["moxkit"][0]["losses"], runs["plain"][0]["losses"]
    diff = max(abs(x - y) / max(abs(y), 1e-9) for x, y in zip(a, b, strict=True))
    return {
        "model": name, "method": method, "precision": precision,
        **{k: spec[k] for k in ("batch", "length", "steps")},
        "tokens_per_s": med, "speed_ratio": med["moxkit"] / med["plain"],
        "tokens_per_cpu_s": cpu, "cpu_speed_ratio": cpu["moxkit"] / cpu["plain"],
        "peak_rss_mib": rss, "memory_ratio": rss["moxkit"] / rss["plain"],
        "loss_max_rel_diff": diff, "runs": runs,
    }  # fmt: skip


if __name__ == "__main__":
    main()
