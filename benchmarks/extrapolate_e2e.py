"""End-to-end benchmark of `moxkit extrapolate` against the I/O floor and the baselines.

On a random Llama-architecture checkpoint pair (bf16, or fp16 with --dtypes; benchmarks/_pairs.py
builds and caches it), measures in one run, side by side, each tool as a subprocess
(benchmarks/_process.py): wall time, GB/s over the job's bytes (read REF + MEM, write OUT) and
peak resident memory of its process tree. benchmarks/_e2e_render.py makes the tables.

    floor      cat REF and MEM to /dev/null, then cp REF's shards (sequential, and overlapped)
    moxkit     moxkit extrapolate REF MEM --alpha 4 -o OUT --quiet
    plain      benchmarks/plain_extrapolate.py (load both whole, compute, save_file)
    mergekit   mergekit-yaml, task_arithmetic with base REF and MEM at weight -alpha, from its
               own venv (benchmarks/.cache/mergekit-venv)
    startup    python -c 'import torch', for reference: the fixed cost inside each Python tool
    before     with --before REV: moxkit as of commit REV (a git worktree under
               benchmarks/.cache/trees, run by benchmarks/_checkout.py), right before moxkit

Then floor, moxkit and the plain script again on a pair twice the size, to show that
moxkit's peak memory does not grow. `--big7b` instead runs the case moxkit exists for, once: a
Llama-2-7B-shaped pair from a cold page cache, moxkit under --max-memory 1GiB against the
cold-cache I/O floor, and the plain script once under a memory guard (the machine is shared);
the files are deleted afterwards. Figures go to benchmarks/results/ (JSON, then the markdown
table and PNG chart made from it; --render-only remakes those).

mergekit comes from PyPI into its own venv (its pins are not moxkit's):
    python3 -m venv benchmarks/.cache/mergekit-venv
    benchmarks/.cache/mergekit-venv/bin/pip install torch==2.13.0 mergekit

    .venv/bin/python benchmarks/extrapolate_e2e.py                 # 0.9B pair, all tools
    .venv/bin/python benchmarks/extrapolate_e2e.py --dtypes bf16,fp16 --tools floor,moxkit
    .venv/bin/python benchmarks/extrapolate_e2e.py --params 50M --tools floor,plain,mergekit
    .venv/bin/python benchmarks/extrapolate_e2e.py --big7b
    .venv/bin/python benchmarks/extrapolate_e2e.py --dtypes bf16,fp16 --tools floor,moxkit \
        --before HEAD~1 --no-double                                  # old and new side by side
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from _common import GIB, RESULTS, result_head, write_json
from _e2e_render import GB, render
from _pairs import (
    CACHE,
    ensure_pair,
    llama2_7b_config,
    llama_config,
    pair_dir,
    parse_count,
    state_shapes,
    weight_bytes,
    weight_files,
)
from _process import Run, drop_page_cache, measure, warm
from safetensors import safe_open

HERE = Path(__file__).resolve().parent
MERGEKIT_VENV = CACHE / "mergekit-venv"
ALPHA = 4.0
TOOLS = ("floor", "startup", "moxkit", "plain", "mergekit")
TREES = CACHE / "trees"  # worktrees of earlier commits, for --before
COMPARED = ("moxkit", "before", "plain", "mergekit")  # tools whose outputs are compared
WARM_PROGRAMS = "import torch, safetensors.torch, moxkit.engine.stream, moxkit.cli.extrapolate"
NOTE = (
    "KVM guest; the cores are shared with other engineers running tests, so the figures "
    "are noisy: medians of the repeats, load average recorded per run and per file."
)

# ---------------------------------------------------------------------------------------------
# The tools.


def moxkit_bin() -> str:
    local = Path(sys.executable).parent / "moxkit"
    return str(local) if local.exists() else (shutil.which("moxkit") or "moxkit")


def before_tree(rev: str) -> Path:
    """A worktree of commit `rev` with its C loop built in place (made once, then reused)."""
    commit = subprocess.run(
        ["git", "rev-parse", "--short", f"{rev}^{{commit}}"],
        cwd=HERE, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    tree = TREES / commit
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), commit], cwd=HERE,
                       check=True, capture_output=True)  # fmt: skip
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree,
                       check=True, capture_output=True)  # fmt: skip
    return tree


def mergekit_config(ref: Path, mem: Path, path: Path) -> Path:
    """task_arithmetic: base + Σ wᵢ·(modelᵢ − base). With base REF and one model MEM at weight
    −α: REF − α·(MEM − REF) = (1+α)·REF − α·MEM. normalize off (it would divide by Σw = −α);
    computed in fp32 like moxkit, written in bf16."""
    path.write_text(
        "merge_method: task_arithmetic\n"
        f"base_model: {ref}\n"
        "models:\n"
        f"  - model: {mem}\n"
        "    parameters:\n"
        f"      weight: {-ALPHA}\n"
        "parameters:\n"
        "  normalize: false\n"
        "dtype: float32\n"
        "out_dtype: bfloat16\n"
    )
    return path


def commands(
    tool: str, ref: Path, mem: Path, out: Path, cold: bool, args
) -> list[tuple[str, list | str]]:
    """(label, command) pairs for one tool. The floor has two forms from a warm cache; from
    a cold one only the overlapped form is a floor (reading both inputs first and then copying
    REF would read REF from disk twice when the inputs do not fit in the page cache)."""
    r = " ".join(str(f) for f in weight_files(ref))
    m = " ".join(str(f) for f in weight_files(mem))
    if tool == "floor":
        seq = f"cat {r} {m} > /dev/null && mkdir -p {out} && cp {r} {out}/"
        par = f"mkdir -p {out} && {{ cat {m} > /dev/null & cp {r} {out}/; wait; }}"
        if cold:
            return [("floor (cat ∥ cp)", par)]
        return [("floor (cat, then cp)", seq), ("floor (cat ∥ cp)", par)]
    if tool == "startup":
        return [("python start-up + import torch", [sys.executable, "-c", "import torch"])]
    job = ["extrapolate", str(ref), str(mem), "--alpha", str(ALPHA), "-o", str(out), "--quiet",
           "--device", args.device, "--max-memory", "1GiB"]  # fmt: skip
    if tool == "moxkit":
        return [("moxkit", [moxkit_bin(), *job])]
    if tool == "before":
        tree = before_tree(args.before)
        checkout = [sys.executable, str(HERE / "_checkout.py"), str(tree)]
        return [(f"before: moxkit at {tree.name}", [*checkout, *job])]
    if tool == "plain":
        script = HERE / "plain_extrapolate.py"
        return [("plain script", [sys.executable, str(script), str(ref), str(mem), str(out),
                                  "--alpha", str(ALPHA)])]  # fmt: skip
    if tool == "mergekit":
        cfg = mergekit_config(ref, mem, CACHE / "mergekit-task-arithmetic.yml")
        cmd = [str(MERGEKIT_VENV / "bin" / "mergekit-yaml"), str(cfg), str(out), "--quiet",
               "--no-copy-tokenizer"]  # fmt: skip
        return [("mergekit", cmd)]
    raise ValueError(tool)


def check_tools(tools: list[str]) -> None:
    if "mergekit" in tools and not (MERGEKIT_VENV / "bin" / "mergekit-yaml").exists():
        sys.exit(
            f"mergekit is not installed in {MERGEKIT_VENV}: python3 -m venv {MERGEKIT_VENV} && "
            f"{MERGEKIT_VENV}/bin/pip install torch==2.13.0 mergekit (or --skip-mergekit)"
        )
    if "moxkit" in tools:
        probe = subprocess.run([moxkit_bin(), "extrapolate", "--help"], capture_output=True)
        if probe.returncode != 0:
            sys.exit("`moxkit extrapolate` is not available yet (or use --tools without moxkit)")


# ---------------------------------------------------------------------------------------------
# Cases: several tools on one pair, repeated and interleaved so that noise hits all alike.


@dataclass
class Case:
    name: str
    params: int
    checkpoint_bytes: int  # one checkpoint's weight files
    cold: bool
    runs: dict[str, list[Run]] = field(default_factory=dict)
    agreement: dict[str, dict] = field(default_factory=dict)

    @property
    def bytes_moved(self) -> int:
        """The job's I/O: read REF and MEM, write one checkpoint."""
        return 3 * self.checkpoint_bytes


def run_case(
    case: Case, pair: Path, tools: list[str], repeats: int, args, once: tuple[str, ...] = ()
) -> Case:
    """Each tool `repeats` times (those in `once` only in the first round), interleaved; the
    outputs of the first round are compared. A run killed by the memory guard is recorded as
    such; any other failure stops the benchmark."""
    ref, mem = pair / "ref", pair / "mem"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    guard = int(args.guard_gib * GIB)
    for repeat in range(repeats):
        for tool in tools:
            if repeat > 0 and tool in once:
                continue
            out = CACHE / "runs" / tool
            for label, cmd in commands(tool, ref, mem, out, case.cold, args):
                shutil.rmtree(out, ignore_errors=True)
                if case.cold:
                    if not drop_page_cache():
                        sys.exit("cannot drop the page cache here (/proc/sys/vm/drop_caches)")
                    # cold checkpoints, not a cold Python: load the programs' own files again
                    subprocess.run([sys.executable, "-c", WARM_PROGRAMS], check=True)
                else:
                    os.sync()
                    warm([ref, mem])
                run = measure(label, cmd, case.cold, env, guard)
                case.runs.setdefault(label, []).append(run)
                print(
                    f"[{case.name}] {repeat + 1}/{repeats} {label}: {run.seconds:.2f} s "
                    f"(+{run.sync_seconds:.2f} s sync), peak RSS {run.peak_rss / GIB:.2f} GiB, "
                    f"load {run.load_before:.2f}",
                    flush=True,
                )
                if run.killed_by_guard:
                    print(f"  {label}: killed, available memory fell under {args.guard_gib} GiB")
                elif run.returncode != 0:
                    sys.exit(f"{label} failed (exit {run.returncode}); see above")
                if repeat > 0 or tool not in COMPARED:
                    # one output at a time in the page cache: the next run needs the memory
                    shutil.rmtree(out, ignore_errors=True)
        if repeat == 0:
            done = [t for t in tools if all(r.returncode == 0 for r in runs_of(case, t))]
            case.agreement = compare_outputs(done)
    for tool in tools:
        shutil.rmtree(CACHE / "runs" / tool, ignore_errors=True)
    return case


def runs_of(case: Case, tool: str) -> list[Run]:
    return [r for label, runs in case.runs.items() if label.startswith(tool) for r in runs]


def open_tensors(model: Path) -> dict[str, Path]:
    """name -> file, for a single-file or sharded output directory."""
    found = {}
    for f in weight_files(model):
        with safe_open(f, "pt") as st:
            found.update({k: f for k in st.keys()})
    return found


def compare_outputs(tools: list[str]) -> dict:
    """Every tensor of each baseline's output against moxkit's (the plain script's when
    moxkit is not run): how many are bit-identical, how many values differ, and the largest
    difference in units in the last place of the 2-byte dtype (as bit patterns of same-sign
    values)."""
    outs = {t: CACHE / "runs" / t for t in tools if t in COMPARED}
    if len(outs) < 2:
        return {}
    reference = next(iter(outs))
    mox = open_tensors(outs[reference])
    report = {}
    for tool, path in outs.items():
        if tool == reference:
            continue
        other = open_tensors(path)
        identical = 0
        worst_ulps = 0
        differing_values = 0
        for name, file in mox.items():
            with safe_open(file, "pt") as a, safe_open(other[name], "pt") as b:
                x, y = a.get_tensor(name), b.get_tensor(name)
            if torch.equal(x.view(torch.int16), y.view(torch.int16)):
                identical += 1
                continue
            xi, yi = x.view(torch.int16).int(), y.view(torch.int16).int()
            differing_values += int((xi != yi).sum())
            worst_ulps = max(worst_ulps, int((xi - yi).abs().max()))
        report[tool] = {
            "tensors": len(mox),
            "tensors_bit_identical": identical,
            "values_differing": differing_values,
            "max_ulps": worst_ulps,
            "same_names": sorted(mox) == sorted(other),
        }
        report[tool]["against"] = reference
        print(f"  {tool} against {reference}: {report[tool]}", flush=True)
    return report


# ---------------------------------------------------------------------------------------------
# Summaries and reports.


def summarize(case: Case, with_sync: bool) -> dict[str, dict]:
    """Median time of the completed runs (and GB/s from it), worst peak RSS over all runs
    (a run killed by the memory guard counts for memory, not for time), per tool."""
    rows = {}
    for label, runs in case.runs.items():
        times = [r.seconds + (r.sync_seconds if with_sync else 0.0) for r in runs]
        done = [t for t, r in zip(times, runs, strict=True) if r.returncode == 0]
        median = statistics.median(done) if done else None
        rows[label] = {
            "seconds_median": median,
            "seconds_best": min(done) if done else None,
            "seconds_all": times,
            "gb_per_s": case.bytes_moved / GB / median if median else None,
            "peak_rss_bytes": max(r.peak_rss for r in runs),
            "peak_rss_anon_bytes": max(r.peak_rss_anon for r in runs),
            "repeats": len(runs),
            "killed_by_guard": sum(r.killed_by_guard for r in runs),
        }
    floors = [v["seconds_median"] for k, v in rows.items() if k.startswith("floor")]
    for row in rows.values():
        if floors and row["seconds_median"]:
            row["x_floor"] = row["seconds_median"] / min(floors)
    return rows


def mergekit_version() -> str:
    try:
        return subprocess.run(
            [str(MERGEKIT_VENV / "bin" / "python"), "-c", "import importlib.metadata as m;"
             "print(m.version('mergekit'), 'torch', m.version('torch'))"],
            capture_output=True, text=True).stdout.strip()  # fmt: skip
    except OSError:
        return "not installed"


def report_head(args, benchmark: str, timing: str) -> dict:
    head = result_head(benchmark, disk_of=CACHE, packages=("torch", "safetensors"))
    return {
        **head,
        "note": NOTE,
        "versions": {"mergekit": mergekit_version()},
        "alpha": ALPHA,
        "device": args.device,
        "timing": timing,
    }


def write_report(report: dict, stem: Path) -> None:
    """JSON, then the markdown (and for the main case the chart) made from it alone."""
    write_json(report, stem)
    render(stem)


def case_json(case: Case, rows: dict) -> dict:
    return {
        **{k: v for k, v in asdict(case).items() if k != "runs"},
        "summary": rows,
        "runs": {k: [asdict(x) for x in v] for k, v in case.runs.items()},
    }


def main_case(args) -> None:
    tools = [t for t in args.tools.split(",") if t]
    if args.skip_mergekit and "mergekit" in tools:
        tools.remove("mergekit")
    if args.before:
        tools.insert(tools.index("moxkit") if "moxkit" in tools else len(tools), "before")
    check_tools(tools)
    cases = []
    for dtype in args.dtypes.split(","):
        config = llama_config(args.params, dtype)
        pair = ensure_pair(config, dtype)
        params = sum(math.prod(s) for _, s in state_shapes(config))
        case = Case(
            f"{params / 1e9:.2f}B {dtype} warm", params, weight_bytes(pair / "ref"), cold=False
        )
        run_case(case, pair, tools, args.repeats, args)
        cases.append(case_json(case, summarize(case, with_sync=False)))

    if args.double and "moxkit" in tools:
        dtype = args.dtypes.split(",")[0]
        config2 = llama_config(2 * args.params, dtype)
        pair2 = ensure_pair(config2, dtype)
        params2 = sum(math.prod(s) for _, s in state_shapes(config2))
        size2 = weight_bytes(pair2 / "ref")
        doubled = Case(f"{params2 / 1e9:.2f}B {dtype} warm", params2, size2, cold=False)
        tools2 = [t for t in ("floor", "moxkit", "plain") if t in tools]
        run_case(doubled, pair2, tools2, args.repeats, args)
        cases.append(
            {**case_json(doubled, summarize(doubled, with_sync=False)), "doubles": cases[0]["name"]}
        )

    report = report_head(
        args,
        "moxkit extrapolate end to end, warm page cache",
        "subprocess start to exit (interpreter start-up and imports included); page cache "
        "warmed before each run, dirty pages synced after each (not timed)",
    )
    write_report({**report, "cases": cases}, RESULTS / args.stem)


# ---------------------------------------------------------------------------------------------
# The 7B case: cold cache, more than the machine can hold, once.


def big7b(args) -> None:
    config = llama2_7b_config()
    params = sum(math.prod(s) for _, s in state_shapes(config))
    need = 3 * 2 * params + GIB
    pair = pair_dir(config, "bf16")
    free = shutil.disk_usage(CACHE).free
    have = weight_bytes(pair / "ref") + weight_bytes(pair / "mem") if pair.exists() else 0
    if free + have < need:
        sys.exit(
            f"--big7b needs {need / GB:.1f} GB free on {CACHE} for REF + MEM + OUT; "
            f"{free / GB:.1f} GB are free"
        )
    if not drop_page_cache():
        sys.exit("--big7b needs to drop the page cache (/proc/sys/vm/drop_caches): not permitted")
    try:
        pair = ensure_pair(config)
        case = Case("Llama-2-7B shapes, cold cache", params, weight_bytes(pair / "ref"), cold=True)
        tools = ["floor", "startup", *(["before"] if args.before else []), "moxkit"]
        tools += ["plain"] if "plain" in args.tools.split(",") else []
        run_case(case, pair, tools, args.repeats, args, once=("plain",))
    finally:
        shutil.rmtree(pair, ignore_errors=True)
        shutil.rmtree(pair.with_name(pair.name + ".partial"), ignore_errors=True)
        shutil.rmtree(CACHE / "runs", ignore_errors=True)
    report = report_head(
        args,
        "moxkit extrapolate, Llama-2-7B shapes, cold page cache",
        "page cache dropped before each run, then the Python libraries re-read (not timed); "
        "time = subprocess start to exit + os.sync() of its output (on disk for all)",
    )
    report["case"] = case_json(case, summarize(case, with_sync=True))
    report["memory_guard_gib"] = args.guard_gib
    write_report(report, RESULTS / f"{args.stem}_7b")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=parse_count, default=parse_count("0.9B"),
                        help="model size of the main pair (default 0.9B)")  # fmt: skip
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="passed to moxkit")  # fmt: skip
    parser.add_argument("--tools", default=",".join(TOOLS),
                        help=f"comma-separated subset of {','.join(TOOLS)}")  # fmt: skip
    parser.add_argument("--dtypes", default="bf16",
                        help="storage dtypes of the main pair: bf16, fp16 or both")  # fmt: skip
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--no-double", dest="double", action="store_false",
                        help="skip the twice-the-model run")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--before", metavar="REV",
                        help="also run moxkit as of commit REV, side by side")  # fmt: skip
    parser.add_argument("--guard-gib", type=float, default=1.5,
                        help="kill a run when available memory falls under this")  # fmt: skip
    parser.add_argument("--big7b", action="store_true",
                        help="the Llama-2-7B-shaped case from a cold cache, instead")  # fmt: skip
    parser.add_argument("--render-only", action="store_true",
                        help="remake .md/.png from the JSON; measure nothing")  # fmt: skip
    parser.add_argument("--stem", default="extrapolate_e2e",
                        help="results file name stem under benchmarks/results/")  # fmt: skip
    args = parser.parse_args()
    unknown = set(args.tools.split(",")) - set(TOOLS) - {""}
    if unknown:
        parser.error(f"--tools: unknown {', '.join(sorted(unknown))}")
    CACHE.mkdir(parents=True, exist_ok=True)
    if args.render_only:
        for stem in (RESULTS / args.stem, RESULTS / f"{args.stem}_7b"):
            if stem.with_suffix(".json").exists():
                render(stem)
    elif args.big7b:
        big7b(args)
    else:
        main_case(args)


if __name__ == "__main__":
    main()
