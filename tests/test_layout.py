"""Nothing in the repository root may shadow an installed package. Python puts the working
directory first on sys.path for `python -c`, `python -m` and notebooks, so a top-level folder
named like a distribution (transformers requires one called `kernels`) would be imported in
its place and break transformers for anyone working in a clone. And an import failure inside
a loader is reported as the environment's fault, not the model's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from moxkit.errors import MoxError
from moxkit.hf import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
# what Python may import from the root by its top-level name: the package itself, and the
# build script (run by the build, never imported)
ROOT_IMPORTABLE = {"moxkit", "setup"}


def importable_names(folder: Path) -> set[str]:
    """Top-level names `import NAME` would find in `folder`: modules, regular packages and
    folders that could be namespace portions (those shadow only an absent package, but a
    clone should not offer them)."""
    names = set()
    for entry in folder.iterdir():
        if entry.name.startswith((".", "_")):
            continue
        if entry.is_file() and entry.suffix == ".py":
            names.add(entry.stem)
        elif (entry / "__init__.py").is_file():
            names.add(entry.name)
    return names


def test_root_offers_only_moxkit_as_a_package():
    assert importable_names(ROOT) <= ROOT_IMPORTABLE


def test_importable_names_sees_a_package_folder(tmp_path):
    """The check above can fail: a folder with __init__.py at the root is found."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("")
    (tmp_path / "cli.py").write_text("")
    assert importable_names(tmp_path) == {"kernels", "cli"}


@pytest.fixture
def installed(tmp_path):
    """A site folder holding stand-in distributions named `kernels` and `cli` (transformers
    requires the first; nothing stops a user installing the second)."""
    site = tmp_path / "site"
    for name in ("kernels", "cli"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"WHO = 'installed {name}'\n")
    return site


def run_in_root(code: list[str], site: Path | None = None, timeout: int = 300):
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if site is not None:
        env["PYTHONPATH"] = str(site)  # after the working directory, as site-packages is
    return subprocess.run(
        [sys.executable, *code], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def test_installed_kernels_and_cli_win_in_the_root(installed):
    done = run_in_root(["-c", "import kernels, cli; print(kernels.WHO); print(cli.WHO)"], installed)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["installed kernels", "installed cli"]


def test_transformers_imports_in_the_root():
    code = "from transformers import AutoModelForCausalLM, AutoTokenizer; print('ok')"
    done = run_in_root(["-c", code])
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "ok"


def test_installed_kernels_distribution_is_the_one_imported():
    """Where the real `kernels` distribution is installed (transformers >= 5 requires it), a
    process in the root imports it from site-packages."""
    try:
        import importlib.metadata

        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the kernels distribution is not installed")
    done = run_in_root(["-c", "import kernels; print(kernels.__file__)"])
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()).resolve().is_relative_to(Path(sys.prefix).resolve())


@pytest.mark.slow
def test_pytest_collects_in_the_root():
    done = run_in_root(["-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider"])
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert " tests collected" in done.stdout or "tests collected" in done.stdout


def test_import_failure_in_a_loader_names_the_package(tmp_path, monkeypatch):
    """A broken dependency met while loading reads as the environment's fault: the package
    that failed and where it was found, not "cannot load the tokenizer"."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")
    shadow = tmp_path / "kernels" / "__init__.py"

    def broken(*args, **kwargs):
        raise ImportError("cannot import name 'CUDAProperties' from 'kernels'",
                          name="kernels", path=str(shadow))  # fmt: skip

    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", broken)
    with pytest.raises(MoxError) as info:
        load_tokenizer(model, "MODEL")
    message = str(info.value)
    assert "a Python package failed to import (kernels, found at " + str(shadow) in message
    assert "the environment, not the input" in message
    assert "\n" not in message


def test_missing_module_in_a_loader_says_not_installed(tmp_path, monkeypatch):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{}")

    def wrapped(*args, **kwargs):  # transformers re-raises some import errors in its own types
        try:
            raise ModuleNotFoundError("No module named 'sentencepiece'", name="sentencepiece")
        except ImportError as exc:
            raise RuntimeError("Failed to import the tokenizer class") from exc

    import transformers

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", wrapped)
    with pytest.raises(MoxError, match=r"\(sentencepiece, not installed\)"):
        load_tokenizer(model, "MODEL")


def test_a_broken_tokenizer_is_still_blamed_on_the_tokenizer(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "tokenizer.json").write_text("{not json")
    with pytest.raises(MoxError, match="tokenizer") as info:  # the file, or the loader
        load_tokenizer(model, "MODEL")
    assert "failed to import" not in str(info.value)
    assert "environment" not in str(info.value)


# ---- the wings' import direction (docs/design.md): arrows point down, never up ----

PACKAGE = ROOT / "moxkit"
# wing -> the moxkit subpackages it must never import
FORBIDDEN = {
    "engine": {"adapters", "apps", "train", "eval", "cli", "hf", "matching"},
    "adapters": {"apps", "train", "eval", "cli"},
    "train": {"apps", "cli"},
    "eval": {"apps", "train", "cli"},
    "kernels": {"adapters", "apps", "train", "eval", "cli"},
}


def _moxkit_imports(path: Path, root: Path = ROOT) -> set[str]:
    """The first component under moxkit of every module `path` imports (relative or not)."""
    import ast

    package = list(path.relative_to(root).parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = base + (node.module.split(".") if node.module else [])
                names = [target + [a.name] for a in node.names] if not node.module else [target]
            else:
                names = [(node.module or "").split(".")]
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        else:
            continue
        for name in names:
            if len(name) > 1 and name[0] == "moxkit":
                found.add(name[1])
    return found


def test_wings_import_only_downwards():
    broken = []
    for wing, forbidden in FORBIDDEN.items():
        for path in sorted((PACKAGE / wing).rglob("*.py")):
            for bad in sorted(_moxkit_imports(path) & forbidden):
                broken.append(f"{path.relative_to(ROOT)} imports moxkit.{bad}")
    assert not broken, "\n".join(broken)


def test_the_import_scan_sees_relative_and_absolute_imports(tmp_path):
    probe = tmp_path / "moxkit" / "engine" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..apps import tiny\nimport moxkit.train.api\nfrom . import formula\n")
    assert _moxkit_imports(probe, tmp_path) == {"apps", "train", "engine"}
