"""The hard limits of the streaming engine, measured on real processes: peak resident memory
under the budget for a checkpoint several times larger than it (a single tensor larger than
the budget included), output descriptors bounded, and a failed write leaving nothing
(interruptions: test_interrupts.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from ckpt_factory import (
    bf16_from_bits,
    emulate,
    random_bf16_bits,
    random_tensor,
    save_sharded,
    write_random_bf16_file,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import moxkit
import moxkit.engine.writer

NUMEL = 300 * 2**20  # 600 MiB of bf16 per input file: one tensor larger than the budget
BUDGET_MB = 500


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    write_random_bf16_file(root / "ref.safetensors", "embed.weight", NUMEL, seed=1)
    write_random_bf16_file(root / "mem.safetensors", "embed.weight", NUMEL, seed=2)
    return root


def test_peak_rss_stays_under_budget(cli, big_pair, tmp_path):
    out = tmp_path / "out"
    # A fresh parent process whose only child is the run, so ru_maxrss is the run's own peak.
    probe = (
        "import resource, subprocess, sys, json\n"
        "rc = subprocess.run(sys.argv[1:]).returncode\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'rc': rc, 'maxrss_kb': peak}))\n"
    )
    cmd = cli.argv(
        "extrapolate",
        big_pair / "ref.safetensors",
        big_pair / "mem.safetensors",
        "-a",
        4,
        "-o",
        out,
        "--max-memory",
        f"{BUDGET_MB}MiB",
        "--quiet",
    )
    result = subprocess.run([sys.executable, "-c", probe, *cmd], capture_output=True, text=True)
    stats = json.loads(result.stdout.strip().splitlines()[-1])
    assert stats["rc"] == 0, result.stderr
    peak_mb = stats["maxrss_kb"] / 1024
    input_mb = 2 * NUMEL * 2 / 2**20
    assert input_mb > 2 * BUDGET_MB
    assert peak_mb < BUDGET_MB, f"peak RSS {peak_mb:.0f} MiB over the {BUDGET_MB} MiB budget"
    # the values are right, too, at the start, across a block boundary and at the end
    block = 1 << 22
    bits_r, bits_m = random_bf16_bits(block, 1), random_bf16_bits(block, 2)
    with safe_open(out / "model.safetensors", "pt") as fh:
        sl = fh.get_slice("embed.weight")
        for start in (0, NUMEL - block - 1000, NUMEL - 1000):
            got = sl[start : start + 1000]
            idx = (np.arange(start, start + 1000)) % block
            want = emulate(bf16_from_bits(bits_r[idx]), bf16_from_bits(bits_m[idx]), 4.0)
            assert torch.equal(got, want)


def test_write_failure_cleans_up(tmp_path, monkeypatch):
    t = {f"w{i}": random_tensor((1000,), torch.float32, i) for i in range(5)}
    save_file(t, tmp_path / "ref.safetensors")
    save_file(t, tmp_path / "mem.safetensors")
    calls = {"n": 0}
    original = moxkit.engine.writer.ShardWriter.target

    def failing_target(self, *args):
        calls["n"] += 1  # every write, the engine's or the C loop's, starts here
        if calls["n"] == 3:
            raise OSError(28, os.strerror(28))  # ENOSPC: disk full
        return original(self, *args)

    monkeypatch.setattr(moxkit.engine.writer.ShardWriter, "target", failing_target)
    with pytest.raises(moxkit.MoxError, match="cannot write output: No space left on device"):
        moxkit.extrapolate(
            tmp_path / "ref.safetensors",
            tmp_path / "mem.safetensors",
            4.0,
            tmp_path / "out",
            progress=False,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem.safetensors", "ref.safetensors"]


def test_hundreds_of_shards_under_a_small_descriptor_limit(tmp_path):
    """100 + 100 input shards and 200 output shards under `ulimit -n 128`: descriptors are
    bounded on both sides (without bounds the run would hold 400)."""
    t = {f"w{i:03d}": random_tensor((64,), torch.float32, i) for i in range(200)}
    save_sharded(t, tmp_path / "ref", per_shard=2)
    save_sharded({k: v * 2 for k, v in t.items()}, tmp_path / "mem", per_shard=2)
    limit = "import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))"
    run = [sys.executable, "-c", f"{limit}; import runpy; runpy.run_module('moxkit.cli.main', "
           "run_name='__main__')"]  # fmt: skip
    args = ["extrapolate", tmp_path / "ref", tmp_path / "mem", "-a", 4, "-o", tmp_path / "out",
            "--max-shard-size", "256B", "-q"]  # fmt: skip
    result = subprocess.run([*run, *map(str, args)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 200
    got = load_file(tmp_path / "out" / "model-00200-of-00200.safetensors")
    assert torch.equal(got["w199"], emulate(t["w199"], 2 * t["w199"], 4.0, out_dtype=torch.float32))


def test_provenance_never_pushes_a_header_past_the_loadable_limit(tmp_path, monkeypatch):
    """With the limit lowered to just above the tensors' own header, the output keeps only
    "format" in its metadata, and safetensors loads it; below it, the run is refused."""
    t = {f"w{i}": random_tensor((4,), torch.float32, i) for i in range(3)}
    save_file(t, tmp_path / "ref.safetensors")
    save_file(t, tmp_path / "mem.safetensors")
    w = moxkit.engine.writer
    bare = w.layout([[w.OutputTensor(k, "F32", (4,), 16) for k in t]], {"format": "pt"})[0].header
    monkeypatch.setattr(moxkit.engine.writer, "MAX_HEADER_BYTES", len(bare))
    moxkit.extrapolate(tmp_path / "ref.safetensors", tmp_path / "mem.safetensors",
                       4.0, tmp_path / "out.safetensors", progress=False)  # fmt: skip
    with safe_open(tmp_path / "out.safetensors", "pt") as fh:
        assert fh.metadata() == {"format": "pt"}
        assert torch.equal(
            fh.get_tensor("w2"), emulate(t["w2"], t["w2"], 4.0, out_dtype=torch.float32)
        )
    monkeypatch.setattr(moxkit.engine.writer, "MAX_HEADER_BYTES", len(bare) - 8)
    with pytest.raises(moxkit.MoxError, match="over the .* that safetensors loads"):
        moxkit.extrapolate(tmp_path / "ref.safetensors", tmp_path / "mem.safetensors",
                           4.0, tmp_path / "o2.safetensors", progress=False)  # fmt: skip
    assert not (tmp_path / "o2.safetensors").exists()
