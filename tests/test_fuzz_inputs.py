"""Property-based fuzzing of everything moxkit reads from a model folder: arbitrary bytes and
structure-aware mutations of headers, indexes and folders either open correctly or raise
MoxError, never anything else. "Correctly" is checked against safetensors itself: whatever
moxkit accepts, safetensors loads with the same names, dtypes, shapes and bytes. Validation
never allocates more than the memory budget left it.

Deterministic (derandomize) and bounded (max_examples), so CI stays fast and reproducible."""

from __future__ import annotations

import json
import os
import struct
import tempfile
import tracemalloc
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.torch import save_file

from moxkit.engine.checkpoint import open_checkpoint, read_header
from moxkit.engine.dtypes import SIZES
from moxkit.errors import MoxError
from moxkit.sources import parse_json
from moxkit.units import resident_bytes

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FIXED_COST = 2**17  # the parser's objects, numpy, psutil: not proportional to the header
SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "I64", "I32", "I16", "I8", "U8", "BOOL"}

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)
names = st.text(
    st.characters(codec="utf-8", exclude_characters='"\\'), min_size=1, max_size=12
) | st.sampled_from(["model.w", "lm_head.weight", "__metadata__", "a\nb", "\u2028"])


@st.composite
def tensor_tables(draw) -> list[dict]:
    """A valid table of tensors: names, dtypes, shapes, offsets tiling the data."""
    entries, offset = [], 0
    for name in draw(
        st.lists(names.filter(lambda n: n != "__metadata__"), max_size=6, unique=True)
    ):
        dtype = draw(st.sampled_from(sorted(SAFETENSORS_DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        size = SIZES[dtype]
        for d in shape:
            size *= d
        entries.append(
            {"name": name, "dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        )
        offset += size
    return entries


def serialize(entries: list[dict], metadata: object, spacing: bool) -> str:
    items = [(e["name"], {k: v for k, v in e.items() if k != "name"}) for e in entries]
    if metadata is not None:
        items.insert(0, ("__metadata__", metadata))
    sep = (", ", ": ") if spacing else (",", ":")
    body = sep[0].join(json.dumps(n) + sep[1] + json.dumps(v, separators=sep) for n, v in items)
    return "{" + body + "}"


MUTATIONS = [
    "none", "field", "drop-field", "extra-field", "duplicate", "offsets", "data-length",
    "flip-byte", "truncate", "surrogate", "nest", "bigint", "header-length",
]  # fmt: skip


@st.composite
def mutated_files(draw) -> bytes:
    entries = draw(tensor_tables())
    data_len = max([e["data_offsets"][1] for e in entries], default=0)
    metadata = draw(
        st.none() | st.dictionaries(st.text(max_size=4), st.text(max_size=4), max_size=2)
    )
    mutation = draw(st.sampled_from(MUTATIONS))
    if entries and mutation in ("field", "drop-field", "extra-field", "offsets", "nest", "bigint"):
        entry = draw(st.sampled_from(entries))
        key = draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
        if mutation == "field":
            entry[key] = draw(json_values)
        elif mutation == "drop-field":
            del entry[key]
        elif mutation == "extra-field":
            entry[draw(st.text(max_size=5))] = draw(json_values)
        elif mutation == "offsets":
            entry["data_offsets"] = [o + draw(st.integers(-9, 9)) for o in entry["data_offsets"]]
        elif mutation == "nest":
            entry["x"] = json.loads("[" * 200 + "]" * 200)
        else:
            entry[key] = [10**200] if key == "shape" else [0, 2**64]
    if entries and mutation == "duplicate":
        entries.append(dict(draw(st.sampled_from(entries))))
    if mutation == "data-length":
        data_len = max(0, data_len + draw(st.integers(-9, 9)))
    text = serialize(entries, metadata, draw(st.booleans()))
    if mutation == "surrogate":
        text = text.replace("{", '{"\\ud800":0,', 1)
    raw = text.encode()
    raw += b" " * draw(st.integers(0, 7))
    blob = struct.pack("<Q", len(raw)) + raw + bytes(data_len)
    if mutation == "header-length":
        blob = struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + blob[8:]
    if mutation == "flip-byte" and blob:
        i = draw(st.integers(0, len(blob) - 1))
        blob = blob[:i] + bytes([draw(st.integers(0, 255))]) + blob[i + 1 :]
    if mutation == "truncate":
        blob = blob[: draw(st.integers(0, len(blob)))]
    return blob


@pytest.fixture(scope="module")
def scratch():
    with tempfile.TemporaryDirectory() as folder:
        yield Path(folder)


def accepted_as_safetensors(path: Path, tensors: dict) -> None:
    """The oracle: safetensors loads what moxkit accepted, tensor for tensor."""
    raw = path.read_bytes()
    with safe_open(path, framework="pt") as f:
        assert set(f.keys()) == set(tensors)
        for name, info in tensors.items():
            loaded = f.get_tensor(name)
            assert tuple(loaded.shape) == info.shape
            got = raw[info.start : info.start + info.nbytes]
            assert loaded.contiguous().view(-1).view(torch.uint8).numpy().tobytes() == got


def check(path: Path) -> None:
    try:
        tensors, _ = read_header(path)
    except MoxError as exc:
        assert "\n" not in str(exc)
        return
    accepted_as_safetensors(path, tensors)


@FUZZ
@given(blob=st.binary(max_size=300))
def test_arbitrary_bytes(scratch, blob):
    path = scratch / "x.safetensors"
    path.write_bytes(blob)
    check(path)


@FUZZ
@given(blob=mutated_files())
def test_mutated_headers(scratch, blob):
    path = scratch / "x.safetensors"
    path.write_bytes(blob)
    check(path)


@FUZZ
@given(raw=st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode()))
def test_bounded_json_reader(raw):
    try:
        assert isinstance(parse_json(raw, "x.json"), dict)
    except MoxError as exc:
        assert "\n" not in str(exc)


@st.composite
def folders(draw) -> dict:
    """A sharded model folder, then an index mutation or a hostile folder entry."""
    shards = draw(st.integers(1, 3))
    weight_map = {f"t{i}": f"s{i % shards}.safetensors" for i in range(draw(st.integers(1, 5)))}
    change = draw(st.sampled_from(["none", "value", "key", "drop", "extra", "json", "entry"]))
    index: object = {"metadata": {"total_size": 0}, "weight_map": dict(weight_map)}
    if change == "value":
        index["weight_map"][draw(st.sampled_from(sorted(weight_map)))] = draw(
            json_values
            | st.sampled_from(["../s0.safetensors", "/etc/passwd", ".", "s0.safetensors/", ""])
        )
    elif change == "key":
        index["weight_map"][draw(names)] = draw(st.sampled_from(sorted(set(weight_map.values()))))
    elif change == "drop":
        del index["weight_map"][draw(st.sampled_from(sorted(weight_map)))]
    elif change == "extra":
        index[draw(st.text(max_size=5))] = draw(json_values)
    elif change == "json":
        index = draw(json_values)
    entry = draw(st.sampled_from(["fifo", "loop", "outside", "dir"])) if change == "entry" else None
    return {"weight_map": weight_map, "index": index, "entry": entry}


@FUZZ
@given(spec=folders())
def test_mutated_folders(scratch, spec):

    folder = Path(tempfile.mkdtemp(dir=scratch))
    by_shard: dict[str, dict] = {}
    for name, shard in spec["weight_map"].items():
        by_shard.setdefault(shard, {})[name] = torch.ones(2)
    for shard, tensors in by_shard.items():
        save_file(tensors, folder / shard)
    (folder / "model.safetensors.index.json").write_text(json.dumps(spec["index"]))
    victim = folder / sorted(by_shard)[0]
    if spec["entry"] == "fifo":
        victim.unlink()
        os.mkfifo(victim)
    elif spec["entry"] == "loop":
        victim.unlink()
        os.symlink(victim.name, victim)
    elif spec["entry"] == "outside":
        victim.rename(scratch / f"{folder.name}-outside")
        os.symlink(scratch / f"{folder.name}-outside", victim)
    elif spec["entry"] == "dir":
        victim.unlink()
        victim.mkdir()
    try:
        ckpt = open_checkpoint(folder)
    except MoxError as exc:
        assert "\n" not in str(exc)
        return
    assert spec["entry"] is None
    # what transformers reads: the tensors the index names (a shard it never names is ignored)
    assert set(ckpt.tensors) == set(spec["index"]["weight_map"])
    assert all(spec["weight_map"][n] == spec["index"]["weight_map"][n] for n in ckpt.tensors)


@settings(max_examples=12, deadline=None, derandomize=True, database=None)
@given(
    n=st.integers(4_000, 12_000),
    dims=st.integers(0, 6),
    spacing=st.booleans(),
    ratio=st.floats(0, 8),
)
def test_validation_stays_inside_the_budget(scratch, n, dims, spacing, ratio):
    """Whatever the header, what validation allocates never exceeds the room the budget left
    when it started (plus the parser's own fixed cost, part of the process's reserve): it
    either fits or stops with MoxError."""
    shape = [1] * dims
    entries = [{"name": f"t{i}", "dtype": "U8", "shape": shape, "data_offsets": [i, i + 1]}
               for i in range(n)]  # fmt: skip
    raw = serialize(entries, None, spacing).encode()
    path = scratch / "budget.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(n))
    headroom = int(len(raw) * ratio)
    budget = resident_bytes() + headroom
    tracemalloc.start()
    try:
        read_header(path, budget=budget)
        peak = tracemalloc.get_traced_memory()[1]
        assert peak <= headroom + FIXED_COST, (peak, headroom, len(raw))
    except MoxError as exc:
        assert "memory budget" in str(exc)
    finally:
        tracemalloc.stop()
