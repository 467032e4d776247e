"""Throughput of the extrapolation arithmetic against the device's own copy bandwidth.

GB/s counts bytes read plus bytes written (2 inputs + 1 output plain, 3 + 1 with momentum),
and each figure is set beside torch's copy_ of one operand on the same device, measured in the
same run, as a percentage of it.

    --device cuda   the Triton kernel: a sweep of block sizes and warps at 256 MB to choose a
                    configuration, then the default and the best one at every size; plus the
                    CUDA backend from pinned host buffers, beside the host<->device copy rates
    --device cpu    moxkit.engine.backends.CpuBackend; the Triton interpreter only as a correctness
                    smoke check (bit-exact against the CPU backend), never timed

Writes benchmarks/results/kernel_throughput_<device>.{json,csv,png,md}: the machine described
and the load average recorded (the machine may be shared; ratios from one run are what count).

    .venv/bin/python benchmarks/kernel_throughput.py --device cpu
    python3 benchmarks/kernel_throughput.py --device cuda
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

from _common import RESULTS, load_text, result_head, write_json

DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
GPU_CONFIGS = [(b, w) for b in (1024, 2048, 4096, 8192, 16384) for w in (4, 8)]
SWEEP_MB = 256
# the code whose speed this measures: a change elsewhere does not make the figures stale
MEASURED_PATHS = (
    "moxkit/kernels",
    "moxkit/engine/backends.py",
    "moxkit/engine/_fused.c",
    "moxkit/engine/torch_path.py",
    "moxkit/engine/formula.py",
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument(
        "--sizes",
        default=None,
        help="MB per operand, comma-separated (default: cpu 4,64,256; cuda 4,64,256,1024)",
    )
    p.add_argument("--dtypes", default="fp32,bf16,fp16")
    p.add_argument(
        "--cpu-paths",
        default=None,
        help="paths of the C loop to time, comma-"
        "separated (default: every vector path this CPU runs; 'generic' is slow)",
    )
    p.add_argument("--repeats", type=int, default=9, help="timed rounds per figure on the CPU")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    return p.parse_args()


def device_info(device: str) -> dict:
    import torch

    info = {"torch_threads": torch.get_num_threads()}
    if device == "cuda":
        import triton

        props = torch.cuda.get_device_properties(0)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            gpu_sms=props.multi_processor_count,
            cuda=torch.version.cuda,
            triton=triton.__version__,
        )
    return info


def time_cpu(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, best) seconds of `repeats` runs after one warm-up."""
    times = time_rounds({"fn": fn}, repeats)["fn"]
    return statistics.median(times), min(times)


def time_cuda(fn: Callable[[], object]) -> tuple[float, float]:
    from triton.testing import do_bench

    med, best = do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.0])
    return med / 1e3, best / 1e3


def operands(n: int, dtype, device: str, count: int):
    import torch

    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(n, generator=g, device=device).to(dtype) for _ in range(count)]


def row(device, dtype_name, form, size_mb, n, config, secs, nbytes, copy_gbps=None) -> dict:
    med, best = secs
    r = {
        "device": device,
        "dtype": dtype_name,
        "form": form,
        "size_mb": size_mb,
        "elems": n,
        "config": config,
        "seconds_median": med,
        "seconds_best": best,
        "gbps_median": nbytes / med / 1e9,
        "gbps_best": nbytes / best / 1e9,
    }
    r["pct_of_copy"] = 100 * r["gbps_median"] / copy_gbps if copy_gbps else None
    return r


def time_rounds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per run of each function, measured round-robin after one warm-up each, so that
    on a shared machine the copy and the kernel see the same background load."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def bench_cpu(args, sizes, dtypes) -> tuple[list[dict], dict]:
    import torch

    from moxkit.engine import backends
    from moxkit.engine.formula import PAPER_ETA, Coefficients

    threaded, single = backends.CpuBackend(), backends.CpuBackend(threads=1)
    plain, momentum = Coefficients(4.0), Coefficients(4.0, PAPER_ETA)
    available = backends.cpu_paths()
    paths = args.cpu_paths.split(",") if args.cpu_paths else available[1:] or available
    for path in paths:
        if path not in available:
            sys.exit(f"kernel_throughput: this CPU runs the paths {available}, not {path!r}")

    def on_path(path: str, fn: Callable[[], object]) -> Callable[[], object]:
        def timed() -> None:
            backends.set_cpu_path(path)
            fn()

        return timed

    def measure(name: str, mb: int) -> list[dict]:
        dtype = getattr(torch, DTYPE_NAMES[name])
        n = mb * 2**20 // dtype.itemsize
        ref, mem, prev, out = operands(n, dtype, "cpu", 4)
        b = n * dtype.itemsize
        threads = torch.get_num_threads()

        def copy_one_thread() -> None:
            torch.set_num_threads(1)
            out.copy_(ref)
            torch.set_num_threads(threads)

        fns = {"copy": lambda: out.copy_(ref), "copy 1 thread": copy_one_thread}
        for path in paths:
            for be, x in ((threaded, f"x{threaded.threads}"), (single, "x1")):
                fns[f"plain {path} {x}"] = on_path(path, lambda be=be: be.extrapolate(
                    out, ref, mem, None, plain))  # fmt: skip
                fns[f"momentum {path} {x}"] = on_path(path, lambda be=be: be.extrapolate(
                    out, ref, mem, prev, momentum))  # fmt: skip
        times = time_rounds(fns, args.repeats)
        backends.set_cpu_path(None)
        # the reference copy of each round: the faster of torch's threaded and 1-thread copy_
        # (on a loaded machine waking torch's thread pool can cost more than it gains)
        copies = [min(pair) for pair in zip(times["copy"], times["copy 1 thread"], strict=True)]
        rows = []
        for label, ts in times.items():
            if label.startswith("copy"):
                form, k = label, 2
                config = f"torch copy_ x{threads if label == 'copy' else 1}"
            else:
                form, path, x = label.split()
                k, config = (3 if form == "plain" else 4), f"CpuBackend {path} {x}"
            r = row("cpu", name, form, mb, n, config, (statistics.median(ts), min(ts)), k * b)
            if not form.startswith("copy"):  # the median over rounds of the ratio to the copy
                r["pct_of_copy"] = 100 * statistics.median(
                    (k * b / t) / (2 * b / tc) for t, tc in zip(ts, copies, strict=True)
                )
            rows.append(r)
        print_rows(rows)
        return rows

    rows = [r for name in dtypes for mb in sizes for r in measure(name, mb)]
    extra = {
        "cpu_paths_available": available,
        "cpu_path_default": backends.cpu_path(),
        "interpreter_check": interpreter_check(dtypes),
    }
    return rows, extra


def interpreter_check(dtypes) -> dict:
    """The Triton kernel in the interpreter, bit for bit against the CPU backend."""
    import torch

    from moxkit.engine.backends import CpuBackend
    from moxkit.engine.formula import PAPER_ETA, Coefficients
    from moxkit.kernels import extrapolate

    n = (1 << 16) + 3
    results = {}
    for name in dtypes:
        dtype = getattr(torch, DTYPE_NAMES[name])
        ref, mem, prev = operands(n, dtype, "cpu", 3)
        for form, p, eta in (("plain", None, None), ("momentum", prev, PAPER_ETA)):
            got = extrapolate(ref, mem, 4.0, prev=p, eta=eta if eta else 1.0)
            want = torch.empty_like(got)
            CpuBackend().extrapolate(want, ref, mem, p, Coefficients(4.0, eta))
            same = torch.equal(
                got.view(torch.int16 if dtype.itemsize == 2 else torch.int32),
                want.view(torch.int16 if dtype.itemsize == 2 else torch.int32),
            )
            results[f"{name}/{form}"] = "bit-exact" if same else "MISMATCH"
    print("interpreter check:", results)
    return results


def bench_cuda(args, sizes, dtypes) -> tuple[list[dict], dict]:
    import torch

    from moxkit.engine.formula import PAPER_ETA, Coefficients
    from moxkit.kernels.extrapolate import BLOCK, NUM_WARPS, launch

    rows, chosen = [], {}
    bad = torch.zeros(1, dtype=torch.int32, device="cuda")
    forms = (("plain", Coefficients(4.0), 3), ("momentum", Coefficients(4.0, PAPER_ETA), 4))

    def measure(name, mb, configs) -> None:
        dtype = getattr(torch, DTYPE_NAMES[name])
        n = mb * 2**20 // dtype.itemsize
        ref, mem, prev, out = operands(n, dtype, "cuda", 4)
        b = n * dtype.itemsize
        copy = row(
            "cuda", name, "copy", mb, n, "torch copy_", time_cuda(lambda: out.copy_(ref)), 2 * b
        )
        rows.append(copy)
        for form, coeffs, k in forms:
            p = prev if coeffs.momentum else None
            for block, warps in configs(name, form):
                secs = time_cuda(
                    lambda p=p, coeffs=coeffs, block=block, warps=warps: launch(
                        out, ref, mem, p, coeffs, bad, block=block, num_warps=warps
                    )
                )
                rows.append(
                    row(
                        "cuda",
                        name,
                        form,
                        mb,
                        n,
                        f"BLOCK={block},warps={warps}",
                        secs,
                        k * b,
                        copy["gbps_median"],
                    )
                )

    for name in dtypes:  # the sweep that chooses the configuration
        start = len(rows)
        measure(name, SWEEP_MB, lambda _n, _f: GPU_CONFIGS)
        torch.cuda.empty_cache()
        for form, _, _ in forms:
            best = max(
                (r for r in rows[start:] if r["form"] == form), key=lambda r: r["gbps_median"]
            )
            chosen[f"{name}/{form}"] = best["config"]
            for r in rows[start:]:
                r["sweep"] = True
        print(f"sweep {name}: best", {k: v for k, v in chosen.items() if k.startswith(name)})
    default = f"BLOCK={BLOCK},warps={NUM_WARPS}"

    def finals(name, form):
        configs = {default, chosen[f"{name}/{form}"]}
        return [tuple(int(x.split("=")[1]) for x in c.split(",")) for c in sorted(configs)]

    for name in dtypes:
        for mb in sizes:
            start = len(rows)
            measure(name, mb, finals)
            torch.cuda.empty_cache()
            print_rows(rows[start:])
    rows += bench_cuda_backend(dtypes)
    return rows, {"chosen_configs": chosen, "default_config": default}


def bench_cuda_backend(dtypes) -> list[dict]:
    """The backend as the engine calls it: pinned host chunks in, pinned host chunk out."""
    import torch

    from moxkit.engine.formula import PAPER_ETA, Coefficients
    from moxkit.kernels.backend import CudaBackend

    rows = []
    n = 8 * 2**20  # the engine's largest chunk
    be = CudaBackend()
    try:
        for name in dtypes:
            dtype = getattr(torch, DTYPE_NAMES[name])
            b = n * dtype.itemsize
            host = [be.allocate_host(b).view(dtype) for _ in range(4)]
            for h in host:
                h.copy_(torch.randn(n).to(dtype))
            dev = torch.empty(n, dtype=dtype, device="cuda")
            for form, src, dst, k in (("h2d copy", host[0], dev, 1), ("d2h copy", dev, host[3], 1)):
                secs = time_cpu(lambda: (dst.copy_(src), torch.cuda.synchronize()), 5)  # noqa: B023
                rows.append(row("cuda", name, form, b >> 20, n, "pinned", secs, k * b))
            for form, coeffs, k in (
                ("backend plain", Coefficients(4.0), 3),
                ("backend momentum", Coefficients(4.0, PAPER_ETA), 4),
            ):
                p = host[2] if coeffs.momentum else None
                secs = time_cpu(lambda: be.extrapolate(host[3], host[0], host[1], p, coeffs), 5)  # noqa: B023
                rows.append(row("cuda", name, form, b >> 20, n, "CudaBackend", secs, k * b))
            print_rows(rows[-4:])
    finally:
        be.close()
    return rows


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        pct = f"{r['pct_of_copy']:5.1f}% of copy" if r.get("pct_of_copy") else ""
        print(
            f"{r['device']:4} {r['dtype']:4} {r['form']:16} {r['size_mb']:5} MB "
            f"{r['config']:22} {r['gbps_median']:8.2f} GB/s (best {r['gbps_best']:.2f}) {pct}"
        )


def plot(rows: list[dict], device: str, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = sorted({r["dtype"] for r in rows})
    fig, axes = plt.subplots(1, len(dtypes), figsize=(5 * len(dtypes), 4), squeeze=False)
    for ax, name in zip(axes[0], dtypes, strict=True):
        lines: dict[str, list] = {}
        for r in rows:
            if r["dtype"] != name or r.get("sweep") or r["form"].startswith(("h2d", "d2h", "back")):
                continue
            label = r["config"] if r["form"].startswith("copy") else f"{r['form']} {r['config']}"
            lines.setdefault(label, []).append((r["size_mb"], r["gbps_median"]))
        for label, pts in sorted(lines.items()):
            xs, ys = zip(*sorted(pts), strict=True)
            ax.plot(
                xs,
                ys,
                marker="o",
                label=label,
                linestyle="--" if label.startswith("torch copy_") else "-",
            )
        ax.set_xscale("log", base=2)
        ax.set_xlabel("MB per operand")
        ax.set_ylabel("GB/s (read + written), median")
        ax.set_title(f"{device} {name}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    args = parse_args()
    import torch

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("kernel_throughput: --device cuda but no CUDA device is available")
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # before Triton is imported: the smoke check
    sizes = [
        int(s)
        for s in (args.sizes or ("4,64,256" if device == "cpu" else "4,64,256,1024")).split(",")
    ]
    dtypes = args.dtypes.split(",")
    report = result_head(f"kernel throughput, {device}", MEASURED_PATHS)
    report["machine"].update(device_info(device))
    print(json.dumps(report["machine"]))
    rows, extra = (bench_cpu if device == "cpu" else bench_cuda)(args, sizes, dtypes)
    stem = args.out_dir / f"kernel_throughput_{device}"
    write_json({**report, **extra, "rows": rows}, stem)
    with open(f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]) + ["sweep"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    render(stem)


def render(stem: Path) -> None:
    """The plot and a markdown table, from the JSON alone."""
    report = json.loads(stem.with_suffix(".json").read_text())
    m, rows = report["machine"], report["rows"]
    device = rows[0]["device"]
    title = m.get("gpu") or f"{m['cpu']}, {m['cores_usable']} cores"
    plot(rows, device, stem.with_suffix(".png"), f"moxkit extrapolate vs copy_: {title}")
    lines = [
        f"`{report['command']}`, {report['date_utc']} UTC, commit {report['git_commit']}, "
        f"{title}, {load_text(m)}.",
        "",
        "| dtype | MB/operand | form | config | GB/s (median) | % of copy |",
        "|---|---:|---|---|---:|---:|",
    ]
    for r in rows:
        if r.get("sweep"):
            continue
        pct = f"{r['pct_of_copy']:.0f}%" if r.get("pct_of_copy") else ""
        lines.append(
            f"| {r['dtype']} | {r['size_mb']} | {r['form']} | {r['config']} | "
            f"{r['gbps_median']:.1f} | {pct} |"
        )
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.json, .csv, .png, .md")


if __name__ == "__main__":
    main()
