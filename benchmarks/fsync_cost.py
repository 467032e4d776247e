"""What `moxkit extrapolate --fsync` costs: the same run with and without it, interleaved, in
one process tree on one disk, plus the run without it followed by `sync` (what a user would
otherwise do to make OUT survive a power loss).

    python benchmarks/fsync_cost.py [--mib 256] [--repeats 3]

Writes benchmarks/results/fsync_cost.json and .md. The inputs stay in the page cache (read
once before timing); only writing differs between the conditions.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, ROOT, load_text, result_head, write_json

CONDITIONS = {
    "plain": ([], False),  # OUT published; its data may still be in the page cache only
    "--fsync": (["--fsync"], False),  # files and folders flushed before OUT is published
    "plain + sync": ([], True),  # the same guarantee obtained afterwards with sync(1)
}


def write_bf16_file(path: Path, numel: int, seed: int) -> None:
    """One bf16 tensor of random finite values, written as a safetensors file."""
    header = f'{{"w":{{"dtype":"BF16","shape":[{numel}],"data_offsets":[0,{2 * numel}]}}}}'
    header += " " * (-len(header) % 8)
    bits = np.random.default_rng(seed).integers(0x3C00, 0x4000, numel, dtype=np.uint16)
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header.encode())
        bits.tofile(f)


def timed_run(ref: Path, mem: Path, out: Path, extra: list[str], then_sync: bool) -> float:
    cmd = [sys.executable, "-m", "moxkit.cli.main", "extrapolate", str(ref), str(mem),
           "-a", "4", "-o", str(out), "-q", *extra]  # fmt: skip
    subprocess.run(["sync"], check=True)  # start every condition with no dirty pages
    started = time.perf_counter()
    subprocess.run(cmd, check=True)
    if then_sync:
        subprocess.run(["sync"], check=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", type=int, default=256, help="size of each input and of OUT")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    report = result_head("fsync cost", measured=("moxkit/atomic.py",), disk_of=ROOT)
    numel = args.mib * 2**20 // 2
    times: dict[str, list[float]] = {name: [] for name in CONDITIONS}
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
        root = Path(tmp)
        ref, mem, out = root / "ref.safetensors", root / "mem.safetensors", root / "out"
        write_bf16_file(ref, numel, 1)
        write_bf16_file(mem, numel, 2)
        timed_run(ref, mem, out, [], True)  # warm the page cache with the inputs
        for _ in range(args.repeats):
            for name, (extra, then_sync) in CONDITIONS.items():
                shutil.rmtree(out)
                times[name].append(timed_run(ref, mem, out, extra, then_sync))
    medians = {name: statistics.median(t) for name, t in times.items()}
    report.update(
        output_mib=args.mib,
        repeats=args.repeats,
        seconds=times,
        median_seconds=medians,
        ratio_to_plain={name: m / medians["plain"] for name, m in medians.items()},
    )
    path = write_json(report, RESULTS / "fsync_cost")
    lines = [
        f"# fsync cost: {args.mib} MiB output, median of {args.repeats} interleaved runs",
        "",
        f"{report['date_utc']} UTC, commit {report['git_commit']}, {report['machine']['cpu']}, "
        f"disk `{report['machine'].get('disk', '?')}`, {load_text(report['machine'])}.",
        "",
        "| condition | median s | x plain |",
        "|---|---|---|",
    ]
    lines += [
        f"| {name} | {medians[name]:.2f} | {report['ratio_to_plain'][name]:.2f} |"
        for name in CONDITIONS
    ]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
