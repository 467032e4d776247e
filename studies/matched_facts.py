"""Does MOX keep more of what should stay, at equal forgetting? Facts SmolLM2-135M-Instruct
knows, every method matched to the same validation forget level (issue 19).

The protocol, fixed before the run, is studies/results/matched_facts/PROTOCOL.md; every
constant it names is defined in this file (CONSTANTS below) and logged with the run's commit.

    .venv/bin/python studies/matched_facts.py run --seeds 0-7 --jobs 2   # the study
    .venv/bin/python studies/matched_facts.py run --seeds 99 --pilot     # a pilot (not reported)
    .venv/bin/python studies/matched_facts.py report                     # tables, plots
    .venv/bin/python studies/matched_facts.py run --quick --seeds 0      # a tiny Llama (the code)

A run refuses a dirty tree (the results must come from committed code) unless --pilot or
--quick; each seed writes seeds/seed_<n>.json when it is complete.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.append(str(ROOT / "benchmarks"))  # the one harness: benchmarks/_common.py
from _common import machine  # noqa: E402

OUT = ROOT / "studies" / "results" / "matched_facts"
WORK = Path("/tmp/moxkit-real-model")

CONSTANTS = {
    "model": "smollm2-135m",
    "sizes": {
        "forget_val": 16,
        "forget_test": 16,
        "retain": 32,
        "heldout_val": 48,
        "heldout_test": 48,
    },  # fmt: skip
    "epochs": 10,
    "batch_size": 8,
    "warmup_epochs": 1.0,
    "weight_decay": 0.01,
    "max_length": 64,
    "lrs": [1e-5, 3e-5],
    "methods": ["mox", "tv", "ga", "graddiff", "npo", "simnpo"],
    "alpha_grid": [0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
    "iterations": 12,
    "momentum_eta": 0.675,
    "momentum_ticks": 4,
    "trajectory_fractions": [0.25, 0.5, 0.75, 1.0],
    "baselines": ["ga", "graddiff", "npo", "simnpo"],
    "family_alpha": 0.05,
    "delta_min": 0.1,
}
QUICK_SIZES = {"forget_val": 4, "forget_test": 4, "retain": 4, "heldout_val": 4, "heldout_test": 4}
SPLITS = ("forget_val", "forget_test", "retain", "heldout_val", "heldout_test")


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True).stdout.strip()


# ---------------------------------------------------------------- measuring


def measure(model, tokenizer, splits) -> dict:
    """Per split: mean answer log-probability and accuracy (greedy answer correct); and the
    NLL of the fixed general text."""
    from moxkit.apps.facts import general_nll, score_facts

    was = model.training
    model.eval()
    out = {}
    for name in SPLITS:
        scores = score_facts(model, tokenizer, splits[name])
        out[f"{name}_logprob"] = sum(s.logprob for s in scores) / len(scores)
        out[f"{name}_acc"] = sum(s.correct for s in scores) / len(scores)
    out["general_nll"] = general_nll(model, tokenizer)
    model.train(was)
    return out


def level_fn(tokenizer, facts):
    """The matching level: mean answer log-probability of `facts` (moxkit.matching)."""
    from moxkit.matching import answer_logprob

    rows = [f.row() for f in facts]
    return lambda model: answer_logprob(model, tokenizer, rows)


# ---------------------------------------------------------------- one seed


def run_seed(seed: int, model, tokenizer, facts, target: float, c: dict, log) -> dict:
    import torch
    from transformers import TrainerCallback

    from moxkit.apps.facts import split_facts
    from moxkit.matching import fp32_state, load_state, match_alpha, match_between
    from moxkit.train import LossConfig, TrainConfig, train_mem, unlearn

    splits = split_facts(facts, c["sizes"], seed=seed)
    level = level_fn(tokenizer, splits["forget_val"])
    forget = [f.row() for f in splits["forget_val"] + splits["forget_test"]]
    retain = [f.row() for f in splits["retain"]]
    steps = math.ceil(len(forget) / c["batch_size"]) * c["epochs"]
    ref_state = fp32_state(model)
    result = {
        "seed": seed,
        "splits": {k: [f.prompt for f in v] for k, v in splits.items()},
        "target": target,
        "steps": steps,
        "reference": measure(model, tokenizer, splits),
        "runs": [],
    }
    log(f"seed {seed}: reference forget_val {result['reference']['forget_val_logprob']:.3f}, "
        f"target {target:.3f}, {steps} steps per run")  # fmt: skip

    def config(lr):
        return TrainConfig(epochs=c["epochs"], lr=lr, batch_size=c["batch_size"],
                           warmup_epochs=c["warmup_epochs"], weight_decay=c["weight_decay"],
                           max_length=c["max_length"], seed=seed, bf16=False,
                           progress=False)  # fmt: skip

    ticks = [round(f * steps) for f in c["trajectory_fractions"]]

    class Snapshots(TrainerCallback):
        """θ_mem at the momentum ticks (a quarter of the run each; the last is θ_mem)."""

        def __init__(self):
            self.states = {}

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step in ticks:
                self.states[state.global_step] = fp32_state(model)

    class StopAtTarget(TrainerCallback):
        """The level after every optimizer step; training stops at the first step at or past
        the target, keeping that checkpoint and the one before it."""

        def __init__(self):
            self.before, self.after, self.step, self.path = ref_state, None, None, []

        def on_step_end(self, args, state, control, model=None, **kwargs):
            with torch.no_grad():
                value = level(model)
            self.path.append((state.global_step, value))
            current = fp32_state(model)
            if not math.isfinite(value) or value <= target:
                self.after, self.step = current, state.global_step
                control.should_training_stop = True
            else:
                self.before = current

    def finish(run, t0):
        run["seconds"] = round(time.perf_counter() - t0, 1)
        result["runs"].append(run)
        m = run.get("metrics")
        shown = "did not reach the target"
        if m:
            shown = (f"heldout_test {m['heldout_test_logprob']:.3f} "
                     f"forget_test {m['forget_test_logprob']:.3f}")  # fmt: skip
        log(f"seed {seed} {run['method']} lr {run['lr']:g}: strength {run.get('strength')}, "
            f"{shown}, {run['seconds']:.0f} s")  # fmt: skip
        # the model under study is never modified by the API; make sure of it
        assert all(torch.equal(p.detach().float(), ref_state[n])
                   for n, p in model.named_parameters()), "reference modified"  # fmt: skip

    def memorize(method, lr):
        """θ_mem at lr (λ = 1 for MOX, 0 for the task vector), matched on α; returns the run
        and θ_mem's snapshots at the ticks."""
        t0 = time.perf_counter()
        run = {"method": method, "lr": lr}
        snaps = Snapshots()
        loss = LossConfig(kl_weight=1.0 if method == "mox" else 0.0)
        train_mem(model, forget, retain, None, config=config(lr), loss=loss,
                  tokenizer=tokenizer, callbacks=[snaps])  # fmt: skip
        mem = copy.deepcopy(model)
        load_state(mem, snaps.states[steps])
        match, forget_model = match_alpha(model, mem, level, target, grid=c["alpha_grid"],
                                          iterations=c["iterations"])  # fmt: skip
        run.update(strength=match.strength, level=match.level, reached=match.reached,
                   evaluations=len(match.evaluations))  # fmt: skip
        if match.reached:
            run["metrics"] = measure(forget_model, tokenizer, splits)
        del mem, forget_model
        finish(run, t0)
        return run, snaps.states

    # MOX at each lr; the rule picks its lr on validation; the trajectory, momentum and the
    # task-vector control (λ = 0) are run at that lr only
    mox_states = {}
    for lr in c["lrs"]:
        run, mox_states[lr] = memorize("mox", lr)
    chosen = choose(result, "mox")
    if chosen is not None:
        t0 = time.perf_counter()
        lr = chosen["lr"]
        for other in [x for x in mox_states if x != lr]:  # memory: only the chosen lr's ticks
            del mox_states[other]
        gc.collect()
        mem = copy.deepcopy(model)
        load_state(mem, mox_states[lr][steps])
        chosen["trajectory"] = trajectory(model, mem, mox_states[lr], ticks, chosen["strength"],
                                          tokenizer, splits)  # fmt: skip
        chosen["momentum"] = momentum(model, mem, mox_states[lr], ticks, level, target,
                                      tokenizer, splits, c)  # fmt: skip
        chosen["extras_seconds"] = round(time.perf_counter() - t0, 1)
        del mem
    mox_states.clear()
    if "tv" in c["methods"]:
        memorize("tv", chosen["lr"] if chosen is not None else c["lrs"][0])

    for method in (m for m in c["methods"] if m not in ("mox", "tv")):
        for lr in c["lrs"]:
            t0 = time.perf_counter()
            run = {"method": method, "lr": lr}
            stop = StopAtTarget()
            unlearn(model, forget, retain if method != "ga" else None, None, method=method,
                    config=config(lr), tokenizer=tokenizer, callbacks=[stop])  # fmt: skip
            run["path"] = stop.path
            run["reached"] = stop.after is not None
            if stop.after is not None:
                work = copy.deepcopy(model)
                match = match_between(work, stop.before, stop.after, level, target,
                                      c["iterations"])  # fmt: skip
                run.update(step=stop.step, strength=match.strength, level=match.level,
                           reached=match.reached)  # fmt: skip
                run["metrics"] = measure(work, tokenizer, splits)
                del work
            else:
                run["level"] = stop.path[-1][1] if stop.path else None
            del stop
            finish(run, t0)
    return result


def trajectory(ref, mem, states, ticks, alpha, tokenizer, splits) -> list[dict]:
    """θ_for at the matched α, with θ_mem taken at each tick of its training."""
    from moxkit.matching import AlphaLine, load_state

    out = []
    snapshot = copy.deepcopy(mem)
    for step in ticks:
        load_state(snapshot, states[step])
        line = AlphaLine(ref, snapshot)
        m = measure(line.load(alpha), tokenizer, splits)
        out.append({"step": step, **{k: m[k] for k in m if k.endswith("logprob")},
                    "general_nll": m["general_nll"]})  # fmt: skip
        del line  # four model-sized tensors: one line alive at a time
        gc.collect()
    return out


def momentum(ref, mem, states, ticks, level, target, tokenizer, splits, c) -> dict:
    """MOX-Mo with θ_for⁰ = θ_ref and one tick per quarter of the run: θ_for = θ_ref −
    α·Σ_t w_t·(θ_mem^t − θ_ref), w_t = η(1−η)^(n−t). That is plain MOX against
    M = θ_ref + Σ_t w_t·(θ_mem^t − θ_ref), matched the same way; the effective α against the
    normalised average is α·Σ_t w_t = α·(1 − (1−η)^n)."""
    import torch

    from moxkit.matching import fp32_state, load_state, match_alpha

    eta, n = c["momentum_eta"], c["momentum_ticks"]
    weights = [eta * (1 - eta) ** (n - t) for t in range(1, n + 1)]
    base = fp32_state(ref)
    combined = {k: v.clone() for k, v in base.items()}
    for w, step in zip(weights, ticks, strict=True):
        for k in combined:
            combined[k] += w * (states[step][k] - base[k])
    avg = copy.deepcopy(mem)
    load_state(avg, combined)
    del base, combined  # memory
    gc.collect()
    match, model = match_alpha(ref, avg, level, target, grid=c["alpha_grid"],
                               iterations=c["iterations"])  # fmt: skip
    out = {"eta": eta, "ticks": ticks, "weight_sum": sum(weights), "alpha": match.strength,
           "reached": match.reached, "level": match.level}  # fmt: skip
    if match.reached:
        out["effective_alpha"] = match.strength * sum(weights)
        out["metrics"] = measure(model, tokenizer, splits)
    del torch
    return out


# ---------------------------------------------------------------- the run


def parse_seeds(text: str) -> list[int]:
    out = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def prepare(quick: bool, log):
    """(model, tokenizer, known facts, target level, the facts it does not know)."""
    from moxkit.apps.facts import candidate_facts, score_facts

    if quick:
        from moxkit.apps.fact_unlearning import tiny_stand_in

        model, tokenizer, facts = tiny_stand_in(0)
        unknown = facts[len(facts) // 2 :]
        facts = facts[: len(facts) // 2]
    else:
        from moxkit.apps.fact_unlearning import prepare as prepare_model

        model, tokenizer, facts = prepare_model(CONSTANTS["model"], WORK, log)
        known = {f.prompt for f in facts}
        unknown = [f for f in candidate_facts() if f.prompt not in known]
    model = model.float().eval()
    scores = score_facts(model, tokenizer, unknown)
    target = sum(s.logprob for s in scores) / len(scores)
    if quick:  # a random model knows nothing: ask for a little below its level on the facts
        scores = score_facts(model, tokenizer, facts)
        target = sum(s.logprob for s in scores) / len(scores) - 2.0
    return model, tokenizer, facts, target, unknown


def worker(seeds: list[int], c: dict, quick: bool, out: Path, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    log_file = open(out / "run.log", "a")

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_file.write(line + "\n")
        log_file.flush()

    model, tokenizer, facts, target, _ = prepare(quick, log)
    for seed in seeds:
        path = out / "seeds" / f"seed_{seed}.json"
        if path.exists():
            log(f"seed {seed}: already done, skipped")
            continue
        t0 = time.perf_counter()
        result = run_seed(seed, model, tokenizer, facts, target, c, log)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        result["commit"] = git("rev-parse", "HEAD")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        os.replace(tmp, path)
        log(f"seed {seed}: done in {result['seconds']:.0f} s")


def cmd_run(args) -> None:
    quick, pilot = args.quick, args.pilot
    dirty = git("status", "--porcelain", "--untracked-files=no")
    if dirty and not (quick or pilot):
        sys.exit("the tree has uncommitted changes: commit the code before the study runs")
    c = dict(CONSTANTS)
    if quick:
        c.update(sizes=QUICK_SIZES, epochs=2, batch_size=4, lrs=[1e-3, 3e-3],
                 alpha_grid=[0, 1, 4, 16], iterations=4)  # fmt: skip
    out = args.out or (OUT if not (quick or pilot) else Path("/tmp/moxkit-matched-pilot"))
    (out / "seeds").mkdir(parents=True, exist_ok=True)
    seeds = parse_seeds(args.seeds)
    # the target and known facts are cached by the first prepare(); do it once before forking
    model, tokenizer, facts, target, unknown = prepare(quick, print)
    if len(facts) != sum(c["sizes"].values()) and not quick:
        sys.exit(f"{len(facts)} known facts; the protocol's splits need "
                 f"{sum(c['sizes'].values())}")  # fmt: skip
    meta = {"commit": git("rev-parse", "HEAD"), "dirty": bool(dirty), "constants": c,
            "seeds": seeds, "target": target, "known_facts": len(facts),
            "unknown_facts": len(unknown), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "jobs": args.jobs, "threads_per_job": args.threads, "quick": quick, "pilot": pilot,
            "machine": machine()}  # fmt: skip
    (out / f"run_{int(time.time())}.json").write_text(json.dumps(meta, indent=1) + "\n")
    del model
    groups = [seeds[i :: args.jobs] for i in range(args.jobs)]
    if args.jobs == 1:
        worker(seeds, c, quick, out, args.threads)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=worker, args=(g, c, quick, out, args.threads)) for g in groups]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        sys.exit("a worker failed: see run.log")


# ---------------------------------------------------------------- the report


def load_seeds(out: Path) -> list[dict]:
    paths = sorted((out / "seeds").glob("seed_*.json"), key=lambda p: int(p.stem.split("_")[1]))
    return [json.loads(p.read_text()) for p in paths]


def choose(result: dict, method: str) -> dict | None:
    """The rule, fixed in advance: among a method's learning rates that reach the target, the
    one whose matched model keeps the highest held-out VALIDATION log-probability (ties: the
    lower lr)."""
    runs = [r for r in result["runs"] if r["method"] == method and r.get("metrics")]
    if not runs:
        return None
    return max(runs, key=lambda r: (r["metrics"]["heldout_val_logprob"], -r["lr"]))


def delta(result: dict, run: dict, key: str) -> float:
    return run["metrics"][key] - result["reference"][key]


def paired(values: list[float], family: int, c: dict) -> dict:
    """Mean of paired differences and its two-sided t interval at 1 − family_alpha/family."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n if n else math.nan
    if n < 2:
        return {"n": n, "mean": mean, "lo": math.nan, "hi": math.nan}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    level = 1 - c["family_alpha"] / family
    half = stats.t.ppf(1 - (1 - level) / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "lo": mean - half, "hi": mean + half, "level": level,
            "half_width": half}  # fmt: skip


def decide(ci: dict, c: dict) -> str:
    """The decision rule, fixed in advance (PROTOCOL.md)."""
    if ci["n"] < 2 or math.isnan(ci["lo"]):
        return "no data"
    if ci["lo"] > 0:
        return "MOX wins"
    if ci["hi"] < 0:
        return "MOX loses"
    if ci["half_width"] > c["delta_min"]:
        return "inconclusive (underpowered)"
    return "inconclusive (no difference of the size that matters)"


def cmd_report(args) -> None:
    out = args.out or OUT
    results = load_seeds(out)
    if not results:
        sys.exit(f"no seed results in {out / 'seeds'}")
    c = CONSTANTS
    lines = [f"# Matched-forgetting study on known facts: results ({len(results)} seeds)", ""]
    lines += [f"Commit(s) of the runs: {sorted({r['commit'][:12] for r in results})}. "
              f"Target level (the reference's mean answer log-probability on the facts it "
              f"does not know): {results[0]['target']:.3f} nats.", ""]  # fmt: skip
    # per seed: chosen runs
    chosen = {m: [choose(r, m) for r in results] for m in c["methods"]}
    lines += ["## Per seed, each method at its chosen lr (matched on forget_val)", "",
              "| seed | method | lr | strength | forget_val | forget_test | Δ heldout_test | "
              "Δ heldout_val | Δ retain | Δ general NLL |", "|" + "---|" * 10]  # fmt: skip
    for i, r in enumerate(results):
        for m in c["methods"]:
            run = chosen[m][i]
            if run is None:
                lines.append(f"| {r['seed']} | {m} | – | not reached | | | | | | |")
                continue
            mt = run["metrics"]
            lines.append(
                f"| {r['seed']} | {m} | {run['lr']:g} | {run['strength']:.4g}"
                f"{' (step ' + str(run['step']) + ')' if 'step' in run else ''} | "
                f"{mt['forget_val_logprob']:.3f} | {mt['forget_test_logprob']:.3f} | "
                f"{delta(r, run, 'heldout_test_logprob'):+.3f} | "
                f"{delta(r, run, 'heldout_val_logprob'):+.3f} | "
                f"{delta(r, run, 'retain_logprob'):+.3f} | "
                f"{delta(r, run, 'general_nll'):+.4f} |"
            )
    # primary endpoint
    lines += ["", "## Primary endpoint: Δ held-out test log-probability, MOX − baseline",
              "", f"Paired over seeds; two-sided t intervals at {1 - c['family_alpha'] / 4:.4f} "
              f"(Bonferroni over the 4 comparisons); δ_min = {c['delta_min']} nats.", "",
              "| comparison | seeds | mean | interval | decision |",
              "|---|---|---|---|---|"]  # fmt: skip
    summary = {}
    for b in c["baselines"]:
        diffs = [delta(r, chosen["mox"][i], "heldout_test_logprob")
                 - delta(r, chosen[b][i], "heldout_test_logprob")
                 for i, r in enumerate(results) if chosen["mox"][i] and chosen[b][i]]  # fmt: skip
        ci = paired(diffs, 4, c)
        summary[b] = {**ci, "decision": decide(ci, c), "diffs": diffs}
        lines.append(f"| MOX − {b} | {ci['n']} | {ci['mean']:+.3f} | "
                     f"[{ci['lo']:+.3f}, {ci['hi']:+.3f}] | "
                     f"{summary[b]['decision']} |")  # fmt: skip
    missing = {m: sum(x is None for x in chosen[m]) for m in c["methods"]}
    lines += ["", f"Seeds where a method reached the target at neither lr: {missing}.", ""]
    # secondary
    lines += ["## Secondary (not corrected; descriptive)", ""]
    for key, name in (("forget_test_logprob", "forget test log-prob (did matching transfer?)"),
                      ("retain_logprob", "retain log-prob (trained-on rows)"),
                      ("heldout_test_acc", "held-out test accuracy"),
                      ("general_nll", "general-text NLL")):  # fmt: skip
        lines.append(f"- Δ {name}, mean over seeds per method: " + ", ".join(
            f"{m} {sum(delta(r, chosen[m][i], key) for i, r in enumerate(results) if chosen[m][i]) / max(1, sum(1 for x in chosen[m] if x)):+.3f}"  # noqa: E501
            for m in c["methods"]))  # fmt: skip
    tv = [delta(r, chosen["mox"][i], "heldout_test_logprob")
          - delta(r, chosen["tv"][i], "heldout_test_logprob")
          for i, r in enumerate(results) if chosen["mox"][i] and chosen["tv"][i]]  # fmt: skip
    tv_ci = paired(tv, 1, c)
    lines.append(f"- MOX (λ = 1) − task vector (λ = 0), Δ held-out test: {tv_ci['mean']:+.3f} "
                 f"[{tv_ci['lo']:+.3f}, {tv_ci['hi']:+.3f}] (95 %, n = {tv_ci['n']}): does the "
                 "KL term matter?")  # fmt: skip
    mo = []
    for run in chosen["mox"]:
        if run and run.get("momentum", {}).get("metrics"):
            mo.append(run["momentum"]["metrics"]["heldout_test_logprob"]
                      - run["metrics"]["heldout_test_logprob"])  # fmt: skip
    mo_ci = paired(mo, 1, c)
    eff = [chosen["mox"][i]["momentum"].get("effective_alpha") for i in range(len(results))
           if chosen["mox"][i] and chosen["mox"][i].get("momentum", {}).get("reached")]  # fmt: skip
    lines.append(f"- MOX-momentum (η = {c['momentum_eta']}, 4 ticks) − plain MOX at matched "
                 f"forgetting, Δ held-out test: {mo_ci['mean']:+.3f} [{mo_ci['lo']:+.3f}, "
                 f"{mo_ci['hi']:+.3f}] (95 %, n = {mo_ci['n']}); effective α (against the "
                 f"normalised average) {', '.join(f'{a:.3g}' for a in eff)}")  # fmt: skip
    lines += ["", "## θ_for at the matched α along θ_mem's training (MOX, chosen lr)", "",
              "| seed | " + " | ".join(f"step {s}" for s in _ticks(results)) + " |",
              "|" + "---|" * (1 + len(_ticks(results)))]  # fmt: skip
    for i, r in enumerate(results):
        run = chosen["mox"][i]
        if run and run.get("trajectory"):
            cells = [f"fv {t['forget_val_logprob']:.2f} / ht {t['heldout_test_logprob']:.2f}"
                     for t in run["trajectory"]]  # fmt: skip
            lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    lines += ["", "fv: forget_val log-prob (the matched level at the last step); ht: held-out "
              "test log-prob.", ""]  # fmt: skip
    (out / "RESULTS.md").write_text("\n".join(lines) + "\n")
    (out / "summary.json").write_text(json.dumps(
        {"primary": summary, "tv": tv_ci, "momentum": mo_ci}, indent=1) + "\n")  # fmt: skip
    plot(results, chosen, summary, out)
    print("\n".join(lines))


def _ticks(results) -> list[int]:
    for r in results:
        for run in r["runs"]:
            if run.get("trajectory"):
                return [t["step"] for t in run["trajectory"]]
    return []


def plot(results, chosen, summary, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = CONSTANTS["methods"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    ax = axes[0]
    for j, m in enumerate(methods):
        vals = [delta(r, chosen[m][i], "heldout_test_logprob")
                for i, r in enumerate(results) if chosen[m][i]]  # fmt: skip
        ax.scatter([j] * len(vals), vals, alpha=0.6)
        if vals:
            ax.plot([j - 0.2, j + 0.2], [sum(vals) / len(vals)] * 2, color="k")
    ax.set_xticks(range(len(methods)), methods)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_ylabel("Δ held-out test log-prob at matched forgetting (nats)")
    ax.set_title("Each seed, each method at its chosen lr")
    ax = axes[1]
    names = list(summary)
    for j, b in enumerate(names):
        s = summary[b]
        if not math.isnan(s["lo"]):
            ax.errorbar([j], [s["mean"]], yerr=[[s["mean"] - s["lo"]], [s["hi"] - s["mean"]]],
                        fmt="o", capsize=4)  # fmt: skip
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xticks(range(len(names)), [f"MOX − {b}" for b in names])
    ax.set_title("Primary endpoint, Bonferroni intervals (4 comparisons)")
    fig.tight_layout()
    fig.savefig(out / "primary.png", dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--seeds", default="0-7")
    r.add_argument("--jobs", type=int, default=2)
    r.add_argument("--threads", type=int, default=1, help="torch threads per job")
    r.add_argument("--quick", action="store_true")
    r.add_argument("--pilot", action="store_true")
    r.add_argument("--out", type=Path, default=None)
    p = sub.add_parser("report")
    p.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    {"run": cmd_run, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
