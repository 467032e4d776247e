"""How fast, and in how much memory, moxkit validates a huge safetensors header.

The case of issue 8: a valid header of 91 MiB naming 1.3 M tensors. Each measurement runs in
a fresh process (peak RSS is the process's ru_maxrss), the code before and after the
incremental parser side by side in the same run:

- header, before: read_header of moxkit/engine/checkpoint.py at BEFORE (json.loads of the whole
  header, then one dict per entry), loaded from git history;
- header, after: read_header of the working tree, without and with a 1 GiB budget;
- extrapolate --dry-run, before and after: the whole validation of a run (REF and MEM of
  1.3 M tensors each, pairing, output layout) under --max-memory 1GiB, the old tree unpacked
  from git at BEFORE.

    .venv/bin/python benchmarks/header_validation.py [--tensors 1300000]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

from _common import RESULTS, ROOT, load_text, result_head, write_json

BEFORE = "70d44a4"  # the last commit before the incremental parser (moxkit/engine/checkpoint.py)
CACHE = ROOT / "benchmarks" / ".cache" / "header_validation"
GIB = 2**30

# runs in a child process: validate, then report seconds, tensors and peak RSS as JSON
CHILD = """
import json, resource, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
mode, path = sys.argv[2], Path(sys.argv[3])
if mode == "before":
    import importlib.util, moxkit
    spec = importlib.util.spec_from_file_location("moxkit.checkpoint_before", sys.argv[4])
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    validate = lambda: module.read_header(path)
else:
    from moxkit.engine.checkpoint import read_header
    budget = int(sys.argv[4]) or None
    validate = lambda: read_header(path, budget)
started, cpu = time.perf_counter(), time.process_time()
tensors, _ = validate()
seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
print(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "tensors": len(tensors),
                  "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""

# the CLI in a child process that reports its peak RSS (and which moxkit ran) when it exits
DRY_RUN = """
import atexit, json, resource, sys, time
import moxkit
atexit.register(lambda: print(json.dumps({"moxkit": moxkit.__file__,
    "cpu_seconds": time.process_time(),
    "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})))
from moxkit.cli.main import main
main(sys.argv[1:])
"""


def make_header_file(path: Path, n: int) -> int:
    """A valid safetensors file of n one-element F32 tensors, written as safetensors
    writes it (compact JSON). Returns the header length."""
    parts = []
    for i in range(n):
        offsets = f"[{4 * i},{4 * i + 4}]"
        parts.append(f'"e.{i}.w":{{"dtype":"F32","shape":[1],"data_offsets":{offsets}}}')
    raw = ("{" + ",".join(parts) + "}").encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        fh.write(bytes(4 * n))
    return len(raw)


def old_tree(folder: Path) -> Path:
    """The repository at BEFORE, unpacked (python sources only: the dry run needs no C)."""
    archive = subprocess.run(["git", "archive", BEFORE, "moxkit", "cli", "kernels"], cwd=ROOT,
                             check=True, capture_output=True).stdout  # fmt: skip
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    # the package-dir mapping of pyproject: moxkit.cli and moxkit.kernels live at the top
    shutil.move(folder / "cli", folder / "moxkit" / "cli")
    shutil.move(folder / "kernels", folder / "moxkit" / "kernels")
    return folder


def run_child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1]}
    return json.loads(proc.stdout)


def run_dry_run(pythonpath: Path, ref: Path, mem: Path, out: Path) -> dict:
    """`moxkit extrapolate REF MEM --dry-run --max-memory 1GiB` as a process; its peak RSS
    from /usr/bin/time's view of the child (ru_maxrss of RUSAGE_CHILDREN)."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", DRY_RUN, "extrapolate", str(ref), str(mem), "-a", "2", "-o",
         str(out), "--dry-run", "--max-memory", "1GiB", "-q"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(pythonpath)},
    )  # fmt: skip
    seconds = time.perf_counter() - started
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    report = json.loads(next(line for line in lines if line.startswith("{")))
    rest = [line for line in lines if not line.startswith("{")]
    return {
        "seconds": seconds,
        "returncode": proc.returncode,
        "cpu_seconds": report["cpu_seconds"],
        "peak_rss": report["peak_rss"],
        "moxkit": report["moxkit"],
        "last_line": rest[-1][:300] if rest else "",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=1_300_000)
    parser.add_argument("--skip-dry-run", action="store_true")
    args = parser.parse_args()

    report = result_head("header validation", measured=("moxkit/engine/checkpoint.py",))
    CACHE.mkdir(parents=True, exist_ok=True)
    ref, mem = CACHE / "ref.safetensors", CACHE / "mem.safetensors"
    header_len = make_header_file(ref, args.tensors)
    shutil.copyfile(ref, mem)
    report["case"] = {"tensors": args.tensors, "header_bytes": header_len, "before": BEFORE}

    with tempfile.TemporaryDirectory() as scratch:
        old = old_tree(Path(scratch) / "before")
        before_module = old / "moxkit" / "checkpoint.py"
        runs = {
            "header, before": run_child([str(old), "before", str(ref), str(before_module)]),
            "header, after": run_child([str(ROOT), "after", str(ref), "0"]),
            "header, after, 1 GiB budget": run_child([str(ROOT), "after", str(ref), str(GIB)]),
        }
        if not args.skip_dry_run:
            out = Path(scratch) / "out"
            runs["extrapolate --dry-run, before"] = run_dry_run(old, ref, mem, out)
            runs["extrapolate --dry-run, after"] = run_dry_run(ROOT, ref, mem, out)
    report["runs"] = runs
    path = write_json(report, RESULTS / "header_validation")
    (RESULTS / "header_validation.md").write_text(render(report))
    print(f"wrote {path} and {path.with_suffix('.md')}")


def render(report: dict) -> str:
    case, runs = report["case"], report["runs"]
    lines = [
        "# Header validation: 1.3 M tensors",
        "",
        f"A valid safetensors header of {case['header_bytes'] / 2**20:.1f} MiB naming "
        f"{case['tensors']:,} tensors (the case of issue 8). Each run is a fresh process; "
        f"'before' is moxkit at {case['before']}, run side by side in the same session.",
        "",
        f"Machine: {report['machine']['cpu']}, {report['machine']['cores_usable']} cores, "
        f"{load_text(report['machine'])} (shared machine: compare the ratios).",
        f"Commit {report['git_commit']}, {report['date_utc']} UTC. Command: `{report['command']}`.",
        "",
        "| run | wall s | CPU s | tensors per CPU s | peak RSS | result |",
        "|---|---|---|---|---|---|",
    ]
    for name, run in runs.items():
        if "error" in run:
            lines.append(f"| {name} | | | | | error: {run['error']} |")
            continue
        rate = f"{run['tensors'] / run['cpu_seconds']:,.0f}" if "tensors" in run else ""
        peak = f"{run['peak_rss'] / 2**20:,.0f} MiB" if run.get("peak_rss") else "n/a"
        result = (
            f"{run['tensors']:,} tensors"
            if "tensors" in run
            else f"exit {run['returncode']}: {run['last_line']}"
        )
        lines.append(
            f"| {name} | {run['seconds']:.1f} | {run['cpu_seconds']:.1f} | {rate} | {peak} "
            f"| {result} |"
        )
    before, after = runs.get("header, before", {}), runs.get("header, after", {})
    if "seconds" in before and "seconds" in after:
        lines += [
            "",
            f"Header validation after/before: {after['cpu_seconds'] / before['cpu_seconds']:.2f}x "
            f"the CPU time ({after['seconds'] / before['seconds']:.2f}x the wall time), "
            f"{after['peak_rss'] / before['peak_rss']:.2f}x the peak RSS. CPU seconds are the "
            "fairer figure on a shared machine: wall time includes waiting for a core.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
