"""Measuring one command as a process: wall time, the time to sync what it wrote, and the peak
resident memory of its process tree; and the page-cache states a run starts from."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
from _pairs import CACHE, weight_files


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
    CACHE.mkdir(parents=True, exist_ok=True)  # ignored by git: absent in a fresh clone
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
