"""Streaming safetensors writer.

The output layout (which tensor goes to which shard, at which byte offset) is fixed from the
plan before any data exists, so every shard's header is written first and each tensor's bytes
are then written in place with pwrite as chunks are produced, in any order. Nothing larger
than one chunk is ever held in memory, and a shard is never assembled as a dict of tensors.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import OutputError
from ..units import check_headroom
from .checkpoint import INDEX_NAME, MAX_HEADER_BYTES, SINGLE_NAME
from .dtypes import SIZES

MAX_OPEN_SHARDS = 16  # output descriptors held at once, however many shards (ulimit -n)
# Bytes per write into the page cache. ext4 sizes the page-cache folios it allocates for a write
# by the write's length (up to 2 MiB), and on our KVM guest the copy into fresh large folios
# stalls: 64 MiB writes took a median 1.27 s of system time per 0.87 GB, 256 KiB ones 0.48 s
# (benchmarks/extrapolate_write_paths.py; extrapolate_e2e_warm_profile.md in the results).
WRITE_BLOCK = 256 * 2**10


@dataclass(frozen=True)
class OutputTensor:
    name: str
    dtype: str  # safetensors code
    shape: tuple[int, ...]
    nbytes: int


@dataclass
class Shard:
    filename: str
    tensors: list[OutputTensor] = field(default_factory=list)
    header: bytes = b""
    offsets: dict[str, int] = field(default_factory=dict)  # absolute file offset per tensor

    @property
    def data_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def file_size(self) -> int:
        return 8 + len(self.header) + self.data_bytes


def split_shards(tensors: list[OutputTensor], max_shard_size: int) -> list[list[OutputTensor]]:
    """Greedy split in the given order, as transformers' save_pretrained does: start a new
    shard when the next tensor would push the current one past max_shard_size (a tensor
    larger than the limit gets a shard of its own)."""
    shards: list[list[OutputTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_size:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


def shard_filename(i: int, n: int) -> str:
    return SINGLE_NAME if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"


# Peak bytes layout() allocates per tensor beyond its name (header entry, JSON, offsets), and
# per character of name: measured with tracemalloc on 100k tensors (650 + 2 per ASCII
# character); names are counted 4 per character to cover non-ASCII text.
LAYOUT_BYTES_PER_TENSOR = 700
LAYOUT_BYTES_PER_NAME_CHAR = 4


def layout(
    groups: list[list[OutputTensor]],
    metadata: dict[str, str],
    filenames: list[str] | None = None,
    budget: int | None = None,
) -> list[Shard]:
    """Fix headers and byte offsets. Within a shard, tensors are ordered by element size
    (largest first), then name, as the safetensors library does, so that every tensor is
    aligned to its element size; the header is padded with spaces to a multiple of 8.

    Every output must load: a header past safetensors' limit loses moxkit's provenance (only
    "format" is kept), and one still too large is refused before anything is written."""
    n = len(groups)
    tensors = sum(len(g) for g in groups)
    names = sum(len(t.name) for g in groups for t in g)
    need = tensors * LAYOUT_BYTES_PER_TENSOR + names * LAYOUT_BYTES_PER_NAME_CHAR
    check_headroom(budget, need, "planning the output headers")
    shards = []
    for i, group in enumerate(groups):
        name = filenames[i] if filenames else shard_filename(i, n)
        ordered = sorted(group, key=lambda t: (-SIZES[t.dtype], t.name))
        header, rel = _header(ordered, metadata)
        if len(header) > MAX_HEADER_BYTES:
            header, rel = _header(ordered, {"format": metadata.get("format", "pt")})
        if len(header) > MAX_HEADER_BYTES:
            raise OutputError(
                f"{name}: its header would be {len(header):,} bytes, over the {MAX_HEADER_BYTES:,} "
                "that safetensors loads; use a smaller max_shard_size",
                params=("max_shard_size",),
            )
        base = 8 + len(header)
        shards.append(Shard(name, ordered, header, {k: base + v for k, v in rel.items()}))
    return shards


def _header(ordered: list[OutputTensor], metadata: dict[str, str]) -> tuple[bytes, dict[str, int]]:
    entries: dict[str, object] = {"__metadata__": metadata}
    pos = 0
    rel = {}
    for t in ordered:
        entries[t.name] = {
            "dtype": t.dtype,
            "shape": list(t.shape),
            "data_offsets": [pos, pos + t.nbytes],
        }
        rel[t.name] = pos
        pos += t.nbytes
    header = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    return header + b" " * (-len(header) % 8), rel


def index_json(shards: list[Shard]) -> str:
    """model.safetensors.index.json as transformers writes it."""
    weight_map = {t.name: s.filename for s in shards for t in s.tensors}
    total_size = sum(s.data_bytes for s in shards)
    total_params = sum(t.nbytes // SIZES[t.dtype] for s in shards for t in s.tensors)
    body = {
        "metadata": {"total_size": total_size, "total_parameters": total_params},
        "weight_map": dict(sorted(weight_map.items())),
    }
    return json.dumps(body, indent=2) + "\n"


class ShardWriter:
    """Creates the shard files (header written first) and writes chunks of tensor bytes at
    their offsets, or hands out the descriptor and offset to a caller that writes them itself.
    pwrite carries no file position, so chunks may arrive from any thread in any order; a
    file grows as its bytes are written, so a full disk or a file-size limit is met by the
    write that reaches it. At most MAX_OPEN_SHARDS descriptors are open at once (the least
    recently written shard is closed first): chunks arrive shard after shard, so a model of
    thousands of shards runs under a small `ulimit -n`."""

    def __init__(self, shards: list[Shard], paths: list[Path]):
        self._open: OrderedDict[Path, int] = OrderedDict()
        self._lock = threading.Lock()
        self._where: dict[str, tuple[Path, int]] = {}
        try:
            for shard, path in zip(shards, paths, strict=True):
                with self._fd(path, create=True) as fd:
                    prefix = len(shard.header).to_bytes(8, "little") + shard.header
                    _pwrite_all(fd, memoryview(prefix), 0)
                for t in shard.tensors:
                    self._where[t.name] = (path, shard.offsets[t.name])
        except BaseException:
            self.close()  # no descriptor outlives a failed start
            raise

    def write(self, tensor: str, byte_offset: int, data: memoryview) -> None:
        with self.target(tensor, byte_offset) as (fd, offset):
            _pwrite_all(fd, data, offset)

    @contextlib.contextmanager
    def target(self, tensor: str, byte_offset: int) -> Iterator[tuple[int, int]]:
        """(descriptor, file offset) of `tensor`'s bytes from byte_offset on, for a caller
        that writes them itself; the descriptor stays open, and other writes wait, until the
        block ends."""
        path, start = self._where[tensor]
        with self._fd(path) as fd:
            yield fd, start + byte_offset

    @contextlib.contextmanager
    def _fd(self, path: Path, create: bool = False) -> Iterator[int]:
        with self._lock:
            fd = self._open.pop(path, None)
            if fd is None:
                if len(self._open) >= MAX_OPEN_SHARDS:
                    os.close(self._open.popitem(last=False)[1])
                flags = os.O_WRONLY | (os.O_CREAT | os.O_TRUNC if create else 0)
                fd = os.open(path, flags, 0o666)
            self._open[path] = fd  # most recently used last
            yield fd

    def close(self) -> None:
        with self._lock:
            while self._open:
                os.close(self._open.popitem()[1])


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    done, total = 0, len(data)
    while done < total:
        done += os.pwrite(fd, data[done : done + WRITE_BLOCK], offset + done)


def write_index(directory: Path, shards: list[Shard]) -> None:
    if len(shards) > 1:
        (directory / INDEX_NAME).write_text(index_json(shards))
