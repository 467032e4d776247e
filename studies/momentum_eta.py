"""MOX-Mo: does η matter, and under which tick schedule?

θ_for^t = η·[(1+α)θ_ref − α·θ_mem^t] + (1−η)·θ_for^(t−1). With n ticks, θ_ref keeps weight
(1−η)^n and the k-th latest θ_mem weight η(1−η)^k, so η only matters when the averaged θ_mem
differ. For several schedules (every step, once per epoch, moxkit's default of four ticks per
run) and several η, on one tiny Llama and one θ_mem run (same seed, same data order), we
report the distance of the MOX-Mo forget model from plain MOX (η = 1, which is plain MOX
exactly), relative to plain MOX's own distance from θ_ref, and the forget / retain NLL.

    .venv/bin/python studies/momentum_eta.py     # writes results/momentum_eta/momentum_eta.md
"""

from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path

import torch
from targeted_mox import nll  # the same answer NLL, row by row, through transformers

from moxkit.apps.tiny import build_tiny_llama, build_word_tokenizer, tiny_facts
from moxkit.engine.formula import PAPER_ETA
from moxkit.train import ExtrapolationConfig, TrainConfig, finetune, unlearn
from moxkit.train.momentum import DEFAULT_TICKS

FORGET, RETAIN = tiny_facts(8, offset=0), tiny_facts(24, offset=8)
EPOCHS, BATCH, ALPHA = 10, 2, 2.0
MEM = TrainConfig(epochs=EPOCHS, lr=1e-3, batch_size=BATCH, warmup_epochs=1, progress=False)
RESULTS = Path(__file__).parent / "results" / "momentum_eta"


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])


def main() -> None:
    torch.set_num_threads(1)
    start = time.time()
    tok = build_word_tokenizer([f"{r['question']} {r['answer']}" for r in FORGET + RETAIN])
    model = build_tiny_llama(len(tok), hidden_size=64, num_heads=4, intermediate_size=128)
    ref_config = TrainConfig(epochs=60, lr=3e-3, batch_size=8, warmup_epochs=1, progress=False)
    ref = finetune(model, FORGET + RETAIN, config=ref_config, tokenizer=tok).model
    total = EPOCHS * len(FORGET) // BATCH
    schedules = {"every step": 1, "once per epoch": len(FORGET) // BATCH,
                 f"default ({DEFAULT_TICKS} ticks)": None}  # fmt: skip

    def run(eta, every):
        ext = ExtrapolationConfig(alpha=ALPHA, eta=eta, extrapolate_every=every)
        return unlearn(ref, FORGET, RETAIN, config=MEM, tokenizer=tok, extrapolation=ext).model

    plain = run(None, None)
    theta_ref, theta_plain = flat(ref), flat(plain)
    scale = (theta_plain - theta_ref).norm().item()
    rows = [("plain MOX", "", 0.0, nll(plain, tok, FORGET), nll(plain, tok, RETAIN))]
    for name, every in schedules.items():
        for eta in (1.0, PAPER_ETA, 0.3, 0.1):
            got = run(eta, every)
            rel = (flat(got) - theta_plain).norm().item() / scale
            rows.append((name, f"{eta:g}", rel, nll(got, tok, FORGET), nll(got, tok, RETAIN)))
            print(rows[-1], flush=True)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    lines = [
        "# MOX-Mo: sensitivity to η by tick schedule",
        "",
        f"`.venv/bin/python studies/momentum_eta.py` at commit {commit}, "
        f"{platform.machine()} CPU, {time.time() - start:.0f} s. Tiny Llama (hidden 64) "
        f"fine-tuned on 32 made-up facts; θ_mem: {EPOCHS} epochs of 8 forget rows, batch "
        f"{BATCH} ({total} steps), lr 1e-3, linear warm-up 1 epoch then linear decay; α = "
        f"{ALPHA:g}. 'distance' is ‖θ_for − θ_for(plain MOX)‖ / ‖θ_for(plain MOX) − θ_ref‖.",
        "",
        "| schedule | η | distance from plain MOX | forget NLL | retain NLL |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {s} | {e} | {d:.4f} | {f:.3f} | {r:.3f} |" for s, e, d, f, r in rows]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "momentum_eta.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
