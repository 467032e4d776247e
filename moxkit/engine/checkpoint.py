"""Open safetensors checkpoints without reading their data.

A checkpoint is a single .safetensors file or a Hugging Face model folder (one
model.safetensors, or shards named by model.safetensors.index.json), named by a path or a hub
id (see sources). Opening one parses and validates every header as strictly as safetensors
itself (header limit, UTF-8, no duplicate names, offsets that tile the data exactly, shapes
whose size fits in 64 bits), and checks the index against the shards, so a corrupt, truncated
or hostile input is refused before a single output byte is written. Parsing is incremental and
checks the memory budget as it goes: a 1.3 M-tensor header validates in seconds, and a header
too large for the budget stops the run early.

Tensor bytes are then read on demand, a chunk at a time, by a FileReader: copied with pread
into caller-owned buffers, or mapped in windows that are released as soon as the chunk is
done, so resident memory never grows with the model.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import mmap
import os
import re
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..sources import (
    MAX_JSON_DEPTH,
    ModelFile,
    check_file_name,
    check_size,
    json_depth,
    member,
    open_checked,
    read_exactly,
    read_json,
    resolve_model,
    shown,
    tree_root,
    user_file,
)
from ..units import check_headroom
from .dtypes import FLOAT_CODES, SIZES

log = logging.getLogger("moxkit")

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_HEADER_BYTES = 100_000_000  # exactly the limit safetensors enforces (not 100 MiB)
MAX_OPEN_FILES = 64  # input descriptors a FileReader keeps open at once
# resident bytes per header byte while a header is parsed: measured on a 92 MB header of
# 1.3 M tensors (benchmarks/header_validation.py); checked before reading a header
HEADER_PARSE_FACTOR = 6
BUDGET_CHECK_EVERY = 1 << 16  # header entries between two looks at the resident size
_U64 = 2**64

_DTYPE_CODES = {code: code for code in SIZES}  # one shared str object per code


@dataclass(slots=True, eq=False)
class TensorInfo:
    """Where one tensor's bytes are, and what they are."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: ModelFile
    start: int  # absolute byte offset of the first element in `file`
    nbytes: int

    @property
    def numel(self) -> int:
        return self.nbytes // SIZES[self.dtype]

    @property
    def itemsize(self) -> int:
        return SIZES[self.dtype]

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


def open_checkpoint(path: str | os.PathLike, *, budget: int | None = None) -> Checkpoint:
    """Find `path`'s safetensors files (a file, a folder, an index, or a hub id: see
    sources.resolve_model) and validate every header, within the memory `budget` (bytes of
    resident memory for the whole process; None: unchecked)."""
    path = resolve_model(path)
    if path.is_dir():
        return _open_folder(path, budget)
    file = user_file(path)
    if path.name.endswith(".json"):
        return _open_index(file, path.parent, tree_root(path.parent), budget)
    tensors, metadata = read_header(file, budget)
    return Checkpoint(path, tensors, [path], None, metadata)


def _open_folder(folder: Path, budget: int | None) -> Checkpoint:
    root = tree_root(folder)
    has_index = os.path.lexists(folder / INDEX_NAME)
    if os.path.lexists(folder / SINGLE_NAME):
        if has_index:
            log.warning(
                "moxkit: warning: %s holds both %s and %s; reading %s, as transformers does",
                shown(folder),
                SINGLE_NAME,
                INDEX_NAME,
                SINGLE_NAME,
            )
        file = member(folder, SINGLE_NAME, root)
        tensors, metadata = read_header(file, budget)
        return Checkpoint(folder, tensors, [file.path], folder, metadata)
    if has_index:
        return _open_index(member(folder, INDEX_NAME, root), folder, root, budget)
    try:
        names = os.listdir(folder)
    except OSError as exc:
        raise InputError(f"{shown(folder)}: cannot list: {exc.strerror or exc}") from None
    candidates = sorted(n for n in names if n.endswith(".safetensors"))
    if len(candidates) == 1:
        file = member(folder, candidates[0], root)
        tensors, metadata = read_header(file, budget)
        return Checkpoint(folder, tensors, [file.path], folder, metadata)
    if len(candidates) > 1:
        raise InputError(
            f"{shown(folder)}: {len(candidates)} .safetensors files and no {INDEX_NAME} "
            "to say which tensors each holds"
        )
    if any(n.endswith((".bin", ".pt", ".pth")) for n in names):
        raise InputError(
            f"{shown(folder)}: only PyTorch pickle weights (.bin/.pt); save the model with "
            "save_pretrained(..., safe_serialization=True) to get safetensors"
        )
    raise InputError(f"{shown(folder)}: no {SINGLE_NAME} or {INDEX_NAME} in this directory")


def _open_index(index: ModelFile, folder: Path, root: Path, budget: int | None) -> Checkpoint:
    """A sharded checkpoint: the index's weight_map and the shards' headers must agree
    exactly (every tensor named once, in the shard the index says)."""
    data = read_json(index, "index", budget=budget)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(f"{index}: index has no 'weight_map' object")
    shard_files: dict[str, ModelFile] = {}
    for name, shard in weight_map.items():
        if type(shard) is str and shard in shard_files:
            continue
        check_file_name(shard, f"{index}: tensor {name!r} maps to")
        if not os.path.lexists(folder / shard):
            raise InputError(f"{index}: shard {shown(shard)} is missing")
        shard_files[shard] = member(folder, shard, root)
    _warn_unnamed_shards(folder, shard_files)
    headers: dict[str, dict[str, TensorInfo]] = {}
    metadata: dict[str, str] = {}
    for shard, file in shard_files.items():
        headers[shard], shard_meta = read_header(file, budget)
        metadata = metadata or shard_meta
        for name in headers[shard]:
            named = weight_map.get(name)
            if named is None:
                raise InputError(
                    f"{file}: holds tensor {name!r} that {INDEX_NAME} does not name "
                    "(transformers would ignore it): the index and the shards disagree"
                )
            if named != shard:
                raise InputError(
                    f"{file}: holds tensor {name!r} that {INDEX_NAME} places in "
                    f"{shown(named)}: the index and the shards disagree"
                )
    tensors: dict[str, TensorInfo] = {}
    for name, shard in weight_map.items():
        info = headers[shard].get(name)
        if info is None:
            raise InputError(
                f"{shard_files[shard]}: tensor {name!r} named by the index is not in it"
            )
        tensors[name] = info
    return Checkpoint(folder, tensors, [f.path for f in shard_files.values()], folder, metadata)


def _warn_unnamed_shards(folder: Path, named: dict[str, ModelFile]) -> None:
    """A .safetensors file the index never names is ignored, as transformers ignores it;
    say so, since its tensors will not be in the output."""
    try:
        unnamed = sorted(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    except OSError:
        return
    unnamed = [n for n in unnamed if n not in named]
    if unnamed:
        log.warning(
            "moxkit: warning: %s: %s not named by %s; ignored, as transformers ignores %s",
            shown(folder),
            ", ".join(shown(n) for n in unnamed[:3]) + (" ..." if len(unnamed) > 3 else ""),
            INDEX_NAME,
            "them" if len(unnamed) > 1 else "it",
        )


# ------------------------------------------------------------------------------ headers


def read_header(
    file: ModelFile | str | os.PathLike, budget: int | None = None
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse and validate one .safetensors header; tensors are returned in file order."""
    if not isinstance(file, ModelFile):
        file = user_file(Path(file))
    if file.size < 8:
        raise InputError(f"{file}: too small to be a safetensors file ({file.size} bytes)")
    fd = open_checked(file)
    try:
        (header_len,) = struct.unpack("<Q", read_exactly(fd, 0, 8, file))
        if 8 + header_len > file.size:
            raise InputError(
                f"{file}: header length {header_len} does not fit in the file "
                f"({file.size} bytes): not a safetensors file, or truncated"
            )
        if header_len > MAX_HEADER_BYTES:
            raise InputError(
                f"{file}: header of {header_len:,} bytes is over safetensors' limit of "
                f"{MAX_HEADER_BYTES:,}: not a safetensors file, or not one anything can load"
            )
        check_headroom(budget, header_len * HEADER_PARSE_FACTOR, f"{file}: reading its header")
        text = _header_text(read_exactly(fd, 8, header_len, file), file)
    finally:
        os.close(fd)
    return parse_header(text, file, budget)


# a header entry exactly as safetensors writes it: parsed by one regex match instead of the
# general JSON scanner (same result; anything else takes the general path)
_NUMBER = r"(?:0|[1-9][0-9]*)"
_CANONICAL_ITEM = re.compile(
    r'"([^"\\\x00-\x1f]*)":'  # a name without escapes
    rf'\{{"dtype":"([A-Z0-9_]{{1,16}})","shape":\[((?:{_NUMBER}(?:,{_NUMBER})*)?)\],'
    rf'"data_offsets":\[({_NUMBER}),({_NUMBER})\]\}}(,?)'
)
_WS = re.compile(r"[ \t\n\r]*")
_ESCAPED_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]")
_scanstring = json.decoder.scanstring


def _header_text(raw: bytes, file: ModelFile) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{file}: header is not UTF-8 text: not a safetensors file") from None


def parse_header(
    text: str, file: ModelFile, budget: int | None = None
) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate the header `text` of `file` (its bytes decoded as UTF-8); see read_header."""
    if not text.startswith("{"):
        raise InputError(f"{file}: header does not start with '{{': not a safetensors file")
    data_start = 8 + (len(text) if text.isascii() else len(text.encode("utf-8")))
    parser = _HeaderParser(text, file, data_start, budget)
    with gc_paused():
        try:
            return parser.run()
        except RecursionError:
            raise InputError(f"{file}: header is nested too deeply") from None
        except (json.JSONDecodeError, StopIteration):
            raise InputError(
                f"{file}: header is not valid JSON near character {parser.pos}: "
                "not a safetensors file"
            ) from None
        except ValueError as exc:  # an integer past Python's digit limit
            raise InputError(f"{file}: header holds {str(exc).splitlines()[0]}") from None


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while millions of small objects are made (a
    header's tensors, the plan): otherwise it rescans all of them again and again, which
    took 4-5x the parse time. None of them form cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _HeaderParser:
    """One pass over the header text, entry by entry: each entry becomes a TensorInfo
    straight away, so the parse never holds the whole JSON tree (which costs 8x the header's
    size in Python objects)."""

    def __init__(self, text: str, file: ModelFile, data_start: int, budget: int | None):
        self.text, self.file, self.budget = text, file, budget
        self.data_start = data_start
        self.data_size = file.size - data_start
        self.pos = 0
        self.scan_value = json.JSONDecoder(object_pairs_hook=_entry_pairs).scan_once
        self.check_names = _ESCAPED_SURROGATE.search(text) is not None

    def run(self) -> tuple[dict[str, TensorInfo], dict[str, str]]:
        text, file, data_start, data_size = self.text, self.file, self.data_start, self.data_size
        kinds: dict[tuple[str, str], tuple[str, tuple[int, ...], int]] = {}
        infos: list[TensorInfo] = []
        metadata: dict[str, str] | None = None
        countdown = BUDGET_CHECK_EVERY
        pos = _WS.match(text, 1).end()
        done = text.startswith("}", pos)
        pos += done
        while not done:
            item = _CANONICAL_ITEM.match(text, pos)
            if item is not None and item[1] != "__metadata__":
                name, dtype, shape_text, begin, end, comma = item.groups()
                kind = kinds.get((dtype, shape_text)) or self._kind(kinds, name, dtype, shape_text)
                code, shape, nbytes = kind
                begin, end = int(begin), int(end)
                if end - begin != nbytes or end > data_size:
                    self._info(name, code, shape, nbytes // SIZES[code], begin, end)
                infos.append(TensorInfo(name, code, shape, file, data_start + begin, nbytes))
                pos = item.end()
                if not comma:
                    pos, done = self._after_item(pos)
            else:
                name, value, pos = self._general_item(pos)
                if name == "__metadata__":
                    if metadata is not None:
                        raise InputError(f"{self.file}: header names '__metadata__' twice")
                    metadata = self._metadata(value)
                else:
                    infos.append(self._general(name, value))
                pos, done = self._after_item(pos)
            countdown -= 1
            if not countdown:
                countdown = BUDGET_CHECK_EVERY
                check_headroom(self.budget, 0, f"{self.file}: validating {len(infos):,} tensors")
        self.pos = pos
        if _WS.match(text, pos).end() != len(text):
            raise json.JSONDecodeError("extra data after the header object", text, pos)
        tensors = self._in_file_order(infos)
        check_headroom(self.budget, 0, f"{self.file}: validating {len(infos):,} tensors")
        return tensors, metadata or {}

    def _after_item(self, pos: int) -> tuple[int, bool]:
        """Past the ',' after an item (False), or the closing '}' (True)."""
        text = self.text
        pos = self.pos = _WS.match(text, pos).end()
        if text.startswith(",", pos):
            return pos + 1, False
        if text.startswith("}", pos):
            return pos + 1, True
        raise json.JSONDecodeError("expected ',' or '}'", text, pos)

    def _general_item(self, pos: int) -> tuple[str, object, int]:
        """Any `"name": value` the canonical pattern did not match, by the JSON scanner."""
        text = self.text
        pos = self.pos = _WS.match(text, pos).end()
        if not text.startswith('"', pos):
            raise json.JSONDecodeError("expected a tensor name", text, pos)
        name, pos = _scanstring(text, pos + 1, True)
        pos = self.pos = _WS.match(text, pos).end()
        if not text.startswith(":", pos):
            raise json.JSONDecodeError("expected ':'", text, pos)
        pos = self.pos = _WS.match(text, pos + 1).end()
        if self.check_names:
            _check_text(name, str(self.file))
        value, pos = self.scan_value(text, pos)
        return name, value, pos

    def _kind(
        self, kinds: dict, name: str, dtype: str, shape_text: str
    ) -> tuple[str, tuple[int, ...], int]:
        """(dtype code, shape, bytes) of a canonical entry, validated once per distinct
        dtype and shape and shared by every tensor that has them."""
        shape = tuple(int(d) for d in shape_text.split(",")) if shape_text else ()
        info = self._info(name, dtype, shape, _numel(shape, self.file, name), 0, None)
        kind = kinds[dtype, shape_text] = (info.dtype, shape, info.nbytes)
        return kind

    def _general(self, name: str, entry: object) -> TensorInfo:
        where = f"{self.file}: tensor {name!r}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: header entry is not an object")
        if json_depth(entry) > MAX_JSON_DEPTH:
            raise InputError(f"{where}: header entry is nested too deeply")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(type(d) is int and 0 <= d < _U64 for d in shape):
            raise InputError(f"{where}: shape {shape!r:.80} is not a list of non-negative integers")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(type(o) is int for o in offsets)
        ):
            raise InputError(f"{where}: data_offsets {offsets!r:.80} are not [begin, end]")
        shape = tuple(shape)
        return self._info(name, dtype, shape, _numel(shape, self.file, name), *offsets)

    def _info(
        self, name: str, dtype: object, shape: tuple, numel: int, begin: int, end: int | None
    ) -> TensorInfo:
        code = _DTYPE_CODES.get(dtype) if isinstance(dtype, str) else None
        if code is None:
            raise InputError(f"{self.file}: tensor {name!r}: unknown dtype {dtype!r:.40}")
        expected = numel * SIZES[code]
        if expected >= _U64:
            raise InputError(f"{self.file}: tensor {name!r}: shape {list(shape)} is too large")
        if end is None:  # dtype and shape only (a canonical entry's kind)
            return TensorInfo(name, code, shape, self.file, 0, expected)
        if not 0 <= begin <= end < _U64:
            raise InputError(
                f"{self.file}: tensor {name!r}: data_offsets {[begin, end]} are not [begin, end]"
            )
        if end - begin != expected:
            raise InputError(
                f"{self.file}: tensor {name!r}: {end - begin} bytes for shape {list(shape)} "
                f"of {code} (expected {expected})"
            )
        if end > self.data_size:
            raise InputError(
                f"{self.file}: tensor {name!r}: data ends at byte {end} but the file holds "
                f"{self.data_size} data bytes (truncated file?)"
            )
        return TensorInfo(name, code, shape, self.file, self.data_start + begin, expected)

    def _metadata(self, value: object) -> dict[str, str]:
        if value is None:  # safetensors reads null as no metadata
            return {}
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise InputError(f"{self.file}: __metadata__ must map strings to strings")
        for text in (*value.keys(), *value.values()):
            _check_text(text, f"{self.file}: __metadata__")
        return value

    def _in_file_order(self, infos: list[TensorInfo]) -> dict[str, TensorInfo]:
        """The tensors by name, sorted by offset; as in safetensors, they must tile the data
        exactly: no overlap, no gap, nothing after the last one, no name twice."""
        starts = np.fromiter((t.start for t in infos), dtype=np.int64, count=len(infos))
        sizes = np.fromiter((t.nbytes for t in infos), dtype=np.int64, count=len(infos))
        order = np.lexsort((sizes, starts))  # by start, an empty tensor before a full one
        tensors = {infos[i].name: infos[i] for i in order.tolist()}
        if len(tensors) != len(infos):
            seen: set[str] = set()
            for t in infos:
                if t.name in seen:
                    raise InputError(f"{self.file}: header names tensor {t.name!r} twice")
                seen.add(t.name)
        ends = starts[order] + sizes[order]
        expected = np.concatenate(([self.data_start], ends[:-1])) if len(infos) else ends
        wrong = np.flatnonzero(starts[order] != expected)
        if len(wrong):
            i = int(wrong[0])
            t = infos[order[i]]
            what = "overlaps the tensor before it" if t.start < expected[i] else "leaves a gap"
            raise InputError(
                f"{self.file}: tensor {t.name!r} {what} (starts at data byte "
                f"{t.start - self.data_start}, previous one ends at "
                f"{int(expected[i]) - self.data_start})"
            )
        data_end = int(ends[-1]) if len(infos) else self.data_start
        if data_end != self.file.size:
            raise InputError(
                f"{self.file}: {self.file.size - data_end} bytes after the last tensor "
                "(safetensors refuses such a file)"
            )
        return tensors


def _entry_pairs(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        keys = [k for k, _ in pairs]
        twice = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"the key {twice!r} twice in one object")
    return obj


def _numel(shape: tuple[int, ...], file: ModelFile, name: str) -> int:
    """The element count, refusing shapes whose running product overflows 64 bits (as
    safetensors' checked multiplication does)."""
    n = 1
    for d in shape:
        n *= d
        if n >= _U64 or d >= _U64:
            raise InputError(f"{file}: tensor {name!r}: shape {list(shape)} overflows 64 bits")
    return n


def _check_text(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(
            f"{where}: {ascii(text)} holds a lone surrogate (not valid UTF-8)"
        ) from None


# ------------------------------------------------------------------------------ reading


class FileReader:
    """Reads byte ranges of input files: copied into caller-owned buffers with pread, or
    mapped read-only for the caller to compute on in place.

    Files are opened when first needed and at most `max_open` stay open (least recently
    used closed first), so 600+600 input shards run under `ulimit -n 1024`. Every open
    checks the file is the one validated (device, inode, size) and every read or mapping
    first checks its size with fstat, so a file truncated or replaced since validation gives
    a MoxError naming it rather than a SIGBUS or wrong bytes (a truncation racing the mapping
    itself is left to the backend's SIGBUS guard). Thread-safe; one lock serialises opens
    and reads (the engine reads from one thread)."""

    def __init__(self, max_open: int = MAX_OPEN_FILES) -> None:
        self._fds: OrderedDict[str, int] = OrderedDict()
        self._max_open = max_open
        self._lock = threading.Lock()

    def _fd(self, file: ModelFile | Path, end: int) -> int:
        key = os.fspath(file)
        fd = self._fds.get(key)
        if fd is None:
            while len(self._fds) >= self._max_open:
                os.close(self._fds.popitem(last=False)[1])
            fd = self._fds[key] = _open_input(file)
        else:
            self._fds.move_to_end(key)
        size = os.fstat(fd).st_size
        if isinstance(file, ModelFile):
            check_size(file, size)
        if end > size:
            raise InputError(f"{shown(file)}: ends at byte {size}, before byte {end} (truncated?)")
        return fd

    def map_range(
        self, file: ModelFile | Path, offset: int, nbytes: int
    ) -> tuple[mmap.mmap, memoryview]:
        """A read-only mapping of [offset, offset+nbytes), populated up front (one pass of
        readahead instead of a page fault per page); close it to release the pages."""
        base = offset - offset % mmap.ALLOCATIONGRANULARITY
        flags = mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0)
        with self._lock:
            fd = self._fd(file, offset + nbytes)
            mapping = mmap.mmap(
                fd, offset - base + nbytes, flags=flags, prot=mmap.PROT_READ, offset=base
            )
        return mapping, memoryview(mapping)[offset - base : offset - base + nbytes]

    def read_into(self, file: ModelFile | Path, offset: int, buffer: memoryview) -> None:
        done, total = 0, len(buffer)
        with self._lock:
            fd = self._fd(file, offset + total)
            while done < total:
                n = os.preadv(fd, [buffer[done:]], offset + done)
                if n <= 0:
                    raise InputError(
                        f"{shown(file)}: unexpected end of file at byte {offset + done}"
                    )
                done += n

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()


def _open_input(file: ModelFile | Path) -> int:
    if isinstance(file, ModelFile):
        return open_checked(file)
    try:
        return os.open(file, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise InputError(f"{shown(file)}: cannot open: {exc.strerror or exc}") from None
