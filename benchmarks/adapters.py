"""LoRA forget adapters: what moxkit.adapters costs, side by side with the baselines.

Two questions, each tool a subprocess (wall time, peak RSS from the kernel's ru_maxrss of
that process), runs interleaved, medians reported:

1. `extrapolate`: the forget adapter of a Llama-2-7B-shaped rank-16 LoRA adapter (bf16
   factors on q/k/v/o/gate/up/down of all 32 layers, 80 MB), on a 7B-shaped BASE whose headers
   are real and whose data is a sparse file (the forget adapter reads only BASE's headers).
       floor     cp of adapter_model.safetensors (the bytes any tool must copy)
       moxkit    moxkit extrapolate BASE ADAPTER --alpha 4 -o OUT -q (the whole CLI process)
       api       moxkit.adapters.write_forget_adapter in a warm process (the call alone)
       plain     load_file, lora_B *= -α, save_file (the obvious script; it re-rounds B to
                 bf16, so it is not exact: its error is reported)
       momentum  3 snapshots: concatenated rank 48, and re-compressed to rank 16 (SVD)
2. `merge`: BASE + forget adapter as a full model, on a TinyLlama-1.1B-shaped bf16 model with
   random weights (what fits this shared machine twice over):
       floor     cat BASE > /dev/null, then cp BASE's shards
       moxkit    moxkit extrapolate BASE ADAPTER --alpha 4 --merge -o OUT -q (--max-memory 1GiB)
       peft      from_pretrained(BASE), PeftModel.from_pretrained(FORGET), merge_and_unload(),
                 save_pretrained(OUT): PEFT's in-memory merge
   and how the two outputs agree (bf16 elements bitwise equal, largest difference in ulps).

    .venv/bin/python benchmarks/adapters.py [--repeats 3] [--skip-merge]

Inputs are cached under benchmarks/.cache/adapters/; results go to
benchmarks/results/adapters.json and adapters.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import git_commit, machine

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / ".cache" / "adapters"
RESULTS = HERE / "results"
ALPHA = 4.0
RANK = 16
MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PYTHON = sys.executable
MOXKIT = [PYTHON, "-m", "moxkit.cli.main"]

# ----------------------------------------------------------------------------------- inputs


def llama_shapes(hidden: int, inter: int, layers: int, vocab: int, kv: int, heads: int):
    """(name, shape) of a LlamaForCausalLM state dict, transformers' names."""
    head_dim = hidden // heads
    shapes = [("model.embed_tokens.weight", (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (hidden,)),
            (f"{p}.self_attn.q_proj.weight", (hidden, hidden)),
            (f"{p}.self_attn.k_proj.weight", (kv * head_dim, hidden)),
            (f"{p}.self_attn.v_proj.weight", (kv * head_dim, hidden)),
            (f"{p}.self_attn.o_proj.weight", (hidden, hidden)),
            (f"{p}.post_attention_layernorm.weight", (hidden,)),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden)),
            (f"{p}.mlp.up_proj.weight", (inter, hidden)),
            (f"{p}.mlp.down_proj.weight", (hidden, inter)),
        ]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
    return shapes


def write_config(folder: Path, hidden, inter, layers, vocab, kv, heads) -> None:
    from transformers import LlamaConfig

    LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"], dtype="bfloat16",
    ).save_pretrained(folder)  # fmt: skip


def write_model(folder: Path, shapes, *, sparse: bool, seed: int = 0) -> None:
    """BF16 safetensors shards of ≤ 5 GB in transformers' layout. sparse: data left as a hole
    (ftruncate), for inputs whose bytes are never read; else random N(0, 0.02) weights."""
    from moxkit.engine.writer import OutputTensor, index_json, layout, split_shards

    folder.mkdir(parents=True, exist_ok=True)
    tensors = [OutputTensor(n, "BF16", s, int(np.prod(s)) * 2) for n, s in shapes]
    shards = layout(split_shards(tensors, 5 * 10**9), {"format": "pt"})
    rng = np.random.default_rng(seed)
    for shard in shards:
        with open(folder / shard.filename, "wb") as fh:
            fh.write(len(shard.header).to_bytes(8, "little") + shard.header)
            if sparse:
                fh.truncate(shard.file_size)
                continue
            for t in shard.tensors:
                fh.seek(shard.offsets[t.name])
                fh.write(bf16_bits(rng.standard_normal(t.shape, np.float32) * 0.02).tobytes())
    if len(shards) > 1:
        (folder / "model.safetensors.index.json").write_text(index_json(shards))


def bf16_bits(x: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bit patterns, round to nearest even (finite inputs)."""
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def write_adapter(folder: Path, shapes, layers: int, seed: int) -> None:
    """A PEFT LoRA adapter (rank 16, lora_alpha 32, bf16 factors) on every q/k/v/o/gate/up/down."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    by_name = dict(shapes)
    factors = {}
    for i in range(layers):
        for m in MODULES:
            part = "self_attn" if m.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            module = f"model.layers.{i}.{part}.{m}"
            out_dim, in_dim = by_name[f"{module}.weight"]
            key = f"base_model.model.{module}"
            a = rng.standard_normal((RANK, in_dim), np.float32) / np.sqrt(in_dim)
            b = rng.standard_normal((out_dim, RANK), np.float32) * 1e-3
            factors[f"{key}.lora_A.weight"] = bf16_bits(a)
            factors[f"{key}.lora_B.weight"] = bf16_bits(b)
    write_bf16_file(folder / "adapter_model.safetensors", factors)
    config = {
        "peft_type": "LORA", "r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.0,
        "target_modules": list(MODULES), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True,
        "task_type": "CAUSAL_LM", "base_model_name_or_path": None, "modules_to_save": None,
        "inference_mode": True, "rank_pattern": {}, "alpha_pattern": {},
    }  # fmt: skip
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))


def write_bf16_file(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """A safetensors file of BF16 tensors given as their uint16 bit patterns (numpy has no
    bf16, so safetensors.numpy cannot label them)."""
    from moxkit.engine.writer import OutputTensor, layout

    outputs = [OutputTensor(k, "BF16", v.shape, v.nbytes) for k, v in tensors.items()]
    (shard,) = layout([outputs], {"format": "pt"}, [path.name])
    with open(path, "wb") as fh:
        fh.write(len(shard.header).to_bytes(8, "little") + shard.header)
        for t in shard.tensors:
            fh.seek(shard.offsets[t.name])
            fh.write(tensors[t.name].tobytes())


# ---------------------------------------------------------------------------------- running


def measure(argv: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RSS (ru_maxrss of the child) of one subprocess."""
    launcher = (
        "import resource, subprocess, sys, time, json;"
        "t = time.perf_counter(); r = subprocess.run(sys.argv[1:]);"
        "dt = time.perf_counter() - t;"
        "rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024;"
        "print(json.dumps({'rc': r.returncode, 'seconds': dt, 'peak_rss': rss}))"
    )
    done = subprocess.run(
        [PYTHON, "-c", launcher, *argv], capture_output=True, text=True,
        env={**os.environ, **(env or {})}, cwd=ROOT,
    )  # fmt: skip
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"{argv[:4]}... failed:\n{done.stderr[-2000:]}")
    return result


def in_process(code: str) -> dict:
    """Run `code` in a fresh Python; it prints a JSON dict with the seconds of the timed part."""
    done = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def rm(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def summarise(runs: list[dict]) -> dict:
    return {
        "median_s": statistics.median(r["seconds"] for r in runs),
        "best_s": min(r["seconds"] for r in runs),
        "runs_s": [round(r["seconds"], 4) for r in runs],
        "peak_rss": max(r.get("peak_rss", 0) for r in runs) or None,
        "cpu_s": [round(r["cpu_seconds"], 4) for r in runs if "cpu_seconds" in r] or None,
    }


# ----------------------------------------------------------------------- 1: forget adapters


def bench_extrapolate(repeats: int) -> dict:
    shapes = llama_shapes(4096, 11008, 32, 32000, 32, 32)
    base, work = CACHE / "base7b-sparse", CACHE / "work"
    snaps = [CACHE / f"adapter7b-{k}" for k in range(3)]
    if not base.exists():
        write_model(base, shapes, sparse=True)
        write_config(base, 4096, 11008, 32, 32000, 32, 32)
    for k, snap in enumerate(snaps):
        if not snap.exists():
            write_adapter(snap, shapes, 32, seed=k)
    adapter = snaps[-1]
    work.mkdir(parents=True, exist_ok=True)
    out = work / "forget"
    size = (adapter / "adapter_model.safetensors").stat().st_size
    plain = (
        "import json, shutil, sys, time, torch;"
        "from safetensors.torch import load_file, save_file;"
        "src, dst = sys.argv[1], sys.argv[2];"
        "t = time.perf_counter(); f = load_file(src + '/adapter_model.safetensors');"
        f"f = {{k: (v * -{ALPHA}).to(v.dtype) if 'lora_B' in k else v for k, v in f.items()}};"
        "import os; os.makedirs(dst);"
        "save_file(f, dst + '/adapter_model.safetensors', metadata={'format': 'pt'});"
        "shutil.copy(src + '/adapter_config.json', dst)"
    )
    api = (
        "import json, time; from moxkit.adapters import write_forget_adapter;"
        "t, c = time.perf_counter(), time.process_time();"
        f"write_forget_adapter({str(adapter)!r}, {ALPHA}, {str(out)!r}, base={str(base)!r});"
        "print(json.dumps({'seconds': time.perf_counter() - t, "
        "'cpu_seconds': time.process_time() - c}))"
    )
    cli = [*MOXKIT, "extrapolate", str(base), str(adapter), "--alpha", str(ALPHA)]
    startup = (
        "import moxkit.cli.main, moxkit.cli.extrapolate, moxkit.adapters, moxkit.engine.stream"
    )
    tools = {
        "floor": lambda: measure(["cp", str(adapter / "adapter_model.safetensors"), str(out)]),
        "startup": lambda: measure([PYTHON, "-c", startup]),
        "moxkit": lambda: measure([*cli, "-o", str(out), "-q"]),
        "api": lambda: in_process(api),
        "plain": lambda: measure([PYTHON, "-c", plain, str(adapter), str(out)]),
    }
    runs: dict[str, list[dict]] = {name: [] for name in tools}
    for _ in range(repeats):
        for name, run in tools.items():
            rm(out)
            runs[name].append(run())
    rm(out)
    plain_error = [plain_rounding_error(adapter, a) for a in (ALPHA, 3.0)]
    momentum = {}
    for label, rank in (("concatenated (rank 48)", None), ("re-compressed to rank 16", RANK)):
        code = (
            "import json, time; from moxkit.adapters import momentum_forget_adapter;"
            "t, c = time.perf_counter(), time.process_time();"
            f"r = momentum_forget_adapter({[str(s) for s in snaps]!r}, "
            f"{ALPHA}, {str(work / 'mo')!r}, rank={rank!r}, base={str(base)!r});"
            "print(json.dumps({'seconds': time.perf_counter() - t, "
            "'cpu_seconds': time.process_time() - c, 'rank': r.rank, "
            "'bytes': r.bytes_written, 'error': r.overall_error, "
            "'worst': max(r.relative_errors.values(), default=None)}))"
        )
        rm(work / "mo")
        momentum[label] = in_process(code)
        rm(work / "mo")
    return {
        "case": "Llama-2-7B shapes, rank-16 LoRA on q/k/v/o/gate/up/down (32 layers), bf16",
        "adapter_bytes": size,
        "alpha": ALPHA,
        "tools": {name: summarise(r) for name, r in runs.items()},
        "plain_bf16_rounding_error": plain_error,
        "momentum_3_snapshots": momentum,
    }


def plain_rounding_error(adapter: Path, alpha: float) -> dict:
    """What the plain script loses: its B·(−α) rounded to bf16 against the exact product
    (nothing when α is a power of two)."""
    import torch
    from safetensors.torch import load_file

    tensors = load_file(adapter / "adapter_model.safetensors")
    worst, count, changed = 0.0, 0, 0
    for key, b in tensors.items():
        if "lora_B" not in key:
            continue
        exact = b.double() * -alpha
        rounded = (b * -alpha).to(torch.bfloat16).double()
        rel = ((rounded - exact).abs() / exact.abs().clamp_min(1e-30)).max().item()
        worst = max(worst, rel)
        changed += int((rounded != exact).sum())
        count += b.numel()
    return {
        "alpha": alpha,
        "max_relative_error_of_B": worst,
        "fraction_of_B_changed": changed / count,
    }


# ------------------------------------------------------------------------- 2: streamed merge


def bench_merge(repeats: int) -> dict:
    import torch

    dims = (2048, 5632, 22, 32000, 4, 32)  # TinyLlama-1.1B
    shapes = llama_shapes(*dims)
    base = CACHE / "base1b"
    mem = CACHE / "adapter1b"
    forget = CACHE / "forget1b"
    if not base.exists():
        write_model(base, shapes, sparse=False)
        write_config(base, *dims)
    if not mem.exists():
        write_adapter(mem, shapes, dims[2], seed=7)
    if not forget.exists():
        from moxkit.adapters import write_forget_adapter

        write_forget_adapter(mem, ALPHA, forget, base=base)
    work = CACHE / "work"
    work.mkdir(parents=True, exist_ok=True)
    out_moxkit, out_peft, out_floor = work / "merged-moxkit", work / "merged-peft", work / "cp"
    shards = sorted(str(p) for p in base.glob("*.safetensors"))
    files = " ".join(shards)
    floor = f"cat {files} > /dev/null && mkdir {out_floor} && cp {files} {out_floor}/"
    peft = (
        "import sys, torch; from transformers import AutoModelForCausalLM;"
        "from peft import PeftModel;"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.bfloat16);"
        "m = PeftModel.from_pretrained(m, sys.argv[2]).merge_and_unload();"
        "m.save_pretrained(sys.argv[3])"
    )
    cli = [*MOXKIT, "extrapolate", str(base), str(mem), "--alpha", str(ALPHA), "--merge"]
    cli += ["--max-memory", "1GiB", "--device", "cpu", "-o", str(out_moxkit), "-q"]
    peft_argv = [PYTHON, "-c", peft, str(base), str(forget), str(out_peft)]
    tools = {
        "floor": (lambda: measure(["bash", "-c", floor]), out_floor),
        "moxkit": (lambda: measure(cli), out_moxkit),
        "peft": (lambda: measure(peft_argv), out_peft),
    }
    runs: dict[str, list[dict]] = {name: [] for name in tools}
    for i in range(repeats):
        for name, (run, out) in tools.items():
            rm(out)
            runs[name].append(run())
            if not (i == repeats - 1 and name != "floor"):
                rm(out)
    agreement = compare_outputs(out_moxkit, out_peft, torch)
    for out in (out_moxkit, out_peft, out_floor):
        rm(out)
    n_params = sum(int(np.prod(s)) for _, s in shapes)
    return {
        "case": f"TinyLlama-1.1B shapes ({n_params / 1e9:.2f}B parameters, bf16), rank-16 "
        "LoRA on q/k/v/o/gate/up/down",
        "model_bytes": 2 * n_params,
        "alpha": ALPHA,
        "tools": {name: summarise(r) for name, r in runs.items()},
        "agreement": agreement,
    }


def compare_outputs(a: Path, b: Path, torch) -> dict:
    """moxkit's merge against PEFT's, tensor by tensor (bf16 bits, and in bf16 ulps)."""
    from safetensors import safe_open

    def tensors(folder: Path):
        out = {}
        for file in sorted(folder.glob("*.safetensors")):
            with safe_open(file, "pt") as fh:
                out.update({k: (file, k) for k in fh.keys()})
        return out

    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys(), "different tensor names"
    equal = total = 0
    worst_ulps = 0.0
    for name in ta:
        with safe_open(ta[name][0], "pt") as fa, safe_open(tb[name][0], "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
        equal += int((x.view(torch.int16) == y.view(torch.int16)).sum())
        total += x.numel()
        ulp = x.float().abs().clamp_min(2.0**-126) * 2.0**-7
        worst_ulps = max(worst_ulps, ((x.float() - y.float()).abs() / ulp).max().item())
    return {"elements": total, "bitwise_equal_fraction": equal / total, "max_diff_ulps": worst_ulps}


# ---------------------------------------------------------------------------------- results


def stamp() -> dict:
    """The machine (benchmarks/_common.machine) with the commit and the time of a measurement."""
    return {**machine(), "commit": git_commit(), "date": time.strftime("%Y-%m-%d %H:%M UTC",
                                                                      time.gmtime())}  # fmt: skip


def _info(m: dict, key: str, older: str):
    """A machine field, read from this harness's names or from records made before it
    (cores, ram_gib, torch, load_average)."""
    if key == "torch":
        return m["packages"]["torch"] if "packages" in m else m["torch"]
    return m[key] if key in m else m[older]


def render(results: dict) -> str:
    mib = 2**20
    m = results["machine"]
    lines = [
        "# LoRA forget adapters: cost and the baselines",
        "",
        f"`.venv/bin/python benchmarks/adapters.py`, torch {_info(m, 'torch', 'torch')}. "
        f"Machine: {_info(m, 'cores_logical', 'cores')} cores, "
        f"{_info(m, 'memory_gib', 'ram_gib')} GiB "
        "RAM, shared with other engineers' jobs (the load average below is 1-, 5- and "
        f"15-minute, at the end of each part): medians of {results['repeats']} interleaved "
        "runs. Time is the whole subprocess unless said; peak RSS is the kernel's ru_maxrss "
        "of that process.",
        "",
    ]
    ext = results.get("extrapolate")
    if ext:
        floor = ext["tools"]["floor"]["median_s"]
        lines += [
            f"## Forget adapter: {ext['case']}",
            "",
            f"Adapter {ext['adapter_bytes'] / 1e6:.1f} MB; α = {ext['alpha']:g}. BASE is a "
            "7B-shaped folder whose headers are real and data sparse (only headers are read). "
            + measured(ext),
            "",
            "| tool | time (s, median) | all runs (s) | × floor | CPU (s) | peak RSS |",
            "|---|---:|---|---:|---:|---:|",
        ]
        names = {
            "floor": "floor: cp adapter_model.safetensors",
            "startup": "python start-up + moxkit's CLI imports (reference)",
            "moxkit": "**moxkit extrapolate BASE ADAPTER** (CLI process)",
            "api": "write_forget_adapter (the call, warm process)",
            "plain": "plain script: load_file, B × −α, save_file",
        }
        for key, label in names.items():
            t = ext["tools"][key]
            rss = f"{t['peak_rss'] / mib:.0f} MiB" if t["peak_rss"] else "—"
            cpu = f"{statistics.median(t['cpu_s']):.3f}" if t.get("cpu_s") else "—"
            lines.append(
                f"| {label} | {t['median_s']:.3f} | {', '.join(f'{x:.3f}' for x in t['runs_s'])}"
                f" | {t['median_s'] / floor:.1f} | {cpu} | {rss} |"
            )
        errs = ext["plain_bf16_rounding_error"]
        changed = "; ".join(
            f"at α = {e['alpha']:g} it changes {e['fraction_of_B_changed']:.1%} of B's elements "
            f"(relative error up to {e['max_relative_error_of_B']:.2g})"
            for e in errs
        )
        lines += [
            "",
            "The plain script rounds −α·B back to bf16, exact only when α is a power of two: "
            f"{changed}. moxkit copies the factor bytes and folds −α into lora_alpha, so the "
            "served forget model is BASE − α·s·B·A for any α.",
            "",
            "Momentum over 3 snapshots (API call, warm process):",
            "",
            "| form | time (s) | CPU (s) | rank | size | approximation error (rel. Frobenius) |",
            "|---|---:|---:|---:|---:|---|",
        ]
        for label, m in ext["momentum_3_snapshots"].items():
            error = (
                "exact (to fp32 rounding)"
                if m["error"] is None
                else f"{m['error']:.3f} overall, worst module {m['worst']:.3f}"
            )
            lines.append(
                f"| {label} | {m['seconds']:.2f} | {m['cpu_seconds']:.2f} | {m['rank']} "
                f"| {m['bytes'] / 1e6:.0f} MB "
                f"| {error} |"
            )
        lines += [
            "",
            "The snapshots here are independent random adapters, the worst case for "
            "re-compression (their sum has full rank 48); snapshots of one training run share "
            "most of their directions.",
            "",
        ]
    merge = results.get("merge")
    if merge:
        floor = merge["tools"]["floor"]["median_s"]
        lines += [
            f"## Streamed merge: {merge['case']}",
            "",
            f"Model {merge['model_bytes'] / 1e9:.2f} GB, warm page cache, output not synced. "
            + measured(merge),
            "",
            "| tool | time (s, median) | all runs (s) | × floor | peak RSS |",
            "|---|---:|---|---:|---:|",
        ]
        names = {
            "floor": "floor: cat BASE, then cp BASE",
            "moxkit": "**moxkit extrapolate BASE ADAPTER --merge** (--max-memory 1GiB, CPU)",
            "peft": "PEFT: from_pretrained, merge_and_unload, save_pretrained",
        }
        for key, label in names.items():
            t = merge["tools"][key]
            lines.append(
                f"| {label} | {t['median_s']:.2f} | {', '.join(f'{x:.2f}' for x in t['runs_s'])}"
                f" | {t['median_s'] / floor:.2f} | {t['peak_rss'] / mib:.0f} MiB |"
            )
        ag = merge["agreement"]
        lines += [
            "",
            f"Outputs: {ag['bitwise_equal_fraction']:.4%} of {ag['elements']:,} bf16 elements "
            f"bitwise equal, largest difference {ag['max_diff_ulps']:.2f} bf16 ulp. (PEFT on "
            "the CPU rounds s·B·A to bf16 before adding it to W, two roundings, where moxkit "
            "adds in fp32 and rounds once; here the two never differed. tests/test_adapters.py "
            "holds moxkit to the fp64 value within one bf16 ulp, and to PEFT's fp32 merge "
            "within fp32 rounding.) Both are bound by the same arithmetic (2·r flops per "
            "element) on 2 shared cores; moxkit's memory stays under its budget whatever the "
            "model size, PEFT's grows with the model.",
            "",
        ]
    return "\n".join(lines)


def measured(part: dict) -> str:
    m = part.get("measured")
    if not m:
        return ""
    load = ", ".join(f"{x:.1f}" for x in _info(m, "load_average_at_start", "load_average"))
    return f"Measured {m['date']} at commit {m['commit']}, load average {load}."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-merge", action="store_true")
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "adapters.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    if not args.render_only:  # --skip-merge keeps the merge figures of an earlier run
        results.update(repeats=args.repeats, extrapolate=bench_extrapolate(args.repeats))
        results["extrapolate"]["measured"] = stamp()
        if not args.skip_merge:
            results["merge"] = bench_merge(args.repeats)
            results["merge"]["measured"] = stamp()
        results["machine"] = stamp()
        path.write_text(json.dumps(results, indent=2) + "\n")
    (RESULTS / "adapters.md").write_text(render(results))
    print(render(results))


if __name__ == "__main__":
    main()
