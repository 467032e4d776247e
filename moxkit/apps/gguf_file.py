"""A GGUF file's header, metadata and tensor table, read strictly and within fixed bounds before
anything else (the `gguf` package, transformers) is let near it.

The `gguf` package believes what the file claims: counts and lengths size its allocations (a
3 MB metadata array of 3 M numbers costs it 2.5 GiB, ~850 bytes an element), tensor offsets are
added in 64-bit arithmetic that wraps (an offset near 2⁶⁴ reads header bytes as weights), and
transformers then builds the architecture the metadata describes. Here every count is bounded by
the bytes left in the file and by fixed limits (MAX_*), every string is strict UTF-8, every
tensor has a known ggml type, a size that fits, an aligned offset, and lies inside the data
section without overlapping another; scalar floats are finite. What passes costs the `gguf`
reader at most about a GiB whatever the file says. Spec: ggml's docs/gguf.md (versions 2, 3).
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

MAX_KV = 4096  # metadata entries; real files have ~50
MAX_TENSORS = 65536  # a 126-layer Llama has ~1,150; MoE files with split experts a few thousand
MAX_KEY_BYTES = 256
MAX_STRING_BYTES = 1 << 20  # chat templates are ~10 KB
MAX_ARRAY_ELEMS = 1 << 20  # per array, and in all arrays together: Gemma-3's vocabulary is 786 K
MAX_NAME_BYTES = 256  # ggml allows 64
MAX_DIMS = 4
MAX_ALIGNMENT = 1 << 16
DEFAULT_ALIGNMENT = 32

# GGUF value types: (struct code, size) for scalars; 8 string, 9 array
_SCALARS = {
    0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
    6: ("f", 4), 7: ("?", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8),
}  # fmt: skip
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class ArrayValue:
    """A metadata array, not kept in memory: its element type and length."""

    elem_type: int
    count: int


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dims: tuple[int, ...]  # ggml order: dims[0] is the fastest-varying (a row's length)
    ggml_type: int
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, object]  # scalars and strings as values; arrays as ArrayValue
    tensors: list[TensorEntry]
    data_start: int

    def block_count(self, arch: str) -> int | None:
        value = self.metadata.get(f"{arch}.block_count")
        return value if isinstance(value, int) and not isinstance(value, bool) else None


class _Cursor:
    """Sequential reads of a file that fail, in one line, past its end."""

    def __init__(self, path: Path, handle, size: int):
        self.path, self.handle, self.size, self.pos = path, handle, size, 0

    def take(self, n: int, what: str) -> bytes:
        if n > self.size - self.pos:
            raise InputError(f"{self.path}: GGUF {what} runs past the end of the file")
        data = self.handle.read(n)
        if len(data) != n:
            raise InputError(f"{self.path}: GGUF file changed while read")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise InputError(f"{self.path}: GGUF {what} runs past the end of the file")
        self.handle.seek(n, os.SEEK_CUR)
        self.pos += n

    def unpack(self, code: str, what: str):
        return struct.unpack("<" + code, self.take(struct.calcsize(code), what))[0]

    def string(self, what: str, limit: int = MAX_STRING_BYTES) -> str:
        n = self.unpack("Q", what)
        if n > limit:
            raise InputError(f"{self.path}: GGUF {what} is {n:,} bytes long; at most {limit:,}")
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{self.path}: GGUF {what} is not UTF-8") from None


def read_gguf(path: str | os.PathLike) -> GGUFFile:
    """The validated header of a GGUF file; MoxError naming the file and the field otherwise."""
    from gguf import GGML_QUANT_SIZES  # (block elements, block bytes) per ggml type

    path = Path(path)
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        cur = _Cursor(path, handle, size)
        if cur.take(4, "magic") != b"GGUF":
            raise InputError(f"{path}: not a GGUF file (no GGUF magic)")
        version = cur.unpack("I", "version")
        if version not in (2, 3):
            swapped = struct.unpack(">I", struct.pack("<I", version))[0]
            kind = "big-endian " if swapped in (2, 3) else ""
            raise InputError(
                f"{path}: {kind}GGUF version {version}; moxkit reads little-endian 2, 3"
            )
        n_tensors = cur.unpack("Q", "tensor count")
        n_kv = cur.unpack("Q", "metadata count")
        # each entry takes at least its length fields: the file's size bounds the counts too
        if n_tensors > MAX_TENSORS or n_tensors * 33 > size:
            raise InputError(f"{path}: GGUF claims {n_tensors:,} tensors; at most {MAX_TENSORS:,}")
        if n_kv > MAX_KV or n_kv * 13 > size:
            raise InputError(f"{path}: GGUF claims {n_kv:,} metadata entries; at most {MAX_KV:,}")
        metadata: dict[str, object] = {}
        budget = [MAX_ARRAY_ELEMS]
        for _ in range(n_kv):
            key = cur.string("metadata key", MAX_KEY_BYTES)
            if key in metadata:
                raise InputError(f"{path}: GGUF metadata key {key!r} appears twice")
            metadata[key] = _value(cur, cur.unpack("I", f"type of {key!r}"), key, budget)
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if (
            not isinstance(alignment, int) or isinstance(alignment, bool)
            or not 0 < alignment <= MAX_ALIGNMENT or alignment & (alignment - 1)
        ):  # fmt: skip
            raise InputError(f"{path}: GGUF general.alignment {alignment!r} is not a power of two")
        raw = []
        names: set[str] = set()
        for _ in range(n_tensors):
            name = cur.string("tensor name", MAX_NAME_BYTES)
            if name in names:
                raise InputError(f"{path}: GGUF tensor {name!r} appears twice")
            names.add(name)
            n_dims = cur.unpack("I", f"tensor {name!r}")
            if not 1 <= n_dims <= MAX_DIMS:
                raise InputError(f"{path}: GGUF tensor {name!r} has {n_dims} dimensions")
            dims = tuple(cur.unpack("Q", f"tensor {name!r}") for _ in range(n_dims))
            ggml_type = cur.unpack("I", f"tensor {name!r}")
            offset = cur.unpack("Q", f"tensor {name!r}")
            raw.append((name, dims, ggml_type, offset))
        data_start = -(-cur.pos // alignment) * alignment
    tensors = []
    for name, dims, ggml_type, offset in raw:
        if ggml_type not in GGML_QUANT_SIZES:
            raise InputError(f"{path}: GGUF tensor {name!r} has unknown ggml type {ggml_type}")
        block, block_bytes = GGML_QUANT_SIZES[ggml_type]
        if min(dims) < 1 or dims[0] % block:
            raise InputError(
                f"{path}: GGUF tensor {name!r} has shape {list(dims)} (type {ggml_type})"
            )
        numel = math.prod(dims)  # Python integers: no wrap
        nbytes = numel // block * block_bytes
        if offset % alignment or data_start + offset + nbytes > size:
            raise InputError(
                f"{path}: GGUF tensor {name!r} ({nbytes:,} bytes at data offset {offset:,}) "
                f"does not lie, aligned, inside the file's {size - data_start:,} data bytes"
            )
        tensors.append(TensorEntry(name, dims, ggml_type, data_start + offset, nbytes))
    ordered = sorted(tensors, key=lambda t: t.offset)
    for before, after in zip(ordered, ordered[1:], strict=False):
        if before.offset + before.nbytes > after.offset:
            raise InputError(f"{path}: GGUF tensors {before.name!r} and {after.name!r} overlap")
    return GGUFFile(path, version, metadata, tensors, data_start)


def _value(cur: _Cursor, vtype: int, key: str, budget: list[int]):
    if vtype in _SCALARS:
        code, _ = _SCALARS[vtype]
        value = cur.unpack(code, f"value of {key!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise InputError(f"{cur.path}: GGUF metadata {key!r} is {value}: not a finite number")
        return value
    if vtype == _STRING:
        return cur.string(f"value of {key!r}")
    if vtype != _ARRAY:
        raise InputError(f"{cur.path}: GGUF metadata {key!r} has unknown type {vtype}")
    elem = cur.unpack("I", f"array {key!r}")
    count = cur.unpack("Q", f"array {key!r}")
    if count > budget[0]:
        raise InputError(
            f"{cur.path}: GGUF metadata array {key!r} has {count:,} elements; moxkit reads at most "
            f"{MAX_ARRAY_ELEMS:,} in all arrays together"
        )
    budget[0] -= count
    if elem in _SCALARS:
        cur.skip(count * _SCALARS[elem][1], f"array {key!r}")
    elif elem == _STRING:
        for _ in range(count):
            n = cur.unpack("Q", f"array {key!r}")
            if n > MAX_STRING_BYTES:
                raise InputError(f"{cur.path}: GGUF array {key!r} holds a {n:,}-byte string")
            try:
                cur.take(n, f"array {key!r}").decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(
                    f"{cur.path}: GGUF array {key!r} holds a string not UTF-8"
                ) from None
    else:  # arrays of arrays: no model file has them, and the gguf reader recurses on them
        raise InputError(f"{cur.path}: GGUF metadata {key!r} is an array of type {elem}")
    return ArrayValue(elem, count)
