"""What the frozen reference θ_ref costs `train-mem` in memory, per way of holding it: a copy in
the stored dtype (fp32 for SmolLM2's fp32 checkpoint), a copy with bf16 linear weights
(--reference bf16), LoRA with the adapters disabled (--lora: no copy, but LoRA training), and
no reference at all (--kl-weight 0) as the floor. Each mode is a fresh `train_mem` process on
SmolLM2-135M (peak RSS of the process); the bytes each reference holds are counted on a
meta-device copy; the retain KL at the first step (θ = θ_ref, where it is 0 for an exact
reference) and the first steps' losses show what each mode changes.

    python benchmarks/train_reference.py           # about 5 min on 2 cores

Writes benchmarks/results/train_reference.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from _common import RESULTS, load_text, result_head, write_json
from _train import model_folder, report_child, rows, run_child

MODES = {  # name: TrainConfig / LossConfig settings
    "stored (fp32 copy), fp32 training": {"reference": "stored", "bf16": False},
    "bf16 copy, fp32 training": {"reference": "bf16", "bf16": False},
    "stored (fp32 copy), bf16 autocast": {"reference": "stored", "bf16": True},
    "bf16 copy, bf16 autocast (auto)": {"reference": "auto", "bf16": True},
    "LoRA r=8, adapters disabled, bf16 autocast": {"reference": "auto", "bf16": True, "lora": 8},
    "no reference (kl_weight 0), bf16 autocast": {"reference": "auto", "bf16": True, "kl": 0.0},
}


def child(spec: dict) -> None:
    from moxkit.train import LossConfig, TrainConfig, train_mem

    config = TrainConfig(max_steps=spec["steps"], batch_size=4, max_length=32, lr=1e-5,
                         warmup_epochs=0, bf16=spec["bf16"], reference=spec["reference"],
                         lora=spec.get("lora"), merge=bool(spec.get("lora")),
                         progress=False)  # fmt: skip
    done = train_mem(spec["model"], rows(4 * spec["steps"], 0), rows(4 * spec["steps"], 10_000),
                     config=config, loss=LossConfig(kl_weight=spec.get("kl", 1.0)))  # fmt: skip
    steps = [r for r in done.log if "loss" in r]
    report_child({"losses": [r["loss"] for r in steps],
                  "retain_kl": [r.get("retain_kl") for r in steps]})  # fmt: skip


def held_bytes(folder: str) -> dict:
    """Bytes of parameters and buffers each reference holds, on a meta-device model."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from moxkit.train.precision import frozen_reference

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(folder))

    def size(m) -> int:
        tensors = {id(t): t for t in [*m.parameters(), *m.buffers()]}.values()
        return sum(t.numel() * t.element_size() for t in tensors)

    return {"parameters": sum(p.numel() for p in model.parameters()),
            "stored": size(frozen_reference(model, torch.float32, "stored", True)),
            "bf16": size(frozen_reference(model, torch.float32, "bf16", True))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", default="smollm2", choices=("smollm2", "tiny"))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--stem", default="train_reference")
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))

    folder = str(model_folder(args.model))
    report = result_head("reference memory", measured=("moxkit/train",))
    report.update(model=args.model, steps=args.steps, batch=4, length=32,
                  held_bytes=held_bytes(folder), runs=[])  # fmt: skip
    for _ in range(args.repeats):
        for name, settings in MODES.items():
            result = run_child(__file__, {"model": folder, "steps": args.steps, **settings}, name)
            result["mode"] = name
            report["runs"].append(result)
            shown = f"first-step KL {result['retain_kl'][0]}, losses {result['losses']}"
            print(f"{name}: {result['peak_rss_mib']:.0f} MiB, {shown}", file=sys.stderr)
    report["summary"] = {
        name: {"peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in report["runs"]
                                                 if r["mode"] == name),
               "first_step_retain_kl": next(r["retain_kl"][0] for r in report["runs"]
                                            if r["mode"] == name)}
        for name in MODES
    }  # fmt: skip
    path = write_json(report, RESULTS / args.stem)
    print(f"{path} ({load_text(report['machine'])}); held bytes {report['held_bytes']}")
    for name, s in report["summary"].items():
        print(f"{name:45} peak RSS {s['peak_rss_mib']:.0f} MiB, KL at θ_ref "
              f"{s['first_step_retain_kl']}")  # fmt: skip


if __name__ == "__main__":
    main()
