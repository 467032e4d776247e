"""What every benchmark shares, written once: the machine it ran on, the commit it measured,
and how results are written (one JSON file with that head; tables and plots are made from the
JSON alone, so they can be remade without measuring again).

    from _common import RESULTS, result_head, write_json
    report = result_head("kernel throughput", measured=("moxkit/engine/_fused.c",))
    ...
    write_json(report, RESULTS / "kernel_throughput_cpu")
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
GIB = 2**30
# CPU features that decide which arithmetic paths run (see moxkit/engine/_fused.c)
CPU_FLAGS = ("avx2", "f16c", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
             "avx512_fp16", "amx_bf16")  # fmt: skip


def cpu_model() -> str:
    return _cpuinfo_field("model name") or platform.processor() or "unknown"


def _cpuinfo_field(key: str) -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def machine(disk_of: Path | None = None, packages: tuple[str, ...] = ("torch",)) -> dict:
    """The machine as a result file records it: CPU (with the flags that pick code paths),
    cores usable by this process, memory, OS, Python, package versions, and the load average
    now (the machine may be shared: ratios measured in one run are what count)."""
    flags = set((_cpuinfo_field("flags") or "").split())
    info = {
        "cpu": cpu_model(),
        "cpu_flags": [f for f in CPU_FLAGS if f in flags],
        "cores_logical": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in packages},
        "load_average_at_start": os.getloadavg(),
    }
    if disk_of is not None:
        df = subprocess.run(["df", "-hT", str(disk_of)], capture_output=True, text=True).stdout
        info["disk"] = df.strip().splitlines()[-1] if df.strip() else "unknown"
    return info


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_commit(measured: tuple[str, ...] = ()) -> str:
    """The commit measured, marked '+dirty' when any of the `measured` paths (the code whose
    speed the benchmark reports) differs from it in the working tree."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = measured and subprocess.run(
            ["git", "status", "--porcelain", "--", *measured], cwd=ROOT, capture_output=True,
            text=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def result_head(benchmark: str, measured: tuple[str, ...] = (), **machine_options) -> dict:
    """The first fields of every result file."""
    return {
        "benchmark": benchmark,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "git_commit": git_commit(measured),
        "machine": machine(**machine_options),
    }


def write_json(report: dict, stem: Path) -> Path:
    """stem.json, with the load average at the end of the run added to the machine."""
    report["machine"]["load_average_at_end"] = os.getloadavg()
    stem.parent.mkdir(parents=True, exist_ok=True)
    path = stem.with_suffix(".json")
    path.write_text(json.dumps(report, indent=1) + "\n")
    return path


def load_text(machine_info: dict) -> str:
    """'load average 2.7 at the start, 3.1 at the end' (1-minute figures)."""
    start = machine_info.get("load_average_at_start", [None])[0]
    end = machine_info.get("load_average_at_end", [None])[0]
    parts = [f"{v:.1f} at the {when}" for v, when in ((start, "start"), (end, "end")) if v]
    return "load average " + ", ".join(parts) if parts else "load average not recorded"
