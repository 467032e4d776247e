"""Headers, indexes and folders are validated as strictly as safetensors itself, before any
output byte; every refusal is one MoxError line naming the file."""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_factory import random_tensor, save_sharded
from safetensors.torch import load_file, save_file

from moxkit.engine.checkpoint import MAX_HEADER_BYTES, open_checkpoint, read_header
from moxkit.engine.plan import pair_tensors
from moxkit.errors import MoxError
from moxkit.units import parse_size


def raw_file(path: Path, header: bytes | str, data: bytes = b"") -> Path:
    """A safetensors file with exactly this header text (duplicates, escapes and all)."""
    raw = header.encode() if isinstance(header, str) else header
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


W = '"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}'


@pytest.mark.parametrize(
    "header, data, message",
    [
        ("{" + W + "," + W + "}", b"\0" * 8, "names tensor 'w' twice"),
        ('{"w":{"dtype":"F32","dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8,
         "'dtype' twice"),
        ("{" + W.replace('"F32"', '["F32"]') + "}", b"\0" * 8, "unknown dtype"),
        ('{"w":{"dtype":"F32","shape":[0,18446744073709551616,18446744073709551616],'
         '"data_offsets":[0,0]}}', b"", "shape"),
        ('{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,0]}}', b"",
         "overflows 64 bits"),
        ('{"\\ud800":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', b"\0" * 8,
         "lone surrogate"),
        ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + "[" * 5000
         + "]" * 5000 + "}}", b"\0" * 8, "nested too deeply"),
        ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8],"x":' + "[" * 100
         + "]" * 100 + "}}", b"\0" * 8, "nested too deeply"),
        ('{"w":{"dtype":"F32","shape":[' + "9" * 5000 + '],"data_offsets":[0,8]}}', b"\0" * 8,
         "digits"),
        ('{"w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\0" * 8, "leaves a gap"),
        ("{" + W + "}", b"\0" * 12, "4 bytes after the last tensor"),
        ("{" + W + ',"__metadata__":{"a":"b"},"__metadata__":{"a":"b"}}', b"\0" * 8,
         "'__metadata__' twice"),
        ('{"__metadata__":{"a":"\\udc00"},' + W + "}", b"\0" * 8, "lone surrogate"),
        ("{" + W + "} x", b"\0" * 8, "not valid JSON"),
        ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},}', b"\0" * 8, "not valid JSON"),
        ("[" + W + "]", b"\0" * 8, "does not start with '{'"),
    ],
    ids=["dup-name", "dup-key", "dtype-list", "shape-2**64", "shape-overflow", "surrogate",
         "deep-recursion", "deep", "bigint", "gap", "trailing", "dup-metadata",
         "metadata-surrogate", "extra-data", "trailing-comma", "array"],
)  # fmt: skip
def test_bad_headers_are_one_moxerror_line(tmp_path, header, data, message):
    path = raw_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(MoxError, match=message) as exc:
        read_header(path)
    assert "\n" not in str(exc.value) and "bad.safetensors" in str(exc.value)


def test_utf16_and_bom_headers_are_refused(tmp_path):
    text = "{" + W + "}"
    for raw in (text.encode("utf-16"), text.encode("utf-16-le"), b"\xef\xbb\xbf" + text.encode()):
        path = raw_file(tmp_path / "bad.safetensors", raw, b"\0" * 8)
        with pytest.raises(MoxError, match="not UTF-8|does not start|not valid JSON"):
            read_header(path)


@pytest.mark.parametrize("header_len", [MAX_HEADER_BYTES + 1, 104_857_600])
def test_header_length_limit_is_exactly_safetensors(tmp_path, header_len):
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as fh:  # sparse: nothing this large is written
        fh.write(struct.pack("<Q", header_len) + b"{")
        fh.truncate(8 + header_len + 8)
    with pytest.raises(MoxError, match="over safetensors' limit of 100,000,000"):
        read_header(path)


def test_canonical_and_general_parsing_agree(tmp_path):
    """The fast path (entries exactly as safetensors writes them) and the JSON scanner (any
    other spelling) give the same tensors."""
    rng = np.random.default_rng(0)
    entries, offset = [], 0
    for i in range(50):
        shape = [int(d) for d in rng.integers(0, 4, rng.integers(0, 3))]
        dtype = ["F32", "BF16", "I64", "BOOL"][i % 4]
        size = int(np.prod(shape)) * {"F32": 4, "BF16": 2, "I64": 8, "BOOL": 1}[dtype]
        entries.append((f"t.{i}", dtype, shape, offset, offset + size))
        offset += size
    compact = ",".join(
        f'"{n}":{{"dtype":"{d}","shape":[{",".join(map(str, s))}],"data_offsets":[{b},{e}]}}'
        for n, d, s, b, e in entries
    )
    spaced = ", ".join(
        f'"{n}" : {{ "data_offsets": [{b}, {e}], "shape": {s}, "dtype": "{d}", "x": [{{}}] }}'
        for n, d, s, b, e in entries
    )
    a = read_header(raw_file(tmp_path / "a.safetensors", "{" + compact + "}", b"\0" * offset))
    b = read_header(raw_file(tmp_path / "b.safetensors", "{ " + spaced + " }", b"\0" * offset))
    fields = ("name", "dtype", "shape", "nbytes")
    assert [[getattr(t, f) for f in fields] for t in a[0].values()] == [
        [getattr(t, f) for f in fields] for t in b[0].values()
    ]
    assert [t.start for t in a[0].values()] != [] and len(a[0]) == 50


def test_matches_safetensors_on_its_own_files(tmp_path):
    t = {
        "b": random_tensor((3, 5), torch.bfloat16, 0),
        "a": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e": torch.zeros((0, 4)),
        "m": torch.tensor([True, False]),
    }
    save_file(t, tmp_path / "x.safetensors", metadata={"format": "pt", "k": "v"})
    tensors, metadata = read_header(tmp_path / "x.safetensors")
    assert metadata == {"format": "pt", "k": "v"}
    raw = (tmp_path / "x.safetensors").read_bytes()
    loaded = load_file(tmp_path / "x.safetensors")
    for name, info in tensors.items():
        assert info.shape == tuple(loaded[name].shape)
        expected = loaded[name].contiguous().view(torch.uint8).numpy().tobytes()
        assert raw[info.start : info.start + info.nbytes] == expected
    assert [i.start for i in tensors.values()] == sorted(i.start for i in tensors.values())


def test_budget_is_checked_while_a_header_is_parsed(tmp_path):
    n = 70_000
    body = ",".join(
        f'"t{i}":{{"dtype":"U8","shape":[1],"data_offsets":[{i},{i + 1}]}}' for i in range(n)
    )
    path = raw_file(tmp_path / "many.safetensors", "{" + body + "}", b"\0" * n)
    with pytest.raises(MoxError, match="memory budget"):
        read_header(path, budget=1)
    assert len(read_header(path, budget=None)[0]) == n


@pytest.fixture
def sharded(tmp_path) -> Path:
    t = {f"model.l{i}": random_tensor((4,), torch.float32, i) for i in range(4)}
    save_sharded(t, tmp_path / "m", per_shard=2)
    return tmp_path / "m"


def test_index_and_shards_must_agree(sharded):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    dropped = dict(index["weight_map"])
    del dropped["model.l3"]  # lm_head-style: in a shard, missing from the index
    index_path.write_text(json.dumps({"weight_map": dropped}))
    with pytest.raises(MoxError, match="holds tensor 'model.l3' that .* does not name"):
        open_checkpoint(sharded)
    moved = dict(index["weight_map"], **{"model.l3": "model-00001-of-00002.safetensors"})
    index_path.write_text(json.dumps({"weight_map": moved}))
    with pytest.raises(MoxError, match="places in"):
        open_checkpoint(sharded)
    text = json.dumps({"weight_map": index["weight_map"]})
    index_path.write_text(text[:-2] + ', "model.l0": "model-00001-of-00002.safetensors"}}')
    with pytest.raises(MoxError, match="names 'model.l0' twice"):
        open_checkpoint(sharded)
    index_path.write_text(json.dumps(["weight_map"]))
    with pytest.raises(MoxError, match="not a JSON object"):
        open_checkpoint(sharded)


def test_folder_with_single_file_and_index_reads_what_transformers_reads(sharded, caplog):
    save_file({"only": torch.zeros(2)}, sharded / "model.safetensors")
    with caplog.at_level(logging.WARNING, logger="moxkit"):
        ckpt = open_checkpoint(sharded)
    assert list(ckpt.tensors) == ["only"]
    assert "reading model.safetensors, as transformers does" in caplog.text


def test_prefix_mismatch_is_named(tmp_path):
    """GPT-2's legacy layout (`h.0...`) against transformers' (`transformer.h.0...`)."""
    names = ["h.0.ln_1.weight", "h.0.mlp.c_fc.weight", "wte.weight"]
    save_file({n: torch.zeros(2) for n in names + ["h.0.attn.bias"]}, tmp_path / "ref.safetensors")
    save_file({f"transformer.{n}": torch.zeros(2) for n in names}, tmp_path / "mem.safetensors")
    ref, mem = (open_checkpoint(tmp_path / f"{x}.safetensors") for x in ("ref", "mem"))
    with pytest.raises(MoxError, match="MEM's names carry the prefix 'transformer.'"):
        pair_tensors(ref, mem, None, None)
    with pytest.raises(MoxError, match="REF's names carry the prefix 'transformer.'"):
        pair_tensors(mem, ref, None, None)


def test_plan_checks_the_budget_before_it_grows(tmp_path):
    save_file({f"t{i}": torch.zeros(1) for i in range(10)}, tmp_path / "a.safetensors")
    ckpt = open_checkpoint(tmp_path / "a.safetensors")
    with pytest.raises(MoxError, match="planning 10 tensors: needs about 1.00 KB more memory"):
        pair_tensors(ckpt, ckpt, None, None, budget=1)
    assert len(pair_tensors(ckpt, ckpt, None, None, budget=None)) == 10


def test_cli_one_line_errors_for_config_and_sizes(cli, tmp_path):
    t = {"model.w": random_tensor((4,), torch.float32, 0)}
    save_sharded(t, tmp_path / "ref", per_shard=5)
    save_sharded({k: v + 1 for k, v in t.items()}, tmp_path / "mem", per_shard=5)
    (tmp_path / "ref" / "config.json").write_text("[1, 2, 3]")
    args = ["extrapolate", tmp_path / "ref", tmp_path / "mem", "-a", 2, "-q"]
    result = cli(*args, "-o", tmp_path / "o1", "--dtype", "bf16")
    assert result.code == 1 and "config.json: config is not a JSON object" in result.err
    assert len(result.err.strip().splitlines()) == 1 and not (tmp_path / "o1").exists()
    result = cli(*args, "-o", tmp_path / "o1")  # checked before the work, --dtype or not
    assert result.code == 1 and "config is not a JSON object" in result.err
    with open(tmp_path / "ref" / "config.json", "wb") as fh:  # sparse: 1 GB never written
        fh.truncate(10**9)
    result = cli(*args, "-o", tmp_path / "o1", "--dtype", "bf16", "--max-memory", "16GiB")
    assert result.code == 1 and "config is 1,000,000,000 bytes" in result.err
    assert not (tmp_path / "o1").exists()
    result = cli(*args, "-o", tmp_path / "o2", "--max-memory", "1e400")
    assert result.code == 1 and "--max-memory '1e400': not a size" in result.err
    with pytest.raises(MoxError, match="not a finite size"):
        parse_size(float("inf"), "max_memory")


def test_file_changed_after_validation(tmp_path):
    from moxkit.engine.checkpoint import FileReader

    save_file({"w": torch.arange(1024, dtype=torch.float32)}, tmp_path / "a.safetensors")
    info = read_header(tmp_path / "a.safetensors")[0]["w"]
    reader = FileReader()
    try:
        mapping, view = reader.map_range(info.file, info.start, info.nbytes)
        assert np.frombuffer(view, np.float32)[5] == 5
        view.release()
        mapping.close()
        os.truncate(tmp_path / "a.safetensors", info.start + 100)
        with pytest.raises(MoxError, match="a.safetensors: changed on disk"):
            reader.map_range(info.file, info.start, info.nbytes)
    finally:
        reader.close()
    save_file({"w": torch.arange(1024, dtype=torch.float32)}, tmp_path / "b.safetensors")
    info = read_header(tmp_path / "b.safetensors")[0]["w"]
    os.replace(tmp_path / "a.safetensors", tmp_path / "b.safetensors")
    reader = FileReader()
    with pytest.raises(MoxError, match="b.safetensors: replaced by another file"):
        reader.read_into(info.file, info.start, memoryview(bytearray(info.nbytes)))
    reader.close()


def test_600_plus_600_shards_under_ulimit_1024(cli, tmp_path):
    """Input descriptors are opened lazily and at most 64 stay open."""
    import resource

    n = 600
    for label, shift in (("ref", 0), ("mem", 1)):
        folder = tmp_path / label
        folder.mkdir()
        weight_map = {}
        for i in range(n):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            save_file({f"t{i}": torch.full((4,), float(i + shift))}, folder / name)
            weight_map[f"t{i}"] = name
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    result = cli.run("extrapolate", tmp_path / "ref", tmp_path / "mem", "-a", 2, "-q",
                     "-o", tmp_path / "out", "--device", "cpu", preexec_fn=limit)  # fmt: skip
    assert result.code == 0, result.err
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert len(out) == n
    torch.testing.assert_close(out["t7"], torch.full((4,), 3 * 7.0 - 2 * 8.0))


def test_layout_checks_the_budget_with_an_estimate_that_covers_its_peak():
    """writer.layout's estimate must bound what it really allocates (measured here with
    tracemalloc), and a budget the process cannot meet stops it before it allocates."""
    import tracemalloc

    from moxkit.engine.writer import (
        LAYOUT_BYTES_PER_NAME_CHAR,
        LAYOUT_BYTES_PER_TENSOR,
        OutputTensor,
        layout,
    )

    tensors = [
        OutputTensor(f"model.layers.{i}.ffn.é_{'x' * (i % 70)}.weight", "BF16", (8, 4), 64)
        for i in range(20_000)
    ]
    with pytest.raises(MoxError, match="planning the output headers: needs about"):
        layout([tensors], {"format": "pt"}, budget=1)
    tracemalloc.start()
    try:
        layout([tensors], {"format": "pt"})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    names = sum(len(t.name) for t in tensors)
    estimate = len(tensors) * LAYOUT_BYTES_PER_TENSOR + names * LAYOUT_BYTES_PER_NAME_CHAR
    assert peak <= estimate
