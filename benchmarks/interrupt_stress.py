"""Ctrl-C at random moments: how often does an interrupted `moxkit extrapolate` end other than
cleanly (exit 130, one line, nothing left beside OUT)? The issue that asked for this counted
about 2 segfaults in 70 before the pipeline waited for the CPU pool.

    python benchmarks/interrupt_stress.py [--runs 40] [--mib 64]

One tensor large enough that the C loop splits every chunk over its thread pool; each run is
interrupted (SIGINT, or SIGTERM every other run) after a random delay drawn over the run's
measured length. A signal that lands before main() has installed its handlers (interpreter
start-up and imports, a few hundred ms on a loaded machine) meets Python's defaults: SIGTERM
kills the process, SIGINT raises KeyboardInterrupt in an import; nothing has been written.
Writes benchmarks/results/interrupt_stress.json and .md (stderr of any other outcome kept).
"""

from __future__ import annotations

import argparse
import collections
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, ROOT, load_text, result_head, write_json
from fsync_cost import write_bf16_file

ODD: list[str] = []  # stderr of every run that ended in none of the expected ways


def outcome(proc: subprocess.Popen, root: Path) -> str:
    _, err = proc.communicate(timeout=300)
    left = sorted(p.name for p in root.iterdir() if p.name not in ("ref.safetensors",
                                                                    "mem.safetensors"))  # fmt: skip
    lines = err.strip().splitlines()
    if proc.returncode < 0:  # Python's own handlers: before main() installed ours or after
        name = signal.Signals(-proc.returncode).name  # it restored them, at exit
        if not left:
            return f"killed by {name} at start-up, nothing written"
        if left == ["out"]:
            return f"killed by {name} at exit, OUT complete"
        ODD.append(err)
        return f"killed by {name}, left {left}"
    if proc.returncode == 0:
        return "finished before the signal" if left == ["out"] else f"exit 0, left {left}"
    if "Fatal Python error: init_import_site" in err and not left:
        return "SIGINT in the interpreter's own start-up (site), nothing written"
    if proc.returncode == 130 and len(lines) == 1 and not left:
        return "clean interrupt"
    if proc.returncode == 130 and len(lines) == 1 and left == ["out"] and "complete" in lines[0]:
        return "interrupted while publishing, OUT complete"
    ODD.append(err)
    return f"exit {proc.returncode}, {len(lines)} lines, left {left}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--mib", type=int, default=64, help="size of each input")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    report = result_head(
        "interrupt stress", measured=("moxkit/engine/stream.py", "moxkit/atomic.py")
    )
    counts: collections.Counter[str] = collections.Counter()
    with tempfile.TemporaryDirectory(dir=ROOT / "benchmarks") as tmp:
        root = Path(tmp)
        numel = args.mib * 2**20 // 2
        write_bf16_file(root / "ref.safetensors", numel, 1)
        write_bf16_file(root / "mem.safetensors", numel, 2)
        cmd = [sys.executable, "-m", "moxkit.cli.main", "extrapolate",
               str(root / "ref.safetensors"), str(root / "mem.safetensors"), "-a", "4",
               "-o", str(root / "out"), "-q", "--device", "cpu"]  # fmt: skip
        started = time.perf_counter()
        subprocess.run(cmd, check=True)
        length = time.perf_counter() - started
        for i in range(args.runs):
            for p in root.iterdir():
                if p.name == "out":
                    subprocess.run(["rm", "-rf", str(p)], check=True)
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(rng.uniform(0, length))
            proc.send_signal(signal.SIGINT if i % 2 == 0 else signal.SIGTERM)
            counts[outcome(proc, root)] += 1
    report.update(
        runs=args.runs,
        input_mib=args.mib,
        run_seconds=length,
        outcomes=dict(counts),
        odd_stderr=ODD,
    )
    path = write_json(report, RESULTS / "interrupt_stress")
    lines = [
        f"# Interrupts at random moments: {args.runs} runs, {args.mib} MiB inputs",
        "",
        f"{report['date_utc']} UTC, commit {report['git_commit']}, {report['machine']['cpu']}, "
        f"{load_text(report['machine'])}; an uninterrupted run took {length:.1f} s.",
        "",
        "| outcome | runs |",
        "|---|---|",
        *[f"| {name} | {n} |" for name, n in counts.most_common()],
    ]
    path.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
