"""The core install runs `moxkit extrapolate` without torch, transformers or the evaluation
stack; a command that needs an extra the install lacks names it in one line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from safetensors.torch import load_file

from moxkit.apps.tiny import build_tiny_llama, build_word_tokenizer
from moxkit.extras import EXTRA_OF, missing_extra

ROOT = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# what a core install does not have: every package an extra brings
BLOCKED = sorted(EXTRA_OF)

BLOCKER = """
import sys
from importlib.abc import MetaPathFinder
BLOCKED = set(sys.argv[1].split(","))
class Blocker(MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Blocker())
from moxkit.cli.main import main
main(sys.argv[2:])
"""


def moxkit_without(blocked: list[str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCKER, ",".join(blocked), *map(str, args)],
                          capture_output=True, text=True, cwd="/", timeout=300)  # fmt: skip


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    tok = build_word_tokenizer(["the capital of zorbia is velmont"])
    for name, seed in (("ref", 0), ("mem", 1)):
        model = build_tiny_llama(len(tok), seed=seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return root


def test_extrapolate_runs_with_the_core_install_only(pair, tmp_path):
    out = tmp_path / "forget"
    done = moxkit_without(BLOCKED, "extrapolate", pair / "ref", pair / "mem", "--alpha", "2",
                          "-o", out, "-q")  # fmt: skip
    assert done.returncode == 0, done.stderr
    want = tmp_path / "want"
    full = subprocess.run([sys.executable, "-m", "moxkit.cli.main", "extrapolate", pair / "ref",
                           pair / "mem", "--alpha", "2", "-o", want, "-q"],
                          capture_output=True, text=True, cwd="/")  # fmt: skip
    assert full.returncode == 0, full.stderr
    got, expected = load_file(out / "model.safetensors"), load_file(want / "model.safetensors")
    assert got.keys() == expected.keys()
    for name in got:
        assert torch.equal(got[name], expected[name]), name


def test_the_blocker_blocks(pair, tmp_path):
    """The check above can fail: with torch blocked, in-memory work that needs it does."""
    done = moxkit_without(BLOCKED, "extrapolate", pair / "ref", pair / "mem", "--alpha", "2",
                          "-o", tmp_path / "x", "--device", "cuda")  # fmt: skip
    assert done.returncode == 1
    assert done.stderr.strip() == (
        "moxkit: error: this needs the Python package torch, which is not installed: "
        "pip install 'moxkit[train]'"
    )


def test_training_without_the_train_extra_names_it(pair, tmp_path):
    forget = tmp_path / "forget.jsonl"
    forget.write_text('{"prompt": "the capital of zorbia is", "completion": "velmont"}\n')
    done = moxkit_without(["transformers", "accelerate"], "train-mem", pair / "ref",
                          "--forget", forget, "--retain", forget, "-o", tmp_path / "mem",
                          "-q")  # fmt: skip
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr
    assert re.search(r"(transformers|accelerate).*pip install 'moxkit\[train\]'", lines[0])
    assert not (tmp_path / "mem").exists()


def test_missing_extra_only_for_packages_an_extra_brings():
    assert missing_extra(ModuleNotFoundError("x", name="scipy.stats")).endswith("'moxkit[eval]'")
    assert missing_extra(ModuleNotFoundError("x", name="peft")).endswith("'moxkit[lora]'")
    assert missing_extra(ModuleNotFoundError("x", name="nosuchthing")) is None
    assert missing_extra(ImportError("cannot import name 'x' from 'torch'", name="torch")) is None


def _distribution(requirement: str) -> str:
    return re.split(r"[<>=\[ ;]", requirement, maxsplit=1)[0].lower().replace("-", "_")


def test_each_extra_brings_what_the_error_promises():
    optional = PYPROJECT["project"]["optional-dependencies"]

    def closure(extra: str) -> set[str]:
        out = set()
        for req in optional[extra]:
            m = re.fullmatch(r"moxkit\[([a-z,]+)\]", req)
            if m:
                for inner in m.group(1).split(","):
                    out |= closure(inner)
            else:
                out.add(_distribution(req))
        return out

    for package, extra in EXTRA_OF.items():
        assert package in closure(extra), (package, extra)
    core = {_distribution(r) for r in PYPROJECT["project"]["dependencies"]}
    assert core.isdisjoint(EXTRA_OF), core & set(EXTRA_OF)
    assert set(EXTRA_OF) <= closure("dev")  # the test install has everything
