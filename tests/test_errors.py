"""Errors name the Python API's parameters; the CLI shows its flags instead, in one place
(moxkit.cli.main.for_cli). An API caller catches the MoxError subclasses apart."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import moxkit
from moxkit.cli.main import flags, for_cli
from moxkit.errors import (
    InputError,
    MismatchError,
    MoxError,
    OutputError,
    ResourceError,
    naming,
)

ROOT = Path(moxkit.__file__).parent


@pytest.fixture
def pair(tmp_path):
    save_file({"w": np.ones((4, 4), np.float32)}, str(tmp_path / "ref.safetensors"))
    save_file({"w": np.zeros((4, 4), np.float32)}, str(tmp_path / "mem.safetensors"))
    save_file({"w": np.zeros((4, 5), np.float32)}, str(tmp_path / "wide.safetensors"))
    save_file({"w": np.full((4, 4), np.inf, np.float32)}, str(tmp_path / "inf.safetensors"))
    (tmp_path / "taken.safetensors").write_bytes(b"")
    return tmp_path / "ref.safetensors", tmp_path / "mem.safetensors"


# (API keyword arguments, other files, the subclass, the API's words, the CLI's words)
CASES = {
    "size": ({"max_memory": "lots"}, {}, InputError, "max_memory 'lots': not a size",
             "--max-memory 'lots': not a size"),
    "budget": ({"max_memory": "10MB"}, {}, ResourceError, "memory budget max_memory is 10.00 MB",
               "memory budget --max-memory is 10.00 MB"),
    "shard": ({"max_shard_size": "-5GB"}, {}, InputError, "max_shard_size '-5GB'",
              "--max-shard-size '-5GB'"),
    "dtype": ({"dtype": "int8"}, {}, InputError, "dtype 'int8': expected one of",
              "--dtype 'int8': expected one of"),
    "alpha": ({"alpha": 0.0}, {}, InputError, "alpha 0.0: must be between",
              "--alpha 0.0: must be between"),
    "device": ({"device": "tpu"}, {}, InputError, "device 'tpu': expected cpu, cuda or auto",
               "--device 'tpu': expected cpu, cuda or auto"),
    "exists": ({}, {"out": "taken.safetensors"}, OutputError,
               "already exists (use force=True to replace it)",
               "already exists (use --force to replace it)"),
    "shape": ({}, {"mem": "wide.safetensors"}, MismatchError,
              "tensor 'w' has shape [4, 5] in MEM but [4, 4] in REF",
              "tensor 'w' has shape [4, 5] in MEM but [4, 4] in REF"),
    "nonfinite": ({}, {"mem": "inf.safetensors"}, InputError,
                  "pass allow_nonfinite=True to keep them", "pass --allow-nonfinite to keep them"),
}  # fmt: skip


def _paths(tmp_path, files: dict) -> dict:
    names = {"ref": "ref.safetensors", "mem": "mem.safetensors", "out": "out.safetensors"}
    return {k: tmp_path / files.get(k, v) for k, v in names.items()}


@pytest.mark.parametrize("case", CASES)
def test_api_raises_the_subclass_naming_the_parameter(tmp_path, pair, case):
    kwargs, files, cls, api_words, cli_words = CASES[case]
    p = _paths(tmp_path, files)
    kwargs = {"alpha": 1.0, "max_memory": None, **kwargs}
    alpha = kwargs.pop("alpha")
    with pytest.raises(cls) as caught:
        moxkit.extrapolate(p["ref"], p["mem"], p["out"], alpha, progress=False, **kwargs)
    assert isinstance(caught.value, MoxError)
    message = str(caught.value)
    assert api_words in message and " --" not in message, message
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("case", CASES)
def test_cli_names_the_flag_in_one_line(cli, tmp_path, pair, case):
    kwargs, files, _, _, cli_words = CASES[case]
    p = _paths(tmp_path, files)
    args = ["extrapolate", p["ref"], p["mem"], "-o", p["out"], "-a", kwargs.get("alpha", 1.0)]
    for name, value in kwargs.items():
        if name != "alpha":
            args += [f"--{name.replace('_', '-')}", value]
    result = cli(*args)
    assert result.code == 1, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.err, result.err
    assert lines[0].startswith("moxkit: error: ") and cli_words in lines[0], lines[0]
    api_words = CASES[case][3]  # the API's own spelling is gone
    assert api_words == cli_words or not re.search(rf"(?<![-\w]){re.escape(api_words)}", lines[0])


def _adapter(tmp_path, b: np.ndarray):
    """BASE (one weight `w`) and a one-module PEFT LoRA adapter of rank 2 on it."""
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir(), adapter.mkdir()
    save_file({"w.weight": np.ones((4, 3), np.float32)}, str(base / "model.safetensors"))
    a = np.ones((2, 3), np.float32)
    save_file({"base_model.model.w.lora_A.weight": a, "base_model.model.w.lora_B.weight": b},
              str(adapter / "adapter_model.safetensors"))  # fmt: skip
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "target_modules": ["w"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return base, adapter


# adapters: (B factor, options, the subclass, the API's words, the CLI's words)
ADAPTER_CASES = {
    "nonfinite": (np.full((4, 2), np.nan, np.float32), {}, InputError,
                  "pass allow_nonfinite=True to keep them", "pass --allow-nonfinite to keep them"),
    "budget": (np.ones((4, 2), np.float32), {"max_memory": "2MiB"}, ResourceError,
               "max_memory 2.10 MB is too small to merge", "--max-memory 2.10 MB is too small"),
}  # fmt: skip


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_adapter_merge_api_raises_the_subclass_naming_the_parameter(tmp_path, case):
    from moxkit.adapters import extrapolate_adapter

    b, options, cls, api_words, _ = ADAPTER_CASES[case]
    base, adapter = _adapter(tmp_path, b)
    with pytest.raises(cls) as caught:
        extrapolate_adapter(base, adapter, 2.0, tmp_path / "out", merge=True, **options)
    message = str(caught.value)
    assert api_words in message and " --" not in message, message
    assert next(iter(options), "allow_nonfinite") in caught.value.params
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("case", ADAPTER_CASES)
def test_adapter_merge_cli_names_the_flag_in_one_line(cli, tmp_path, case):
    b, options, _, api_words, cli_words = ADAPTER_CASES[case]
    base, adapter = _adapter(tmp_path, b)
    args = ["extrapolate", base, adapter, "--alpha", "2", "--merge", "-o", tmp_path / "out"]
    for name, value in options.items():
        args += [f"--{name.replace('_', '-')}", value]
    result = cli(*args)
    assert result.code == 1, result.err
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.err, result.err
    assert lines[0].startswith("moxkit: error: ") and cli_words in lines[0], lines[0]
    assert api_words not in lines[0]
    assert not (tmp_path / "out").exists()


def test_subclasses_are_caught_as_mox_error():
    for cls in (InputError, MismatchError, OutputError, ResourceError):
        assert issubclass(cls, MoxError)
        with pytest.raises(MoxError):
            raise cls("x")
    assert MoxError("x").params == ()
    assert naming(InputError("a", params=("b",)), "c").params == ("b", "c")


def _train_mem():
    from moxkit.cli.train_mem import command

    return command


@pytest.mark.parametrize(
    "message, params, shown",
    [
        ("device 'cuda': no CUDA device is available (use device='cpu')", ("device",),
         "--device 'cuda': no CUDA device is available (use --device cpu)"),
        ("OUT: already exists (use force=True to replace it)", ("force",),
         "OUT: already exists (use --force to replace it)"),
        ("model org/x: no such local path", ("model",), "MODEL org/x: no such local path"),
        ("retain: needed by MOX (or set kl_weight to 0)", ("retain", "kl_weight"),
         "--retain: needed by MOX (or set --kl-weight to 0)"),
        ("forget forget.jsonl: no such file", ("forget",), "--forget forget.jsonl: no such file"),
        ("forget /data/forget/x.jsonl: no rows", ("forget",),
         "--forget /data/forget/x.jsonl: no rows"),
        ("data_dir data: not a directory", ("data_dir",), "--data data: not a directory"),
        ("extrapolate_on='disk': needs the model as a folder", ("extrapolate_on",),
         "--extrapolate-on disk: needs the model as a folder"),
        ("tensor 'force': bad", (), "tensor 'force': bad"),  # no params: nothing changes
        ("--max-memory 1 GiB: too small", ("--max-memory",), "--max-memory 1 GiB: too small"),
    ],
)  # fmt: skip
def test_for_cli_maps_only_the_named_parameters(message, params, shown):
    assert for_cli(InputError(message, params=params), _train_mem()) == shown


def test_the_running_command_comes_first():
    from moxkit.cli.evaluate import command

    assert flags(command)["model"] == "MODEL" and flags(command)["data_dir"] == "--data"
    assert flags()["max_memory"] == "--max-memory" and flags()["ref"] == "REF"


# ---- every parameter a library message names has a flag; no library message names a flag ----

# parameters of the Python API that no command sets (its caller, not a user, passes them)
API_ONLY = {
    "rows": "train.api / matching take rows in memory; the CLI reads them with --forget",
    "snapshots": "adapters.momentum_forget_adapter's list of adapter folders (train-mem passes it)",
}


def _library_files() -> list[Path]:
    skip = ("cli",)
    return [p for p in sorted(ROOT.rglob("*.py")) if p.relative_to(ROOT).parts[0] not in skip]


def _module(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, tree: ast.AST) -> dict[str, str]:
    """Local name -> the qualified name it stands for, from the module's imports."""
    package = _module(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    names = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            base = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                names[alias.asname or alias.name] = f"{base}.{alias.name}"
    return names


def _callee(node: ast.Call, module: str, imports: dict[str, str]) -> str | None:
    func = node.func
    if isinstance(func, ast.Name):
        return imports.get(func.id, f"{module}.{func.id}")
    if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
        return f"{imports.get(func.value.id, func.value.id)}.{func.attr}"
    return None


def _labelled_helpers(trees: dict) -> dict[str, tuple[int, str]]:
    """Qualified function name -> (position, name) of its argument that becomes a message's
    param: an argument named in a `params=` tuple, passed to naming(), or passed on to
    another such function in that function's place (to a fixed point)."""
    found: dict[str, tuple[int, str]] = {}
    functions = [
        (f"{_module(path)}.{fn.name}", fn, _module(path), _imports(path, tree))
        for path, tree in trees.items() for fn in ast.walk(tree)
        if isinstance(fn, ast.FunctionDef)
    ]  # fmt: skip
    while True:
        before = dict(found)
        for qualified, fn, module, imports in functions:
            args = [a.arg for a in fn.args.args]
            offset = 1 if args[:1] in (["self"], ["cls"]) else 0
            for node in ast.walk(fn):
                if not isinstance(node, ast.Call):
                    continue
                values = [k.value for k in node.keywords if k.arg == "params"]
                callee = _callee(node, module, imports)
                if callee == "moxkit.errors.naming" and len(node.args) == 2:
                    values.append(node.args[1])
                label = found.get(callee or "")
                if label is not None:
                    if label[0] < len(node.args):
                        values.append(node.args[label[0]])
                    values += [k.value for k in node.keywords if k.arg == label[1]]
                for value in values:
                    for elt in getattr(value, "elts", [value]):
                        if isinstance(elt, ast.Name) and elt.id in args and qualified not in found:
                            found[qualified] = (args.index(elt.id) - offset, elt.id)
        if found == before:
            return found


def _params_named() -> dict[str, str]:
    """Every literal parameter name the library puts in an error's params: in `params=`,
    and passed to a helper whose argument ends up there. name -> where."""
    trees = {p: ast.parse(p.read_text(), str(p)) for p in _library_files()}
    helpers = _labelled_helpers(trees)
    named = {}
    for path, tree in trees.items():
        module, imports = _module(path), _imports(path, tree)
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            literals = []
            for k in node.keywords:
                if k.arg == "params":
                    literals += getattr(k.value, "elts", [])
            helper = helpers.get(_callee(node, module, imports) or "")
            if helper is not None:
                position, arg = helper
                if position < len(node.args):
                    literals.append(node.args[position])
                literals += [k.value for k in node.keywords if k.arg == arg]
            for lit in literals:
                if isinstance(lit, ast.Constant) and isinstance(lit.value, str):
                    named[lit.value] = f"{path.relative_to(ROOT.parent)}:{node.lineno}"
    return named


def test_the_scan_finds_parameters():
    named = _params_named()  # a scan that finds nothing would pass anything
    for name in ("max_memory", "force", "allow_nonfinite", "forget", "data_dir", "alphas"):
        assert name in named, name


def test_every_parameter_named_in_a_message_has_a_flag():
    known = flags()
    missing = {
        name: where for name, where in _params_named().items()
        if name not in known and name not in API_ONLY
    }  # fmt: skip
    assert not missing, f"parameters named in messages with no CLI flag: {missing}"
    stale = [name for name in API_ONLY if name in known]
    assert not stale, f"API_ONLY entries that now have a flag: {stale}"


# strings in library code that may hold a `--flag`, each with why
FLAG_ALLOWED = {
    ("moxkit/apps/real_model.py", "pip install --no-deps"): "a pip command the user runs",
}
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _strings(tree: ast.AST):
    """String constants outside docstrings and outside settings' help texts (setting(...),
    which the CLI's --help shows), with their lines."""
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant):
                skip.add(id(body[0].value))
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "setting":
            skip |= {id(n) for n in ast.walk(node)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip:
            yield node.lineno, node.value


def test_no_library_message_names_a_flag():
    found = []
    for path in _library_files():
        rel = str(path.relative_to(ROOT.parent))
        for line, text in _strings(ast.parse(path.read_text())):
            for flag in _FLAG.findall(text):
                if not any(rel == f and allowed in text for f, allowed in FLAG_ALLOWED):
                    found.append(f"{rel}:{line}: {flag} in {text[:60]!r}")
    assert not found, "\n".join(found)
