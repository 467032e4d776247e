"""Interruptions and small leaks (issue 20 items 8, 9): a signal burst after "interrupted" is
printed never kills the process by the signal; an interrupt never calls an intermediate
(a momentum tick, a sweep's scratch model) "complete and kept"; outputs get the umask's
modes; Parquet files cannot unfold into more rows or text than their size allows; --lora
runs keep quiet under -q."""

from __future__ import annotations

import json
import os
import stat
import sys
import textwrap

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save_file
from test_harden_outputs import FAST, one_line, setup  # noqa: F401  (the shared fixture)

from moxkit.apps.tiny import tiny_facts
from moxkit.errors import MoxError
from moxkit.records import read_records

FORGET = tiny_facts(4, offset=0)
SMALL = ["--epochs", "2", "--batch-size", "2", "--kl-weight", "0", "-q"]


def _forget_file(tmp_path):
    path = tmp_path / "forget.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in FORGET))
    return path


def _leftovers(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "moxkit" in p.name)


def test_signal_burst_after_interrupted_never_kills_by_the_signal(tmp_path):
    """A SIGTERM that lands the moment the handlers are given back (delivered there by a
    spy on signal.signal) used to meet the default action: death by SIGTERM, exit -15."""
    ref = {f"w{i}": torch.ones(64, 64) for i in range(4)}
    save_file(ref, tmp_path / "ref.safetensors")
    save_file({k: 2 * v for k, v in ref.items()}, tmp_path / "mem.safetensors")
    script = textwrap.dedent(f"""
        import os, signal, sys
        real = signal.signal
        def spy(sig, handler):
            previous = real(sig, handler)
            if sig == signal.SIGTERM and handler is signal.SIG_DFL:
                os.kill(os.getpid(), signal.SIGTERM)  # the burst's next signal, right here
            return previous
        signal.signal = spy
        from moxkit.cli.main import main
        sys.argv = ["moxkit", "extrapolate", {str(tmp_path / "ref.safetensors")!r},
                    {str(tmp_path / "mem.safetensors")!r}, "-a", "2", "-q",
                    "-o", {str(tmp_path / "out")!r}]
        main()
    """)
    env = {**os.environ, "MOXKIT_TEST_SIGNALS": "compute:SIGTERM"}
    import subprocess

    proc = subprocess.run([sys.executable, "-c", script], env={**env, "PYTHONPATH": os.getcwd()},
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr.strip() == "moxkit: interrupted"
    assert not (tmp_path / "out").exists() and not _leftovers(tmp_path)


def test_interrupted_momentum_on_disk_names_no_internal_path(cli, setup, tmp_path):  # noqa: F811
    """The first tick publishes θ_for inside the staged output; a signal held there used to
    be reported as '<staged>/.moxkit-work/forget-1 was complete and is kept' with OUT absent."""
    ref = setup[2]
    out = tmp_path / "forget"
    result = cli.run("unlearn", ref, "--forget", _forget_file(tmp_path), "--eta", "0.5",
                     "--extrapolate-on", "disk", "--extrapolate-every", "1", "-o", out, *SMALL,
                     env={"MOXKIT_TEST_SIGNALS": "publish:SIGTERM"})  # fmt: skip
    assert result.code == 130, result.err
    assert result.err.strip() == "moxkit: interrupted"
    assert not out.exists() and not _leftovers(tmp_path)


def test_interrupted_sweep_on_disk_names_no_scratch_model(cli, setup, tmp_path):  # noqa: F811
    root, data, ref, mem, _ = setup
    signals = {"MOXKIT_TEST_SIGNALS": "publish:SIGTERM"}
    result = cli.run("sweep", ref, mem, "--alphas", "1", "--data", data, "--on-disk", *FAST,
                     "-o", tmp_path / "sweep", env=signals)  # fmt: skip
    assert result.code == 130, result.err
    # (transformers' own tokenizer notice may come first: the loader's business, not this)
    assert result.err.strip().splitlines()[-1] == "moxkit: interrupted", result.err


def test_outputs_take_the_umask_modes(cli, setup, tmp_path):  # noqa: F811
    """transformers writes model.safetensors through a private 0600 temporary."""
    previous = os.umask(0o022)
    try:
        result = cli("train-mem", setup[2], "--forget", _forget_file(tmp_path), "-o",
                     tmp_path / "mem", *SMALL)  # fmt: skip
    finally:
        os.umask(previous)
    assert result.code == 0, result.err
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "mem").iterdir()}
    assert modes and all(m == 0o644 for m in modes.values()), modes
    assert stat.S_IMODE((tmp_path / "mem").stat().st_mode) == 0o755


def test_dictionary_encoded_parquet_cannot_unfold(cli, setup, tmp_path, monkeypatch):  # noqa: F811
    """12 KB of dictionary-encoded Parquet held 1.7 M rows (9 GiB as Python objects); a few
    hundred bytes of compressed text unfold into 100 MB."""
    many = tmp_path / "many.parquet"
    n = 1_700_000
    table = pa.table({"question": pa.array(["Who?"] * n).dictionary_encode(),
                      "answer": pa.array(["Me."] * n).dictionary_encode()})  # fmt: skip
    pq.write_table(table, many, compression="zstd")
    assert many.stat().st_size < 50_000

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr("moxkit.train.api.run", refuse)
    result = cli("train-mem", setup[2], "--forget", many, "-o", tmp_path / "mem", *SMALL)
    line = one_line(result)
    assert "1,700,000 rows" in line and "many.parquet" in line
    long = tmp_path / "long.parquet"
    pq.write_table(pa.table({"text": ["x" * (1 << 20)] * 100}), long, compression="zstd",
                   store_schema=False)  # fmt: skip
    with pytest.raises(MoxError, match="unfolds into more than"):
        read_records(long, "--forget")
    fine = tmp_path / "fine.parquet"
    pq.write_table(pa.table({"question": ["q1", "q2"], "answer": ["a", "b"]}), fine)
    assert [r for _, r in read_records(fine, "--forget")][1] == {"question": "q2", "answer": "b"}


def test_lora_run_is_quiet_under_q(cli, setup, tmp_path):  # noqa: F811
    pytest.importorskip("peft")
    result = cli.run("unlearn", setup[2], "--forget", _forget_file(tmp_path), "--lora", "2",
                     "-o", tmp_path / "adapter", *SMALL)  # fmt: skip
    assert result.code == 0, result.err
    assert result.err.strip() == "", result.err
