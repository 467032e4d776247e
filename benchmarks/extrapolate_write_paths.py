"""How the CPU path should put OUT into the page cache: the CPU time of computing one warm
shard pair's result and writing it to a new file, by each candidate way, side by side.

    buffer, 1 write / chunk     64 MiB chunks computed into a buffer, one pwrite each
                                (moxkit's engine up to commit ffa2105)
    buffer, 256 KiB writes      the same buffer, written 256 KiB at a time
    fused, 256 KiB blocks       CpuBackend.extrapolate_to_file: each 256 KiB block computed in a
                                cache-resident buffer and written at once (the engine now)
    fused, 4 MiB blocks         the same with 4 MiB blocks
    shared mapping of OUT       OUT sized with ftruncate and mapped shared: the loop stores
                                straight into page-cache pages (no copy; a write fault per folio)

Each way runs in its own process (one thread, inputs mapped 64 MiB at a time as the engine
maps them, OpenBLAS kept to one thread), rounds interleaved, each round starting with another
way; user + system CPU time from the kernel's rusage. Run with the
machine otherwise idle; the result goes to benchmarks/results/extrapolate_e2e_write_paths.*.

    .venv/bin/python benchmarks/extrapolate_write_paths.py --rounds 5
"""

from __future__ import annotations

import argparse
import mmap
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from _common import RESULTS, result_head, write_json
from _pairs import CACHE, ensure_pair, llama_config, parse_count, weight_files

from moxkit.engine.backends import CpuBackend
from moxkit.engine.formula import Coefficients
from moxkit.engine.writer import WRITE_BLOCK

CHUNK = 64 * 2**20
# numpy's OpenBLAS threads spin on the other core after start-up, which would count as CPU time
CHILD_ENV = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
WAYS = {
    "buffer, 1 write / chunk": ("buffer", CHUNK),
    "buffer, 256 KiB writes": ("buffer", WRITE_BLOCK),
    "fused, 256 KiB blocks": ("fused", WRITE_BLOCK),
    "fused, 4 MiB blocks": ("fused", 4 * 2**20),
    "shared mapping of OUT": ("mapped", CHUNK),
}


def write_out(way: str, ref: Path, mem: Path, out: Path) -> None:
    """OUT = 5·REF − 4·MEM over the bf16 bits of two files (whole 64 MiB windows only)."""
    kind, block = WAYS[way]
    backend, coeffs = CpuBackend(threads=1), Coefficients(4.0)
    size = os.path.getsize(ref) // CHUNK * CHUNK
    fds = [os.open(p, os.O_RDONLY) for p in (ref, mem)]
    fd = os.open(out, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    if kind == "mapped":
        os.ftruncate(fd, size)
        target = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
    buffer = np.empty(CHUNK // 2, dtype=np.uint16)
    for start in range(0, size, CHUNK):
        maps = [mmap.mmap(f, CHUNK, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE,
                          prot=mmap.PROT_READ, offset=start) for f in fds]  # fmt: skip
        a, b = (np.frombuffer(m, dtype=np.uint16) for m in maps)
        if kind == "fused":
            backend.extrapolate_to_file(fd, start, "BF16", a, b, None, coeffs)  # WRITE_BLOCK
        elif kind == "mapped":
            out = np.frombuffer(target, dtype=np.uint16, count=CHUNK // 2, offset=start)
            backend.extrapolate(out, a, b, None, coeffs)
            del out
        else:
            backend.extrapolate(buffer, a, b, None, coeffs)
            data = memoryview(buffer).cast("B")
            for at in range(0, CHUNK, block):
                os.pwrite(fd, data[at : at + block], start + at)
        del a, b
        for m in maps:
            m.close()
    if kind == "mapped":
        target.close()
    os.close(fd)


def measure(way: str, ref: Path, mem: Path, out: Path) -> dict:
    out.unlink(missing_ok=True)
    os.sync()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--child", way, str(ref), str(mem), str(out)],
                   check=True, env=CHILD_ENV)  # fmt: skip
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    out.unlink()
    return {
        "wall": wall,
        "user": after.ru_utime - before.ru_utime,
        "sys": after.ru_stime - before.ru_stime,
        "load": os.getloadavg()[0],
    }


def render(report: dict) -> str:
    lines = [
        "# Writing OUT into the page cache: CPU time by way of writing",
        "",
        f"`{report['command']}`, {report['date_utc']} UTC, commit {report['git_commit']}; "
        f"{report['out_gb']:.2f} GB of bf16 output from one warm shard pair, one thread, "
        f"{report['rounds']} rounds interleaved, each way in its own process. Load average "
        f"{report['machine']['load_average_at_start'][0]:.1f} at the start, "
        f"{report['machine']['load_average_at_end'][0]:.1f} at the end.",
        "",
        "| way | CPU s (median) | min | max | all (user + sys) |",
        "|---|---:|---:|---:|---|",
    ]
    for way, runs in report["runs"].items():
        cpu = [r["user"] + r["sys"] for r in runs]
        lines.append(
            f"| {way} | {statistics.median(cpu):.2f} | {min(cpu):.2f} | {max(cpu):.2f} | "
            + ", ".join(f"{r['user']:.2f} + {r['sys']:.2f}" for r in runs)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--child"]:
        way, ref, mem, out = sys.argv[2:]
        write_out(way, Path(ref), Path(mem), Path(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    pair = ensure_pair(llama_config(parse_count("0.9B"), "bf16"), "bf16")
    ref, mem = weight_files(pair / "ref")[0], weight_files(pair / "mem")[0]
    subprocess.run(["cat", str(ref), str(mem)], stdout=subprocess.DEVNULL, check=True)
    out = CACHE / "runs" / "write_paths.out"
    out.parent.mkdir(parents=True, exist_ok=True)
    report = result_head("writing OUT into the page cache, by way of writing")
    report |= {"rounds": args.rounds, "out_gb": os.path.getsize(ref) // CHUNK * CHUNK / 1e9}
    report["runs"] = {way: [] for way in WAYS}
    ways = list(WAYS)
    for i in range(args.rounds):  # each round starts with another way: none always goes first
        for way in ways[i % len(ways) :] + ways[: i % len(ways)]:
            report["runs"][way].append(measure(way, ref, mem, out))
    stem = RESULTS / "extrapolate_e2e_write_paths"
    write_json(report, stem)
    stem.with_suffix(".md").write_text(render(report))
    print(render(report))


if __name__ == "__main__":
    main()
