"""The hard limits of the streaming engine, measured on real processes: peak resident memory
under the budget for a checkpoint several times larger than it (a single tensor larger than
the budget included), and no output or temporary left behind when a run is interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from ckpt_factory import (
    bf16_from_bits,
    emulate,
    random_bf16_bits,
    random_tensor,
    write_random_bf16_file,
)
from safetensors import safe_open
from safetensors.torch import save_file

import moxkit
import moxkit.writer

NUMEL = 300 * 2**20  # 600 MiB of bf16 per input file: one tensor larger than the budget
BUDGET_MB = 500


@pytest.fixture(scope="module")
def big_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("big")
    write_random_bf16_file(root / "ref.safetensors", "embed.weight", NUMEL, seed=1)
    write_random_bf16_file(root / "mem.safetensors", "embed.weight", NUMEL, seed=2)
    return root


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "moxkit.cli.main", "extrapolate", *map(str, args)]


def test_peak_rss_stays_under_budget(big_pair, tmp_path):
    out = tmp_path / "out"
    # A fresh parent process whose only child is the run, so ru_maxrss is the run's own peak.
    probe = (
        "import resource, subprocess, sys, json\n"
        "rc = subprocess.run(sys.argv[1:]).returncode\n"
        "peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss\n"
        "print(json.dumps({'rc': rc, 'maxrss_kb': peak}))\n"
    )
    cmd = _cli(
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


def _wait_for_tmp(parent: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(p.name.startswith(".out.moxkit-tmp-") for p in parent.iterdir()):
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before it could be interrupted: {proc.stderr.read()}")
        time.sleep(0.001)
    pytest.fail("no temporary output appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_interruption_mid_write_leaves_nothing(big_pair, tmp_path, sig):
    cmd = _cli(
        big_pair / "ref.safetensors",
        big_pair / "mem.safetensors",
        "-a",
        4,
        "-o",
        tmp_path / "out",
        "--max-memory",
        "400MiB",
    )
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    _wait_for_tmp(tmp_path, proc)
    time.sleep(0.05)  # let it get into the data
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    assert "interrupted" in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


def test_write_failure_cleans_up(tmp_path, monkeypatch):
    t = {f"w{i}": random_tensor((1000,), torch.float32, i) for i in range(5)}
    save_file(t, tmp_path / "ref.safetensors")
    save_file(t, tmp_path / "mem.safetensors")
    calls = {"n": 0}
    original = moxkit.writer.ShardWriter.write

    def failing_write(self, *args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, os.strerror(28))  # ENOSPC: disk full
        return original(self, *args)

    monkeypatch.setattr(moxkit.writer.ShardWriter, "write", failing_write)
    with pytest.raises(moxkit.MoxError, match="cannot write output: No space left on device"):
        moxkit.extrapolate(
            tmp_path / "ref.safetensors",
            tmp_path / "mem.safetensors",
            tmp_path / "out",
            4.0,
            progress=False,
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem.safetensors", "ref.safetensors"]
