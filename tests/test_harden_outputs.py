"""Outputs never destroy inputs (issue 20): `eval -o`, `sweep -o` and the training commands
check OUT against every path they read (the same file, inside it, holding it, reached through
a link), replace an existing OUT only with --force and never when it is or holds an input,
and find an OUT that cannot be written before any model is loaded."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from moxkit.apps.tiny import build_tiny_llama, save_tiny_model, tiny_facts
from moxkit.apps.tofu_mini import write

FAST = ["--max-items", "2", "--max-new-tokens", "2", "--verbmem-max-new-tokens", "2", "-q"]


def digest(path: Path) -> dict[str, str]:
    """Every file under `path` (or the file itself) by content: proves nothing changed."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def cache_snapshot(model: Path, root: Path) -> tuple[Path, Path]:
    """`model` laid out as a Hugging Face cache repo: snapshots/REV/* link into ../../blobs
    (the links moxkit follows). Returns (snapshot, blobs)."""
    repo = root / "models--org--name"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / ("0" * 40)
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for f in model.iterdir():
        (blobs / f.name).write_bytes(f.read_bytes())
        (snapshot / f.name).symlink_to(Path("../../blobs") / f.name)
    return snapshot, blobs


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("harden")
    bench = write(root / "tm", n_authors=10)
    tok = AutoTokenizer.from_pretrained(bench / "tokenizer")
    data = root / "data"
    data.mkdir()
    for name in ("forget", "retain", "general", "forget_text", "holdout_text"):
        lines = (bench / "forget10" / f"{name}.jsonl").read_text().splitlines()
        (data / f"{name}.jsonl").write_text("\n".join(lines[:3]) + "\n")
    ref = save_tiny_model(build_tiny_llama(len(tok), hidden_size=16, seed=1), tok, root / "ref")
    mem = build_tiny_llama(len(tok), hidden_size=16, seed=1)
    with torch.no_grad():
        for p in mem.parameters():
            p.add_(0.01)
    mem = save_tiny_model(mem, tok, root / "mem")
    report = root / "retain.json"
    report.write_text(json.dumps({"summary": {}, "sets": {}}))
    return root, data, ref, mem, report


@pytest.fixture
def no_model_loads(monkeypatch):
    """Refusals must come before any model is loaded (and so before any evaluation)."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the output was checked")

    monkeypatch.setattr("moxkit.eval.evaluate.load_model", refuse)


def one_line(result) -> str:
    lines = result.err.strip().splitlines()
    assert result.code == 1 and len(lines) == 1 and "Traceback" not in result.err, result.err
    return lines[0]


# ------------------------------------------------------------------------- eval -o


def _eval(cli, setup, out, *extra):
    root, data, ref, _, report = setup
    return cli("eval", ref, "--data", data, "--retain-model", report, *FAST, "-o", out, *extra)


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize(
    "target, message",
    [
        ("data", "would overwrite the input"),
        ("data/retain.jsonl", "would overwrite the input"),
        ("data/new.json", "would lie inside the input"),
        ("ref/model.safetensors", "would overwrite the input"),
        ("ref/config.json", "would overwrite the input"),
        ("ref", "would overwrite the input"),
        ("retain.json", "would overwrite the input"),
        (".", "would replace a folder holding the input"),
    ],
)
def test_eval_output_never_replaces_an_input(cli, setup, no_model_loads, target, message, force):
    root = setup[0]
    before = digest(root / "data") | digest(root / "ref") | digest(root / "retain.json")
    result = _eval(cli, setup, root / target, *(["--force"] if force else []))
    assert message in one_line(result)
    assert digest(root / "data") | digest(root / "ref") | digest(root / "retain.json") == before
    assert not (root / "data" / "new.json").exists()


def test_eval_output_through_a_link_to_an_input(cli, setup, no_model_loads, tmp_path):
    """A link as -o is followed; a model file that links elsewhere makes its target an input
    (a hub cache snapshot's files link into ../../blobs)."""
    root, data, ref, _, report = setup
    link = tmp_path / "out.json"
    link.symlink_to(data / "forget.jsonl")
    assert "would overwrite the input" in one_line(_eval(cli, setup, link, "--force"))
    model, blobs = cache_snapshot(ref, tmp_path)
    before = digest(blobs)
    for out in (blobs / "model.safetensors", blobs):
        result = cli("eval", model, "--data", data, "--retain-model", report, *FAST, "-o", out,
                     "--force")  # fmt: skip
        assert "the input" in one_line(result), out
    assert digest(blobs) == before


def test_eval_existing_output_needs_force_and_never_a_folder(cli, setup, no_model_loads, tmp_path):
    old = tmp_path / "old.json"
    old.write_text("keep me\n")
    assert "already exists (use --force" in one_line(_eval(cli, setup, old))
    assert old.read_text() == "keep me\n"
    folder = tmp_path / "results"
    (folder / "inner").mkdir(parents=True)
    (folder / "inner" / "a.txt").write_text("mine")
    for extra in ([], ["--force"]):
        assert "folder" in one_line(_eval(cli, setup, folder, *extra))
    assert (folder / "inner" / "a.txt").read_text() == "mine"


def test_eval_unwritable_output_is_found_before_evaluating(cli, setup, no_model_loads):
    """/sys takes no new files, whoever asks (root included, for whom access() says yes)."""
    result = _eval(cli, setup, "/sys/moxkit-report.json")
    assert "/sys" in one_line(result)


def test_eval_force_replaces_a_report(cli, setup, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("old\n")
    result = _eval(cli, setup, out, "--force")
    assert result.code == 0, result.err
    assert "summary" in json.loads(out.read_text())


# ------------------------------------------------------------------------- sweep -o


def _sweep(cli, setup, out, *extra):
    root, data, ref, mem, _ = setup
    return cli("sweep", ref, mem, "--alphas", "1", "--data", data, *FAST, "-o", out, *extra)


@pytest.mark.parametrize("target", ["ref", "mem", "data", "ref/sub"])
def test_sweep_output_never_lies_in_an_input(cli, setup, no_model_loads, target):
    root = setup[0]
    before = digest(root / "ref") | digest(root / "mem") | digest(root / "data")
    for extra in ([], ["--force"]):
        result = _sweep(cli, setup, root / target, *extra)
        assert "the input" in one_line(result)
    assert digest(root / "ref") | digest(root / "mem") | digest(root / "data") == before
    assert not (root / "ref" / "sub").exists()


def test_sweep_existing_report_needs_force(cli, setup, no_model_loads, tmp_path):
    (tmp_path / "sweep.json").write_text("old\n")
    assert "already exists (use --force" in one_line(_sweep(cli, setup, tmp_path))
    assert (tmp_path / "sweep.json").read_text() == "old\n"


# ------------------------------------------------------------------ train-mem / unlearn

FORGET = tiny_facts(4, offset=0)
SMALL = ["--epochs", "1", "--batch-size", "4", "-q"]


@pytest.fixture
def train_inputs(setup, tmp_path):
    forget = tmp_path / "forget.jsonl"
    forget.write_text("".join(json.dumps(r) + "\n" for r in FORGET))
    return setup[2], forget


def _no_training(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("training started before the output was checked")

    monkeypatch.setattr("moxkit.train.api.run", refuse)


def test_train_mem_output_never_replaces_the_target_file(cli, train_inputs, tmp_path, monkeypatch):
    _no_training(monkeypatch)
    ref, forget = train_inputs
    targets = tmp_path / "t" / "targets.jsonl"
    targets.parent.mkdir()
    targets.write_text("".join(json.dumps({"answer": "I do not know."}) + "\n" for _ in FORGET))
    before = targets.read_text()
    for out, message in ((targets, "would overwrite the input"),
                         (targets.parent, "would replace a folder holding the input")):  # fmt: skip
        result = cli("train-mem", ref, "--forget", forget, "--kl-weight", "0", "--target-file",
                     targets, "-o", out, "--force", *SMALL)  # fmt: skip
        assert message in one_line(result) and "targets.jsonl" in result.err
    assert targets.read_text() == before


def test_target_file_count_is_reported_as_target_file(cli, train_inputs, tmp_path, monkeypatch):
    _no_training(monkeypatch)
    ref, forget = train_inputs
    targets = tmp_path / "targets.jsonl"
    targets.write_text(json.dumps({"answer": "I do not know."}) + "\n")
    result = cli("train-mem", ref, "--forget", forget, "--kl-weight", "0", "--target-file",
                 targets, "-o", tmp_path / "out", *SMALL)  # fmt: skip
    line = one_line(result)
    assert line.startswith("moxkit: error: --target-file") and "1 replacement answers" in line


def test_train_outputs_inside_each_other_are_refused(cli, train_inputs, tmp_path, monkeypatch):
    _no_training(monkeypatch)
    ref, forget = train_inputs
    for out, save_mem in (
        (tmp_path / "a", tmp_path / "a" / "mem"),
        (tmp_path / "b" / "f", tmp_path / "b"),
    ):
        result = cli("unlearn", ref, "--forget", forget, "--kl-weight", "0", "-o", out,
                     "--save-mem", save_mem, *SMALL)  # fmt: skip
        assert "--save-mem" in one_line(result)


def test_train_output_through_a_link_to_the_model(cli, train_inputs, tmp_path, monkeypatch):
    """MODEL's files linking elsewhere (a hub snapshot) make their targets inputs."""
    _no_training(monkeypatch)
    ref, forget = train_inputs
    model, blobs = cache_snapshot(ref, tmp_path)
    before = digest(blobs)
    result = cli("train-mem", model, "--forget", forget, "--kl-weight", "0", "-o", blobs,
                 "--force", *SMALL)  # fmt: skip
    assert "the input" in one_line(result)
    assert digest(blobs) == before and os.path.isdir(blobs)
