"""The engine's numbers against independent oracles: numpy fp32 emulation of the documented op
order (bit for bit) and fp64 arithmetic (within the error bound of fp32 plus one output
rounding), for every storage dtype, odd sizes, tensors cut into many chunks, momentum."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from ckpt_factory import emulate, oracle64, random_tensor, save_sharded
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moxkit
import moxkit.engine.backends
import moxkit.engine.stream
from moxkit.engine.formula import PAPER_ETA

DTYPES = [torch.bfloat16, torch.float16, torch.float32]
SHAPES = {"a.weight": (37, 53), "b.bias": (1,), "c.weight": (3, 5, 7), "d.big": (70001,)}


@pytest.fixture
def tiny_chunks(monkeypatch):
    """Force many chunks per tensor and many backend blocks per chunk, with ragged tails."""
    monkeypatch.setattr(moxkit.engine.stream, "MAX_CHUNK_ELEMS", 5 * 1024)
    monkeypatch.setattr(moxkit.engine.stream, "_chunk_elems", lambda budget, per: 5 * 1024)
    original = moxkit.engine.backends.CpuBackend.__init__

    def small_blocks(self, block_elems=1000):
        original(self, block_elems=block_elems)

    monkeypatch.setattr(moxkit.engine.backends.CpuBackend, "__init__", small_blocks)


def _tensors(dtype, seed, scale=1.0):
    return {n: random_tensor(s, dtype, seed + i, scale) for i, (n, s) in enumerate(SHAPES.items())}


def _ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of `dtype` at |x| (the subnormal spacing near zero)."""
    finfo = torch.finfo(dtype)
    mant_bits = {torch.bfloat16: 7, torch.float16: 10, torch.float32: 23}[dtype]
    e = torch.floor(torch.log2(x.abs().clamp_min(finfo.smallest_normal)))
    return torch.pow(2.0, e - mant_bits).double()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("momentum", [False, True], ids=["plain", "momentum"])
def test_matches_oracles(tmp_path, tiny_chunks, dtype, momentum):
    alpha, eta = 4.0, PAPER_ETA
    ref, mem, prev = _tensors(dtype, 0), _tensors(dtype, 100, 1.1), _tensors(dtype, 200)
    save_sharded(ref, tmp_path / "ref", per_shard=2)
    save_sharded(mem, tmp_path / "mem", per_shard=3)  # a different shard layout
    save_file(prev, tmp_path / "prev.safetensors")  # a bare file
    report = moxkit.extrapolate(
        tmp_path / "ref",
        tmp_path / "mem",
        alpha,
        tmp_path / "out",
        prev=tmp_path / "prev.safetensors" if momentum else None,
        eta=eta,
        progress=False,
    )
    assert report.n_extrapolated == len(SHAPES)
    out = load_file(tmp_path / "out" / "model.safetensors")
    u32 = 2.0**-24
    for name in SHAPES:
        p = prev[name] if momentum else None
        got = out[name]
        assert got.dtype == dtype and got.shape == ref[name].shape
        # bit for bit against the documented fp32 op order
        want = emulate(ref[name], mem[name], alpha, p, eta if momentum else None, dtype)
        assert torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8)), name
        # and close to the exact value: fp32 rounding of each op, then one output rounding
        exact = oracle64(ref[name], mem[name], alpha, p, eta if momentum else None)
        magnitude = (1 + alpha) * ref[name].double().abs() + alpha * mem[name].double().abs()
        if momentum:
            magnitude = magnitude + prev[name].double().abs()
        bound = 4 * u32 * magnitude + 0.5 * _ulp(exact, dtype) * (1 + 2**-6)
        err = (got.double() - exact).abs()
        assert bool((err <= bound).all()), f"{name}: max error {float((err - bound).max())}"


def test_bf16_rounding_is_nearest_even(tmp_path):
    """Values exactly halfway between two bf16 numbers round to the even one."""
    # ref = 1 + 2^-8 (fp32), mem = 0 and alpha tiny: (1+α)·ref lands near a bf16 midpoint.
    halfway = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8)], dtype=torch.float32)
    save_file({"w": halfway}, tmp_path / "ref.safetensors")
    save_file({"w": torch.zeros(3)}, tmp_path / "mem.safetensors")
    moxkit.extrapolate(
        tmp_path / "ref.safetensors",
        tmp_path / "mem.safetensors",
        2.0**-40,
        tmp_path / "out",
        dtype="bf16",
        progress=False,
    )
    got = load_file(tmp_path / "out" / "model.safetensors")["w"]
    # 1+2^-8 -> 1 (even), 1+3·2^-8 -> 1+2^-6... i.e. 1+4·2^-8 (even), sign preserved
    assert got.tolist() == [1.0, 1 + 4 * 2**-8, -1.0]


def test_mixed_input_dtypes_and_output_dtype(tmp_path):
    ref = {"w": random_tensor((129,), torch.bfloat16, 1)}
    mem = {"w": random_tensor((129,), torch.float32, 2)}
    save_file(ref, tmp_path / "ref.safetensors")
    save_file(mem, tmp_path / "mem.safetensors")
    moxkit.extrapolate(
        tmp_path / "ref.safetensors",
        tmp_path / "mem.safetensors",
        2.0,
        tmp_path / "out",
        dtype="fp16",
        progress=False,
    )
    got = load_file(tmp_path / "out" / "model.safetensors")["w"]
    assert got.dtype == torch.float16
    assert torch.equal(got, emulate(ref["w"], mem["w"], 2.0, out_dtype=torch.float16))


def test_integer_and_bool_tensors_are_copied_from_ref(tmp_path):
    ref = {
        "w": random_tensor((10,), torch.bfloat16, 0),
        "pos_ids": torch.arange(17, dtype=torch.int64),
        "mask": torch.tensor([True, False, True]),
    }
    mem = dict(
        ref, w=random_tensor((10,), torch.bfloat16, 1), pos_ids=torch.zeros(17, dtype=torch.int64)
    )
    save_file(ref, tmp_path / "ref.safetensors")
    save_file(mem, tmp_path / "mem.safetensors")
    report = moxkit.extrapolate(
        tmp_path / "ref.safetensors",
        tmp_path / "mem.safetensors",
        1.0,
        tmp_path / "out",
        progress=False,
    )
    assert (report.n_extrapolated, report.n_copied) == (1, 2)
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(out["pos_ids"], ref["pos_ids"])
    assert torch.equal(out["mask"], ref["mask"])


def test_output_sharding_index_and_provenance(tmp_path):
    tensors = {f"layer.{i}.weight": random_tensor((100, 50), torch.bfloat16, i) for i in range(7)}
    tensors["tiny.bias"] = random_tensor((3,), torch.float32, 99)  # mixed element sizes
    save_sharded(tensors, tmp_path / "ref", per_shard=4)
    save_sharded({k: v * 2 for k, v in tensors.items()}, tmp_path / "mem", per_shard=8)
    moxkit.extrapolate(
        tmp_path / "ref",
        tmp_path / "mem",
        4.0,
        tmp_path / "out",
        max_shard_size="25KB",
        progress=False,
    )
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) == 4  # 10 KB per weight, greedy under 25 KB: 2+2+2+(1 weight + bias)
    assert files[0] == "model-00001-of-00004.safetensors"
    assert index["metadata"]["total_size"] == 7 * 100 * 50 * 2 + 3 * 4
    assert index["metadata"]["total_parameters"] == 7 * 100 * 50 + 3
    seen = {}
    for f in files:
        with safe_open(tmp_path / "out" / f, "pt") as fh:
            meta = fh.metadata()
            assert meta["format"] == "pt" and meta["moxkit_alpha"] == "4.0"
            assert meta["moxkit_ref"].endswith("ref")
            for k in fh.keys():
                assert index["weight_map"][k] == f
                seen[k] = fh.get_tensor(k)
    assert set(seen) == set(tensors)
    for k, v in tensors.items():
        assert torch.equal(seen[k], emulate(v, v * 2, 4.0, out_dtype=v.dtype))
    card = (tmp_path / "out" / "README.md").read_text()
    assert "alpha | 4.0" in card


def test_single_file_output(tmp_path):
    t = {"w": random_tensor((33,), torch.float16, 5)}
    save_file(t, tmp_path / "ref.safetensors")
    save_file({"w": t["w"] * 3}, tmp_path / "mem.safetensors")
    moxkit.extrapolate(
        tmp_path / "ref.safetensors",
        tmp_path / "mem.safetensors",
        0.5,
        tmp_path / "forget.safetensors",
        progress=False,
    )
    got = load_file(tmp_path / "forget.safetensors")["w"]
    assert torch.equal(got, emulate(t["w"], t["w"] * 3, 0.5, out_dtype=torch.float16))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "forget.safetensors",
        "mem.safetensors",
        "ref.safetensors",
    ]


def test_dry_run_writes_nothing(tmp_path):
    t = {"w": random_tensor((64, 64), torch.bfloat16, 5)}
    save_file(t, tmp_path / "ref.safetensors")
    save_file(t, tmp_path / "mem.safetensors")
    report = moxkit.extrapolate(
        tmp_path / "ref.safetensors",
        tmp_path / "mem.safetensors",
        4.0,
        tmp_path / "out",
        dry_run=True,
    )
    assert not (tmp_path / "out").exists()
    assert report.bytes_read == 2 * 64 * 64 * 2
    assert "model.safetensors" in report.plan_text()


def test_nonfinite_result_is_an_error_unless_allowed(tmp_path):
    ref = {
        "ok": torch.ones(4, dtype=torch.float16),
        "big": torch.full((4,), 30000.0, dtype=torch.float16),
    }
    mem = {"ok": torch.zeros(4, dtype=torch.float16), "big": torch.zeros(4, dtype=torch.float16)}
    save_file(ref, tmp_path / "ref.safetensors")
    save_file(mem, tmp_path / "mem.safetensors")
    args = (tmp_path / "ref.safetensors", tmp_path / "mem.safetensors", 4.0, tmp_path / "out")
    with pytest.raises(moxkit.MoxError, match="'big'.*non-finite"):
        moxkit.extrapolate(*args, progress=False)  # 5 · 30000 overflows fp16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem.safetensors", "ref.safetensors"]
    report = moxkit.extrapolate(*args, allow_nonfinite=True, progress=False)
    assert report.nonfinite_tensors == ["big"]
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.isinf(out["big"]).all() and torch.equal(out["ok"], torch.full((4,), 5.0).half())


def test_inputs_are_not_modified(tmp_path):
    t = {"w": random_tensor((300,), torch.bfloat16, 7)}
    save_sharded(t, tmp_path / "ref", per_shard=1)
    (tmp_path / "ref" / "config.json").write_text('{"dtype": "bfloat16"}')
    save_file({"w": t["w"] + 1}, tmp_path / "mem.safetensors")
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.rglob("*") if p.is_file()}
    moxkit.extrapolate(
        tmp_path / "ref",
        tmp_path / "mem.safetensors",
        4.0,
        tmp_path / "out",
        dtype="fp32",
        progress=False,
    )
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in before}
    assert before == after
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["dtype"] == "float32"
    np.testing.assert_array_equal(
        load_file(tmp_path / "out" / "model.safetensors")["w"].numpy(),
        emulate(t["w"], t["w"] + 1, 4.0, out_dtype=torch.float32).numpy(),
    )
