"""Open safetensors checkpoints without reading their data.

A checkpoint is a single .safetensors file or a Hugging Face model directory (one
model.safetensors, or shards named by model.safetensors.index.json). Opening one parses and
validates every header strictly, so a corrupt or truncated input is refused before a single
output byte is written, and yields per-tensor metadata (name, dtype, shape, file, byte range).
Tensor bytes are then read on demand, a chunk at a time: copied with pread into caller-owned
buffers, or mapped in windows that are released as soon as the chunk is done, so resident
memory never grows with the model.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

from .errors import MoxError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces

# safetensors dtype code -> bytes per element
DTYPE_SIZES: dict[str, int] = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U64": 8,
    "U32": 4,
    "U16": 2,
    "U8": 1,
    "BOOL": 1,
}
FLOAT_CODES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
# the floating dtypes moxkit does arithmetic on (fp32 arithmetic, exact for all three inputs)
ARITHMETIC_CODES = frozenset({"F32", "F16", "BF16"})


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes are, and what they are."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset of the first element in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def itemsize(self) -> int:
        return DTYPE_SIZES[self.dtype]

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOAT_CODES


@dataclass
class Checkpoint:
    """A validated checkpoint: its tensors by name, the files that hold them."""

    path: Path
    tensors: dict[str, TensorInfo]
    files: list[Path]
    directory: Path | None  # the model directory, or None for a bare .safetensors file
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def open_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Resolve `path` to its safetensors files and validate every header."""
    path = Path(path)
    if not path.exists():
        raise MoxError(f"{path}: no such file or directory")
    if path.is_file():
        if path.name.endswith(".json"):
            return _open_index(path, path.parent)
        tensors, metadata = read_header(path)
        return Checkpoint(path, tensors, [path], None, metadata)
    if not path.is_dir():
        raise MoxError(f"{path}: not a file or directory")
    if (path / INDEX_NAME).is_file():
        return _open_index(path / INDEX_NAME, path)
    if (path / SINGLE_NAME).is_file():
        tensors, metadata = read_header(path / SINGLE_NAME)
        return Checkpoint(path, tensors, [path / SINGLE_NAME], path, metadata)
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) == 1:
        tensors, metadata = read_header(candidates[0])
        return Checkpoint(path, tensors, candidates, path, metadata)
    if any(path.glob("*.bin")) or any(path.glob("*.pt")):
        raise MoxError(
            f"{path}: only PyTorch pickle weights (.bin/.pt); save the model with "
            "save_pretrained(..., safe_serialization=True) to get safetensors"
        )
    raise MoxError(f"{path}: no {SINGLE_NAME} or {INDEX_NAME} in this directory")


def _open_index(index_path: Path, directory: Path) -> Checkpoint:
    try:
        index = json.loads(index_path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise MoxError(f"{index_path}: cannot read index: {exc}") from None
    except json.JSONDecodeError as exc:
        raise MoxError(
            f"{index_path}: index is not valid JSON ({exc.msg}, line {exc.lineno})"
        ) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise MoxError(f"{index_path}: index has no 'weight_map' object")
    shard_names = []
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise MoxError(f"{index_path}: tensor {name!r} maps to {shard!r}, not a file name")
        if shard not in shard_names:
            shard_names.append(shard)
    headers: dict[str, dict[str, TensorInfo]] = {}
    metadata: dict[str, str] = {}
    files = []
    root = directory.resolve()
    for shard in shard_names:
        shard_path = directory / shard
        if root not in shard_path.resolve().parents:
            raise MoxError(f"{index_path}: shard {shard!r} lies outside the model directory")
        if not shard_path.is_file():
            raise MoxError(f"{index_path}: shard {shard} is missing")
        headers[shard], shard_meta = read_header(shard_path)
        metadata = metadata or shard_meta
        files.append(shard_path)
    tensors: dict[str, TensorInfo] = {}
    for name, shard in weight_map.items():
        info = headers[shard].get(name)
        if info is None:
            raise MoxError(f"{directory / shard}: tensor {name!r} named by the index is not in it")
        tensors[name] = info
    return Checkpoint(directory, tensors, files, directory, metadata)


def read_header(file: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one .safetensors header; tensors are returned in file order."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise MoxError(f"{file}: too small to be a safetensors file ({size} bytes)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
                raise MoxError(
                    f"{file}: header length {header_len} does not fit in the file "
                    f"({size} bytes): not a safetensors file, or truncated"
                )
            raw = fh.read(header_len)
    except OSError as exc:
        raise MoxError(f"{file}: cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise MoxError(f"{file}: header is not valid JSON: not a safetensors file") from None
    if not isinstance(header, dict):
        raise MoxError(f"{file}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise MoxError(f"{file}: __metadata__ must map strings to strings")
    data_start = 8 + header_len
    data_size = size - data_start
    tensors = [
        _parse_entry(file, name, entry, data_start, data_size) for name, entry in header.items()
    ]
    tensors.sort(key=lambda t: t.start)
    end = data_start
    for t in tensors:
        if t.start < end:
            raise MoxError(f"{file}: tensor {t.name!r} overlaps the tensor before it")
        end = t.start + t.nbytes
    return {t.name: t for t in tensors}, metadata


def _parse_entry(
    file: Path, name: str, entry: object, data_start: int, data_size: int
) -> TensorInfo:
    where = f"{file}: tensor {name!r}"
    if not isinstance(entry, dict):
        raise MoxError(f"{where}: header entry is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise MoxError(f"{where}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise MoxError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise MoxError(f"{where}: data_offsets {offsets!r} are not [begin, end]")
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise MoxError(
            f"{where}: {end - begin} bytes for shape {shape} of {dtype} (expected {expected})"
        )
    if end > data_size:
        raise MoxError(
            f"{where}: data ends at byte {end} but the file holds {data_size} data bytes "
            "(truncated file?)"
        )
    return TensorInfo(name, dtype, tuple(shape), file, data_start + begin, expected)


class FileReader:
    """Reads byte ranges of input files: copied into caller-owned buffers with pread, or
    mapped read-only for the caller to compute on in place.

    File descriptors are opened read-only once and shared; neither pread nor mmap uses the
    file position, so one reader is safe to use from several threads."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            fd = self._fds[file] = os.open(file, os.O_RDONLY)
        return fd

    def map_range(self, file: Path, offset: int, nbytes: int) -> tuple[mmap.mmap, memoryview]:
        """A read-only mapping of [offset, offset+nbytes), populated up front (one pass of
        readahead instead of a page fault per page); close it to release the pages."""
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        mapping = mmap.mmap(
            self._fd(file), offset - base + nbytes, flags=flags, prot=mmap.PROT_READ, offset=base
        )
        return mapping, memoryview(mapping)[offset - base : offset - base + nbytes]

    def read_into(self, file: Path, offset: int, buffer: memoryview) -> None:
        fd = self._fd(file)
        done, total = 0, len(buffer)
        while done < total:
            n = os.preadv(fd, [buffer[done:]], offset + done)
            if n <= 0:
                raise MoxError(f"{file}: unexpected end of file at byte {offset + done}")
            done += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
