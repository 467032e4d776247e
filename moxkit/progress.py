"""Progress over bytes: a tqdm bar (rate, ETA) on a terminal, a few plain lines otherwise,
nothing when disabled. Thread-safe: the writer thread reports as chunks land."""

from __future__ import annotations

import sys
import threading
import time

from tqdm import tqdm

from .units import format_bytes


class ByteProgress:
    def __init__(self, total: int, *, enabled: bool = True, desc: str = "extrapolate"):
        self.total = total
        self.done = 0
        self._lock = threading.Lock()
        self._started = time.perf_counter()
        self._next_mark = 0.25
        self._desc = desc
        self._bar = None
        self._plain = False
        if enabled and sys.stderr.isatty():
            self._bar = tqdm(total=total, unit="B", unit_scale=True, desc=desc, dynamic_ncols=True)
        elif enabled:
            self._plain = True

    def update(self, n: int) -> None:
        with self._lock:
            self.done += n
            if self._bar is not None:
                self._bar.update(n)
            elif self._plain and self.total and self.done / self.total >= self._next_mark:
                elapsed = time.perf_counter() - self._started
                rate = self.done / elapsed if elapsed else 0.0
                print(
                    f"{self._desc}: {self.done / self.total:4.0%} of {format_bytes(self.total)}"
                    f" ({format_bytes(rate)}/s)",
                    file=sys.stderr,
                    flush=True,
                )
                while self._next_mark <= self.done / self.total:
                    self._next_mark += 0.25

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
