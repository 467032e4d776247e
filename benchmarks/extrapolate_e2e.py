"""End-to-end benchmark of `moxkit extrapolate` against the I/O floor and the baselines.

Builds (once, cached under benchmarks/.cache/) a random Llama-architecture bf16 checkpoint pair
written in the exact layout transformers writes, then measures in one run, side by side, each
tool as a subprocess: wall time, GB/s over the job's bytes (read REF + MEM, write OUT) and peak
resident memory of its process tree.

    floor      cat REF and MEM to /dev/null, then cp REF's shards (sequential, and overlapped)
    moxkit     moxkit extrapolate REF MEM --alpha 4 -o OUT --quiet
    plain      benchmarks/plain_extrapolate.py (load both whole, compute, save_file)
    mergekit   mergekit-yaml, task_arithmetic with base REF and MEM at weight -alpha, from its
               own venv (benchmarks/.cache/mergekit-venv)
    startup    python -c 'import torch', for reference: the fixed cost inside each Python tool

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
    .venv/bin/python benchmarks/extrapolate_e2e.py --params 50M --tools floor,plain,mergekit
    .venv/bin/python benchmarks/extrapolate_e2e.py --big7b
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import psutil
import torch
from safetensors import safe_open
from tqdm import tqdm

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache"
RESULTS = HERE / "results"
MERGEKIT_VENV = CACHE / "mergekit-venv"
INDEX = "model.safetensors.index.json"
VOCAB = 32000
ALPHA = 4.0
GB = 1e9
GIB = 2**30
TOOLS = ("floor", "startup", "moxkit", "plain", "mergekit")
WARM_PROGRAMS = "import torch, safetensors.torch, moxkit.stream, moxkit.cli.extrapolate"

# ---------------------------------------------------------------------------------------------
# The checkpoint pair: random bf16 weights, MEM = REF + small noise, written shard by shard.


def parse_count(text: str) -> int:
    """'0.9B', '50M', '1.8e9' -> a parameter count."""
    match = re.fullmatch(r"([0-9.eE+]+)\s*([KMB]?)", text.strip(), re.IGNORECASE)
    if not match:
        raise argparse.ArgumentTypeError(f"--params {text!r}: expected e.g. 0.9B, 50M, 1.8e9")
    scale = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def llama_config(params: int):
    """A Llama config of about `params` parameters: the widest of a few TinyLlama-like widths
    whose embeddings stay under a third of the model, then as many layers as fit."""
    from transformers import LlamaConfig

    widths = ((2048, 5632), (1024, 2816), (512, 1408), (256, 704))
    hidden, inter = next((w for w in widths if 2 * VOCAB * w[0] <= params / 3), widths[-1])
    embed = 2 * VOCAB * hidden
    heads = hidden // 64
    kv_heads = max(1, heads // 8)
    per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * 64 + 3 * hidden * inter + 2 * hidden
    layers = max(1, round((params - embed - hidden) / per_layer))
    return LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"], dtype="bfloat16",
    )  # fmt: skip


def llama2_7b_config():
    """Llama-2-7B's shapes (its config.json, by the numbers)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
        rms_norm_eps=1e-5, tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
        dtype="bfloat16",
    )  # fmt: skip


def state_shapes(config) -> list[tuple[str, tuple[int, ...]]]:
    """Names and shapes of the model's state dict, in transformers' order (meta device: free)."""
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return [(name, tuple(t.shape)) for name, t in model.state_dict().items()]


def split_shards(tensors: list[tuple[str, tuple[int, ...]]]) -> list[list[tuple[str, tuple]]]:
    """State-dict order cut into consecutive shards of about equal bytes: at least 2, and no
    more than 5 GB each (transformers' default max_shard_size)."""
    total = sum(2 * math.prod(shape) for _, shape in tensors)
    count = max(2, math.ceil(total / 5e9))
    shards: list[list[tuple[str, tuple]]] = [[] for _ in range(count)]
    position = 0
    for name, shape in tensors:
        shards[min(count - 1, int(position * count // total))].append((name, shape))
        position += 2 * math.prod(shape)
    return shards


def shard_header(entries: list[tuple[str, tuple]]) -> bytes:
    """A safetensors header exactly as safetensors writes it for bf16 tensors: names sorted,
    data in that order, compact JSON padded with spaces to a multiple of 8."""
    meta: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in sorted(entries):
        nbytes = 2 * math.prod(shape)
        span = [offset, offset + nbytes]
        meta[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": span}
        offset += nbytes
    raw = json.dumps(meta, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def pair_dir(config) -> Path:
    c = config
    name = (
        f"llama-h{c.hidden_size}-i{c.intermediate_size}-l{c.num_hidden_layers}"
        f"-kv{c.num_key_value_heads}-v{c.vocab_size}"
    )
    return CACHE / "pairs" / name


def write_pair(config, dest: Path, seed: int = 0, chunk: int = 1 << 22) -> None:
    """REF ~ N(0, 0.02) (norms ~ 1), MEM = REF + N(0, 0.002), both bf16, generated chunk by
    chunk and written straight into shards whose headers go first: never the whole model in
    memory. Noise comes from a fixed random pool at random offsets (half the generation cost)."""
    from transformers import GenerationConfig

    tmp = dest.with_name(dest.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tensors = state_shapes(config)
    shards = split_shards(tensors)
    total = sum(2 * math.prod(shape) for _, shape in tensors)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    index = {
        "metadata": {"total_parameters": total // 2, "total_size": total},
        "weight_map": {n: names[i] for i, shard in enumerate(shards) for n, _ in shard},
    }
    for side in ("ref", "mem"):
        (tmp / side).mkdir(parents=True)
        config.save_pretrained(tmp / side)
        GenerationConfig.from_model_config(config).save_pretrained(tmp / side)
        text = json.dumps(index, indent=2, sort_keys=True) + "\n"
        (tmp / side / INDEX).write_text(text)

    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(4 * chunk, generator=gen).mul_(0.002)
    bar = tqdm(total=2 * total, unit="B", unit_scale=True, desc=f"generating {dest.name}")
    for name, shard in zip(names, shards, strict=True):
        with open(tmp / "ref" / name, "wb") as fr, open(tmp / "mem" / name, "wb") as fm:
            header = shard_header(shard)
            fr.write(header)
            fm.write(header)
            for tensor_name, shape in sorted(shard):
                numel = math.prod(shape)
                center = 1.0 if tensor_name.endswith("norm.weight") else 0.0
                for start in range(0, numel, chunk):
                    n = min(chunk, numel - start)
                    ref = torch.randn(n, generator=gen).mul_(0.02).add_(center)
                    at = int(torch.randint(0, pool.numel() - n + 1, (1,), generator=gen))
                    mem = ref + pool[at : at + n]
                    fr.write(ref.to(torch.bfloat16).view(torch.int16).numpy())
                    fm.write(mem.to(torch.bfloat16).view(torch.int16).numpy())
                    bar.update(4 * n)
    bar.close()
    tmp.rename(dest)


def ensure_pair(config) -> Path:
    """The cached pair for this config, generated if missing."""
    dest = pair_dir(config)
    if not dest.exists():
        dest.parent.mkdir(parents=True, exist_ok=True)
        write_pair(config, dest)
    return dest


def weight_files(model: Path) -> list[Path]:
    return sorted(model.glob("*.safetensors"))


def weight_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in weight_files(model))


# ---------------------------------------------------------------------------------------------
# Measuring one run: wall time, then sync time, peak RSS of the process tree.


@dataclass
class Run:
    tool: str
    seconds: float  # the command, start to exit
    sync_seconds: float  # flushing its dirty pages afterwards (os.sync)
    peak_rss: int  # bytes: max of the sampled tree's summed RSS and the kernel's maxrss
    peak_rss_anon: int  # bytes: sampled, anonymous memory only (no mapped file pages)
    kernel_maxrss: int  # bytes: ru_maxrss of the largest single process (from /usr/bin/time)
    returncode: int
    load_before: float  # 1-minute load average when it started
    cold: bool
    output_tail: str = ""
    killed_by_guard: bool = False  # stopped because the machine ran short of memory


def _status_kb(pid: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of one process in bytes; zeros if it is gone."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0, 0
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)

    def kb(key: str) -> int:
        return int(fields.get(key, "0 kB").split()[0]) * 1024

    return kb("VmRSS"), kb("RssAnon")


def drop_page_cache() -> bool:
    """Flush and drop the page cache; False if this container may not."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def warm(paths: list[Path]) -> None:
    files = [str(f) for p in paths for f in weight_files(p)]
    subprocess.run(["cat", *files], stdout=subprocess.DEVNULL, check=True)


def measure(
    tool: str, cmd: list[str] | str, cold: bool, env: dict | None = None, guard: int = 0
) -> Run:
    """Run `cmd` (a list, or a shell line) under /usr/bin/time and poll the memory of the
    processes below it every 10 ms (re-listed every 100 ms). Only what runs below the small
    `time` process is counted: a child forked straight from this (torch-sized) process shows
    our own RSS until it execs, in the samples and in its kernel high-water mark alike.
    With `guard`, the run is killed when the machine's available memory falls below that many
    bytes: the machine is shared, and the OOM killer would not pick only our processes."""
    load = os.getloadavg()[0]
    log, maxrss_file = CACHE / "last-run.log", CACHE / "last-run.maxrss"
    argv = ["bash", "-c", cmd] if isinstance(cmd, str) else cmd
    with open(log, "wb") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            ["/usr/bin/time", "-f", "%M", "-o", str(maxrss_file), *argv],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
        peak = peak_anon = 0
        below: list[int] = []
        tick = 0
        killed = False
        while True:
            pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            if tick % 10 == 0:
                try:
                    below = [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
                except psutil.NoSuchProcess:
                    below = []
            samples = [_status_kb(p) for p in below]
            peak = max(peak, sum(s[0] for s in samples))
            peak_anon = max(peak_anon, sum(s[1] for s in samples))
            if guard and not killed and psutil.virtual_memory().available < guard:
                killed = True
                for child in below:
                    try:
                        os.kill(child, 9)
                    except ProcessLookupError:
                        pass
            tick += 1
            time.sleep(0.01)
        seconds = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    start = time.perf_counter()
    os.sync()
    sync_seconds = time.perf_counter() - start
    tail = log.read_text(errors="replace")[-2000:]
    if proc.returncode != 0:
        print(f"  {tool}: exit {proc.returncode}\n{tail}", file=sys.stderr)
    found = re.findall(r"^(\d+)$", maxrss_file.read_text(), re.MULTILINE)
    kernel_peak = int(found[-1]) * 1024 if found else 0
    return Run(
        tool, seconds, sync_seconds, max(peak, kernel_peak), peak_anon, kernel_peak,
        proc.returncode, load, cold, tail, killed,
    )  # fmt: skip


# ---------------------------------------------------------------------------------------------
# The tools.


def moxkit_bin() -> str:
    local = Path(sys.executable).parent / "moxkit"
    return str(local) if local.exists() else (shutil.which("moxkit") or "moxkit")


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
    if tool == "moxkit":
        cmd = [moxkit_bin(), "extrapolate", str(ref), str(mem), "--alpha", str(ALPHA), "-o",
               str(out), "--quiet", "--device", args.device, "--max-memory", "1GiB"]  # fmt: skip
        return [("moxkit", cmd)]
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
    difference in bf16 units in the last place (as bit patterns of same-sign values)."""
    outs = {t: CACHE / "runs" / t for t in tools if t in ("moxkit", "plain", "mergekit")}
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
            "max_ulps_bf16": worst_ulps,
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


def describe_machine() -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor(),
    )  # fmt: skip
    df = subprocess.run(["df", "-hT", str(CACHE)], capture_output=True, text=True).stdout
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "ram_gib": round(psutil.virtual_memory().total / GIB, 1),
        "disk": df.strip().splitlines()[-1] if df else "unknown",
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "note": "KVM guest; the 2 cores are shared with other engineers running tests, so the "
        "figures are noisy: medians of the repeats, load average recorded per run.",
    }


def versions() -> dict:
    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.strip()
        except OSError:
            return "not installed"

    mergekit_py = MERGEKIT_VENV / "bin" / "python"
    return {
        "moxkit_commit": run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"]),
        "mergekit": run([str(mergekit_py), "-c", "import importlib.metadata as m;"
                         "print(m.version('mergekit'), 'torch', m.version('torch'))"]),
    }  # fmt: skip


def fmt_gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.0f} MiB"


def num(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def is_reference(label: str) -> bool:
    """The start-up row is there to read the others by; it does not do the job."""
    return label.startswith("python start-up")


def table(case: dict, title: str) -> list[str]:
    """One case as a markdown table, from its JSON summary."""
    rows = case["summary"]
    repeats = max(row["repeats"] for row in rows.values())
    lines = [
        f"### {title}",
        "",
        f"{case['params'] / 1e9:.2f}B parameters, {case['checkpoint_bytes'] / GB:.2f} GB per "
        f"checkpoint; {3 * case['checkpoint_bytes'] / GB:.2f} GB moved per run (read REF + MEM, "
        f"write OUT); up to {repeats} runs of each, interleaved.",
        "",
        "| tool | time (s, median) | best (s) | all runs (s) | GB/s | × floor | peak RSS "
        "| peak anon RSS |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for label, row in rows.items():
        runs = ", ".join(f"{t:.1f}" for t in row["seconds_all"])
        if row.get("killed_by_guard"):
            runs += f" ({row['killed_by_guard']} killed: machine out of memory)"
        best = row.get("seconds_best", min(row["seconds_all"]))
        rate, ratio = (None, None) if is_reference(label) else (row["gb_per_s"], row.get("x_floor"))
        lines.append(
            f"| {label} | {num(row['seconds_median'])} | {num(best)} | {runs} | {num(rate)} | "
            f"{num(ratio)} | {fmt_gib(row['peak_rss_bytes'])} | "
            f"{fmt_gib(row['peak_rss_anon_bytes'])} |"
        )
    return lines + [""]


def agreement_lines(case: dict) -> list[str]:
    lines = []
    for tool, a in case.get("agreement", {}).items():
        lines.append(
            f"- {tool} against {a['against']}: "
            f"{a['tensors_bit_identical']}/{a['tensors']} tensors bit-identical, "
            f"{a['values_differing']} values differ, at most {a['max_ulps_bf16']} bf16 ulp"
        )
    return lines


def preamble(report: dict, title: str) -> list[str]:
    m = report["machine"]
    return [
        f"# {title}",
        "",
        f"`{report['command']}`, {report['date_utc']} UTC, α = {report['alpha']}, device "
        f"{report['device']}, moxkit at commit {report['versions']['moxkit_commit']}, mergekit "
        f"{report['versions']['mergekit']}.",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB RAM; disk `{m['disk']}`. "
        + m["note"],
        "",
        "Time is the whole subprocess (Python start-up and imports included). GB/s = bytes "
        "moved / median time. × floor: median against the fastest floor form's median. Peak "
        "RSS: summed over the process tree, polled every 10 ms, and never below the kernel's "
        "ru_maxrss (from /usr/bin/time); anon RSS leaves out mapped file pages.",
        "",
    ]


def render_main(report: dict) -> list[str]:
    cases = report["cases"]
    lines = preamble(report, "moxkit extrapolate, end to end (warm page cache)")
    lines += table(cases[0], cases[0]["name"])
    if len(cases) > 1:
        lines += table(cases[1], cases[1]["name"] + " (twice the model)")
    lines += headline(cases[0]["summary"], cases[1]["summary"] if len(cases) > 1 else None)
    if cases[0].get("agreement"):
        lines += ["", "Outputs compared (every tensor, bf16 bit patterns):", ""]
        lines += agreement_lines(cases[0])
    return lines


def headline(rows: dict[str, dict], doubled: dict[str, dict] | None) -> list[str]:
    """The issue's goals, checked against what was measured (reported, not asserted)."""
    if "moxkit" not in rows:
        return []
    mox = rows["moxkit"]
    lines = ["", "Against the goals (warm cache):", ""]
    lines.append(f"- moxkit at {mox['x_floor']:.2f}× the I/O floor (goal: within 2×)")
    if "mergekit" in rows:
        speedup = rows["mergekit"]["seconds_median"] / mox["seconds_median"]
        lines.append(f"- moxkit {speedup:.1f}× faster than mergekit (goal: at least 5×)")
    if "plain script" in rows:
        speedup = rows["plain script"]["seconds_median"] / mox["seconds_median"]
        lines.append(f"- the plain script takes {speedup:.1f}× moxkit's time")
    lines.append(f"- moxkit peak RSS {fmt_gib(mox['peak_rss_bytes'])} (goal: under 1 GiB)")
    if doubled and "moxkit" in doubled:
        lines.append(
            f"- twice the model: moxkit peak RSS {fmt_gib(doubled['moxkit']['peak_rss_bytes'])} "
            f"(vs {fmt_gib(mox['peak_rss_bytes'])})"
            + (f"; the plain script's went from {fmt_gib(rows['plain script']['peak_rss_bytes'])}"
               f" to {fmt_gib(doubled['plain script']['peak_rss_bytes'])}"
               if "plain script" in doubled and "plain script" in rows else "")
        )  # fmt: skip
    return lines


def render_7b(report: dict) -> list[str]:
    case = report["case"]
    rows = case["summary"]
    lines = preamble(report, "moxkit extrapolate, Llama-2-7B shapes, cold page cache")
    lines += [
        "Page cache dropped before every run, then the Python programs' own files read back "
        "(`import torch, safetensors, moxkit`, not timed): the checkpoints are cold, not the "
        "interpreter. Time includes syncing the output to disk. The floor reads MEM with cat "
        "while cp copies REF (each input byte read once; reading both first and then copying "
        "REF would read REF from disk twice, since the inputs do not fit in the page cache). "
        "moxkit runs under --max-memory 1GiB. The plain script runs once, under a guard that "
        f"kills it if the machine's available memory falls under {report['memory_guard_gib']} "
        "GiB.",
        "",
    ]
    lines += table(case, case["name"])
    mox = rows.get("moxkit", {})
    if mox.get("x_floor"):
        lines.append(
            f"- moxkit at {mox['x_floor']:.2f}× the cold-cache I/O floor (goal: within 1.5×), "
            f"peak RSS {fmt_gib(mox['peak_rss_bytes'])} (budget 1 GiB)"
        )
    plain = rows.get("plain script")
    if plain and plain.get("killed_by_guard"):
        lines.append(
            f"- the plain script could not run: killed when the machine ran out of memory, "
            f"at {fmt_gib(plain['peak_rss_bytes'])} RSS"
        )
    elif plain and mox.get("seconds_median"):
        lines.append(
            f"- the plain script did run: {plain['seconds_median'] / mox['seconds_median']:.1f}× "
            f"moxkit's time, peak RSS {fmt_gib(plain['peak_rss_bytes'])} of the machine's "
            f"{report['machine']['ram_gib']} GiB ({fmt_gib(plain['peak_rss_anon_bytes'])} "
            "anonymous: safetensors' load_file maps the inputs, so only OUT must fit in RAM)"
        )
    return lines + agreement_lines(case)


def bar_chart(report: dict, path: Path) -> None:
    """Median time and peak RSS per tool for the main case (and the 2x-model runs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, times, rss = [], [], []
    for i, case in enumerate(report["cases"]):
        for label, row in case["summary"].items():
            if is_reference(label) or (i > 0 and label.startswith("floor")):
                continue
            labels.append(label if i == 0 else f"{label}, 2× model")
            times.append(row["seconds_median"])
            rss.append(row["peak_rss_bytes"] / GIB)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(12, 0.55 * len(labels) + 1.8))
    ax_t.barh(labels, times, color="tab:blue")
    ax_t.set_xlabel("wall time, s (median)")
    ax_m.barh(labels, rss, color="tab:orange")
    ax_m.set_xlabel("peak RSS, GiB")
    ax_m.set_yticklabels([])
    ax_m.axvline(1.0, color="gray", linestyle="--", linewidth=1)
    ax_m.text(1.0, -0.6, " 1 GiB", color="gray")
    for ax, values in ((ax_t, times), (ax_m, rss)):
        ax.invert_yaxis()
        for y, v in enumerate(values):
            ax.text(v, y, f" {v:.2f}", va="center")
        ax.margins(x=0.2)
    first = report["cases"][0]["name"]
    fig.suptitle(f"moxkit extrapolate, {first}: time and peak memory ({report['date_utc']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(report: dict, stem: Path) -> None:
    """JSON, then the markdown (and for the main case the chart) made from it alone."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2) + "\n")
    render(stem)


def render(stem: Path) -> None:
    report = json.loads(stem.with_suffix(".json").read_text())
    lines = render_7b(report) if "case" in report else render_main(report)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    if "cases" in report:
        bar_chart(report, stem.with_suffix(".png"))
    print("\n".join(lines))


def case_json(case: Case, rows: dict) -> dict:
    return {
        **{k: v for k, v in asdict(case).items() if k != "runs"},
        "summary": rows,
        "runs": {k: [asdict(x) for x in v] for k, v in case.runs.items()},
    }


def report_head(args, benchmark: str, timing: str) -> dict:
    return {
        "benchmark": benchmark,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": describe_machine(),
        "versions": versions(),
        "alpha": ALPHA,
        "device": args.device,
        "timing": timing,
    }


def main_case(args) -> None:
    tools = [t for t in args.tools.split(",") if t]
    if args.skip_mergekit and "mergekit" in tools:
        tools.remove("mergekit")
    check_tools(tools)
    config = llama_config(args.params)
    pair = ensure_pair(config)
    params = sum(math.prod(s) for _, s in state_shapes(config))
    case = Case(f"{params / 1e9:.2f}B warm", params, weight_bytes(pair / "ref"), cold=False)
    run_case(case, pair, tools, args.repeats, args)
    cases = [case_json(case, summarize(case, with_sync=False))]

    if args.double and "moxkit" in tools:
        config2 = llama_config(2 * args.params)
        pair2 = ensure_pair(config2)
        params2 = sum(math.prod(s) for _, s in state_shapes(config2))
        size2 = weight_bytes(pair2 / "ref")
        doubled = Case(f"{params2 / 1e9:.2f}B warm", params2, size2, cold=False)
        tools2 = [t for t in ("floor", "moxkit", "plain") if t in tools]
        run_case(doubled, pair2, tools2, args.repeats, args)
        cases.append(case_json(doubled, summarize(doubled, with_sync=False)))

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
    pair = pair_dir(config)
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
        tools = ["floor", "startup", "moxkit"]
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
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--no-double", dest="double", action="store_false",
                        help="skip the twice-the-model run")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=3)
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
