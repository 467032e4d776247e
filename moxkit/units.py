"""Sizes: options like "5GB" (decimal, as transformers' max_shard_size) or "1GiB" (binary),
printed sizes, and the memory-budget check every stage that grows the process makes first."""

from __future__ import annotations

import math
import re
from decimal import Decimal

from .errors import InputError, ResourceError

_UNITS = {
    "": 1,
    "B": 1,
    "KB": 10**3,
    "MB": 10**6,
    "GB": 10**9,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
MAX_SIZE = 2**60  # an exbibyte: larger sizes are typos, and would overflow C sizes downstream
_SIZE = re.compile(r"\s*([0-9]{1,30}(?:\.[0-9]{0,30})?|\.[0-9]{1,30})\s*([A-Za-z]{0,3})\s*")


def parse_size(value: str | int | float, option: str) -> int:
    """Bytes from an int or a string like '500MB', '1GiB', '1.5GB', '1048576'."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise InputError(f"{option} {value!r}: not a size (examples: 500MB, 5GB, 1GiB, 1048576)",
                         params=(option,))  # fmt: skip
    if isinstance(value, float) and not math.isfinite(value):
        raise InputError(f"{option} {value!r}: not a finite size", params=(option,))
    if isinstance(value, (int, float)):
        size = int(value)
    else:
        match = _SIZE.fullmatch(value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise InputError(
                f"{option} {value[:40]!r}: not a size (examples: 500MB, 5GB, 1GiB, 1048576)",
                params=(option,),
            )
        size = int(Decimal(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise InputError(f"{option} {value!r}: must be positive", params=(option,))
    if size > MAX_SIZE:
        raise InputError(
            f"{option} {value!r}: larger than {format_bytes(MAX_SIZE)}", params=(option,)
        )
    return size


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def resident_bytes() -> int:
    """The process's resident memory now."""
    import psutil

    return psutil.Process().memory_info().rss


def check_headroom(budget: int | None, extra: int, what: str) -> None:
    """MoxError unless `extra` more bytes fit under the memory budget (None: no budget).
    Called before a stage allocates and while it grows, so a run stops early and inside its
    budget rather than late and past it."""
    if budget is None:
        return
    resident = resident_bytes()
    if resident + extra > budget:
        raise ResourceError(
            f"{what}: needs about {format_bytes(extra)} more memory; the process holds "
            f"{format_bytes(resident)} and the memory budget max_memory is "
            f"{format_bytes(budget)}",
            params=("max_memory",),
        )
