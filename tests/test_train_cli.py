"""`moxkit train-mem` / `moxkit unlearn` from the command line: outputs, bad inputs, and the
same run in two CPU processes (gloo) against one process with the same global batch."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from moxkit.apps.tiny import build_tiny_llama, build_word_tokenizer, save_tiny_model, tiny_facts
from moxkit.cli.main import main

FORGET = tiny_facts(8, offset=0)
RETAIN = tiny_facts(16, offset=8)
SMALL = ["--epochs", "2", "--lr", "1e-3", "--batch-size", "4", "--warmup-epochs", "0.5", "-q"]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    tok = build_word_tokenizer([f"{r['question']} {r['answer']}" for r in FORGET + RETAIN])
    model = build_tiny_llama(len(tok), hidden_size=32, num_heads=2, intermediate_size=64)
    save_tiny_model(model, tok, root / "ref")
    for name, rows in (("forget", FORGET), ("retain", RETAIN)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def run(args, capsys):
    """main() in process; returns (exit code, stdout, stderr)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        torch.set_num_threads(before)
    out = capsys.readouterr()
    return code, out.out, out.err


def data_args(root):
    return ["--forget", str(root / "forget.jsonl"), "--retain", str(root / "retain.jsonl")]


def test_train_mem_then_unlearn_outputs(workdir, capsys, tmp_path):
    mem = tmp_path / "mem"
    code, out, err = run(["train-mem", str(workdir / "ref"), *data_args(workdir), "-o", str(mem),
                          *SMALL], capsys)  # fmt: skip
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(mem)  # what transformers reads back
    assert model.dtype == torch.float32
    AutoTokenizer.from_pretrained(mem)
    log = [json.loads(line) for line in (mem / "moxkit_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # 8 rows / batch 4 × 2 epochs
    assert {"forget_nll", "retain_kl", "lr", "loss"} <= set(log[0])
    args = json.loads((mem / "moxkit_args.json").read_text())
    assert args["command"] == "train-mem" and args["config"]["batch_size"] == 4

    forget = tmp_path / "forget"
    keep = tmp_path / "kept-mem"
    code, _, err = run(["unlearn", str(workdir / "ref"), *data_args(workdir), "-o", str(forget),
                        "--alpha", "3", "--save-mem", str(keep), *SMALL], capsys)  # fmt: skip
    assert code == 0, err
    # the forget model is (1+α)·θ_ref − α·θ_mem of the saved θ_mem, here in fp64
    ref_w = load_file(workdir / "ref" / "model.safetensors")
    mem_w = load_file(keep / "model.safetensors")
    for_w = load_file(forget / "model.safetensors")
    assert for_w.keys() == ref_w.keys()
    for name, r in ref_w.items():
        want = 4 * r.double() - 3 * mem_w[name].double()
        torch.testing.assert_close(for_w[name].double(), want, rtol=0, atol=1e-6)
    # same seed, same data: the θ_mem train-mem wrote is the one unlearn extrapolated from
    saved = load_file(mem / "model.safetensors")
    assert all(torch.equal(saved[n], mem_w[n]) for n in saved)
    assert any(r.get("event") == "extrapolate" for r in map(json.loads, (
        forget / "moxkit_log.jsonl").read_text().splitlines()))  # fmt: skip


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing-file", "--forget {root}/nope.jsonl: no such file"),
        ("bad-json", "--forget {root}/bad.jsonl: line 2: invalid JSON"),
        ("missing-fields", "{root}/fields.jsonl:line 2: missing fields"),
        ("empty-forget", "--forget {root}/empty.jsonl: no rows"),
        ("no-tokenizer", "MODEL {root}/notok: no tokenizer files"),
        ("bad-method", "Invalid value for '--method'"),
        ("bad-batch", "--batch-size 0: must be at least 1"),
        ("target-count", "2 replacement answers for 8 forget rows"),
        ("target-field", "{root}/targets.jsonl:line 1: needs an answer, completion or text"),
    ],
)
def test_bad_inputs_one_line_nothing_written(workdir, capsys, tmp_path, case, message):
    root = tmp_path
    model, forget = str(workdir / "ref"), str(workdir / "forget.jsonl")
    extra = []
    if case == "missing-file":
        forget = str(root / "nope.jsonl")
    elif case == "bad-json":
        forget = str(_write(root / "bad.jsonl", '{"text": "a"}\n{"text": \n'))
    elif case == "missing-fields":
        forget = str(_write(root / "fields.jsonl", '{"text": "a"}\n{"title": "b"}\n'))
    elif case == "empty-forget":
        forget = str(_write(root / "empty.jsonl", "\n"))
    elif case == "no-tokenizer":
        notok = root / "notok"
        notok.mkdir()
        for f in ("config.json", "model.safetensors"):
            (notok / f).write_bytes((workdir / "ref" / f).read_bytes())
        model = str(notok)
    elif case == "bad-method":
        extra = ["--method", "magic"]
    elif case == "bad-batch":
        extra = ["--batch-size", "0"]
    elif case == "target-count":
        targets = _write(root / "targets.jsonl", '{"answer": "no"}\n{"text": "no"}\n')
        extra = ["--target-file", str(targets)]
    elif case == "target-field":
        targets = _write(root / "targets.jsonl", '{"question": "no"}\n')
        extra = ["--target-file", str(targets)]
    out = root / "out"
    before = sorted(p.name for p in root.iterdir())
    args = ["unlearn", model, "--forget", forget, "--retain", str(workdir / "retain.jsonl"),
            "-o", str(out), *SMALL, *extra]  # fmt: skip
    code, stdout, stderr = run(args, capsys)
    assert code not in (0, None)
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 or case == "bad-method", stderr  # click adds its usage lines
    assert message.format(root=root) in stderr
    assert "Traceback" not in stderr
    assert sorted(p.name for p in root.iterdir()) == before  # no output, no partial dir


def test_existing_output_needs_force(workdir, capsys, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["train-mem", str(workdir / "ref"), *data_args(workdir), "-o", str(out), *SMALL]
    code, _, err = run(args, capsys)
    assert code == 1 and "already exists (use --force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


@pytest.mark.slow
def test_two_processes_match_one(workdir, tmp_path, capsys):
    """torchrun with 2 CPU processes (gloo), per-device batch 2, against 1 process with batch
    4: the same global batch, so the same θ_mem up to float summation order."""
    common = [str(workdir / "ref"), *data_args(workdir), *SMALL, "--no-bf16"]  # to 1e-6: fp32
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", "-m", "moxkit.cli.main"]  # fmt: skip
    two = tmp_path / "two"
    proc = subprocess.run([*launcher, "train-mem", *common, "-o", str(two)], env=env,
                          capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    outs = {"two": two, "one": tmp_path / "one"}
    code, _, err = run(["train-mem", *common, "-o", str(outs["one"])], capsys)
    assert code == 0, err
    assert json.loads((outs["two"] / "moxkit_args.json").read_text())["world_size"] == 2
    one, two = (load_file(outs[k] / "model.safetensors") for k in ("one", "two"))
    ref = load_file(workdir / "ref" / "model.safetensors")
    moved = max((one[n] - ref[n]).abs().max().item() for n in one)
    assert moved > 1e-4  # training did something
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=1e-6)
    logs = [
        [json.loads(line) for line in (outs[k] / "moxkit_log.jsonl").read_text().splitlines()]
        for k in ("one", "two")
    ]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    for a, b in zip(*logs, strict=True):  # the logged losses are averaged over both processes
        assert b["forget_nll"] == pytest.approx(a["forget_nll"], abs=1e-5)
