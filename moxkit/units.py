"""Human sizes for options: "5GB" is decimal (as transformers' max_shard_size), "1GiB" binary."""

from __future__ import annotations

import re

from .errors import MoxError

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


def parse_size(value: str | int, option: str) -> int:
    """Bytes from an int or a string like '500MB', '1GiB', '1.5GB', '1048576'."""
    if isinstance(value, int):
        size = value
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", value)
        unit = match.group(2).upper() if match else None
        if match is None or unit not in _UNITS:
            raise MoxError(f"{option} {value!r}: not a size (examples: 500MB, 5GB, 1GiB, 1048576)")
        size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise MoxError(f"{option} {value!r}: must be positive")
    return size


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")
