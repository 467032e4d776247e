"""LoRA adapters as an attacker writes them (issue 20, item 5): rank/alpha pattern keys, numbers
past float range, non-finite or overflowing factors, memory budgets. Every bad input ends in one
line, a non-zero exit, no traceback and nothing at OUT, on every path (plain forget adapter,
--prev, --prev --rank, --merge, and their --dry-run); a random config either opens with PEFT's
scalings or is refused with MoxError, never another exception.

Adapters here are written by hand (one module `w`, BASE one tensor): no PEFT, no torch needed
to build them, so each case is a few KB."""

from __future__ import annotations

import json
import math
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import CliResult
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.numpy import load_file, save_file

import moxkit.adapters as adapters
from moxkit.adapters import open_adapter
from moxkit.errors import MoxError

OUT_DIM, IN_DIM, RANK = 12, 10, 4
MODULE = "model.layers.0.self_attn.q_proj"
PATHS = {  # how each extrapolate path is asked for on the command line
    "plain": [],
    "prev": ["--prev", "BASE"],
    "rank": ["--prev", "BASE", "--rank", "2"],
    "merge": ["--merge"],
    "prev-merge": ["--prev", "BASE", "--merge"],
}


def write_base(
    folder: Path, out_dim: int = OUT_DIM, in_dim: int = IN_DIM, module: str = MODULE
) -> Path:
    folder.mkdir()
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((out_dim, in_dim)).astype(np.float32)
    save_file({f"{module}.weight": weight}, str(folder / "model.safetensors"))
    return folder


def write_adapter(
    folder: Path, config: dict | None = None, b=None, a=None, module: str = MODULE, **changes
) -> Path:
    """A one-module PEFT LoRA adapter as save_pretrained writes it."""
    folder.mkdir()
    rng = np.random.default_rng(1)
    if a is None:
        a = rng.standard_normal((RANK, IN_DIM)).astype(np.float32)
    if b is None:
        b = rng.standard_normal((OUT_DIM, RANK)).astype(np.float32)
    key = f"base_model.model.{module}"
    save_file(
        {f"{key}.lora_A.weight": a, f"{key}.lora_B.weight": b},
        str(folder / "adapter_model.safetensors"),
    )
    config = dict(
        config or {"peft_type": "LORA", "r": RANK, "lora_alpha": 8, "target_modules": ["q_proj"]}
    )
    config.update(changes)
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def raw_config(folder: Path, text: str) -> None:
    (folder / "adapter_config.json").write_text(text)


def run_path(cli, path: str, base: Path, mem: Path, out: Path, *extra) -> object:
    args = [str(base) if a == "BASE" else a for a in PATHS[path]]
    return cli("extrapolate", base, mem, "--alpha", "4", "-o", out, *args, *extra)


def assert_refused(result, out: Path, *needles: str) -> None:
    assert result.code == 1, (result.code, result.out, result.err)
    assert result.err.startswith("moxkit: error: ") and result.err.count("\n") == 1, result.err
    assert "Traceback" not in result.err
    for needle in needles:
        assert needle in result.err, result.err
    assert not out.exists() and not os.path.lexists(out)
    assert not [p for p in os.listdir(out.parent) if "moxkit-tmp" in p]


@pytest.fixture
def base(tmp_path) -> Path:
    return write_base(tmp_path / "base")


# ----------------------------------------------------------------- pattern keys


@pytest.mark.parametrize(
    "key",
    [
        r"(\w+\.?)*!",  # nested quantifiers: catastrophic backtracking
        "(a|a)*b",
        "q_proj{99999999999}",  # a repeat count past the engine's limit
        "q_pro[",  # not a regular expression
        "layers.*.q_proj",  # a quantifier: outside the subset moxkit evaluates
        "(?=q)q_proj",
    ],
)
def test_pattern_keys_outside_the_safe_subset_are_one_line(tmp_path, base, cli, key):
    for pattern in ("rank_pattern", "alpha_pattern"):
        mem = write_adapter(tmp_path / f"mem-{pattern}", **{pattern: {key: 4}})
        out = tmp_path / f"out-{pattern}"
        assert_refused(run_path(cli, "plain", base, mem, out), out, pattern, "pattern key")


def test_backtracking_pattern_key_does_not_hang(tmp_path, cli):
    """A key that takes the regex engine exponential time on the module's path (2^40 steps
    here): refused at once (the old code tried `re.match` with it and never returned)."""
    module = "a" * 40
    base = write_base(tmp_path / "base", module=module)
    mem = write_adapter(tmp_path / "mem", module=module, rank_pattern={"(a+)+b": 4})
    out = tmp_path / "out"
    proc = cli.popen("extrapolate", base, mem, "--alpha", "4", "-o", out)
    try:
        stdout, stderr = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("a backtracking pattern key hangs the run")
    assert_refused(CliResult(proc.returncode, stdout, stderr), out, "rank_pattern")


def test_too_many_pattern_keys_are_refused_before_matching(tmp_path, base, cli):
    keys = {f"model.layers.{i}.self_attn.k_proj": 4 for i in range(20_000)}
    mem = write_adapter(tmp_path / "mem", alpha_pattern=keys)
    out = tmp_path / "out"
    assert_refused(run_path(cli, "plain", base, mem, out), out, "alpha_pattern", "4,096")


def test_many_keys_within_the_limit_match_as_peft_does(tmp_path):
    """4,096 keys (the limit) against the module: the first matching key in order wins."""
    keys = {f"model.layers.{i}.self_attn.q_proj": 8 for i in range(1, 4095)}
    keys["q_proj"] = RANK
    keys["layers.0.self_attn.q_proj"] = 99  # matches too, but after q_proj
    mem = write_adapter(tmp_path / "mem", rank_pattern=keys)
    found = open_adapter(mem)
    assert found.modules[MODULE].rank == RANK


def _peft_key(keys: list[str], module: str) -> str | None:
    """PEFT's rule (peft.utils.other.get_pattern_key), run with Python's re on safe keys."""
    for key in keys:
        if re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


safe_chars = st.sampled_from(list("abq_0123.") + ["\\.", "proj", "layers", "self_attn"])
safe_keys = st.builds(
    lambda anchor, parts, end: ("^" if anchor else "") + "".join(parts) + ("$" if end else ""),
    st.booleans(),
    st.lists(safe_chars, min_size=1, max_size=8),
    st.booleans(),
)
modules = st.sampled_from(
    [MODULE, "q_proj", "a.q_proj", "model.layers.10.self_attn.q_proj", "x.aq_proj", "b.0.a"]
) | st.lists(st.sampled_from(list("abq_0.") + ["proj", "layers."]), min_size=1, max_size=8).map(
    "".join
)


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(keys=st.lists(safe_keys, min_size=1, max_size=5), module=modules)
def test_safe_pattern_keys_match_exactly_as_peft(keys, module):
    """Within the subset moxkit evaluates, its matcher picks the key PEFT's regex picks."""
    matcher = adapters.PatternMatcher("rank_pattern", {k: 1 for k in keys})
    assert matcher.first_match(module) == _peft_key(list(dict.fromkeys(keys)), module)


# ----------------------------------------------------------------- numbers in the config


@pytest.mark.parametrize(
    "text, needle",
    [
        ('"r": 4, "lora_alpha": 1' + "0" * 400, "lora_alpha"),
        (
            '"r": 4, "lora_alpha": 8, "alpha_pattern": {"q_proj": 1' + "0" * 400 + "}",
            "alpha_pattern",
        ),
        ('"r": 4, "lora_alpha": 8, "rank_pattern": {"q_proj": 1' + "0" * 400 + "}", "rank_pattern"),
        ('"r": 1' + "0" * 400 + ', "lora_alpha": 8', "r "),
        ('"r": 4, "lora_alpha": 1e308', "lora_alpha"),  # -α·lora_alpha overflows to -inf
        ('"r": 4, "lora_alpha": 8, "alpha_pattern": {"q_proj": -1e308}', "alpha_pattern"),
        ('"r": 4, "lora_alpha": NaN', "lora_alpha"),
        ('"r": 4, "lora_alpha": 8, "lora_dropout": Infinity', "lora_dropout"),
    ],
)
def test_numbers_past_float_range_are_one_line(tmp_path, base, cli, text, needle):
    for path in ("plain", "prev", "merge"):
        mem = write_adapter(tmp_path / f"mem-{path}")
        raw_config(mem, '{"peft_type": "LORA", "target_modules": ["q_proj"], ' + text + "}")
        out = tmp_path / f"out-{path}"
        result = run_path(cli, path, base, mem, out)
        assert_refused(result, out)
        # the forget adapter's config folds lora_alpha·(−α); --prev weighs s·B in float32
        assert needle in result.err or (path == "prev" and "lora_alpha/r" in result.err)


def test_forget_adapter_config_is_strict_json(tmp_path, base, cli):
    """The largest lora_alpha that folds finitely still writes plain JSON numbers."""
    mem = write_adapter(tmp_path / "mem", lora_alpha=1e307, alpha_pattern={"q_proj": -2e307})
    out = tmp_path / "out"
    result = run_path(cli, "plain", base, mem, out, "--allow-nonfinite")
    assert result.code == 0, result.err
    config = json.loads(
        (out / "adapter_config.json").read_text(), parse_constant=lambda c: pytest.fail(c)
    )
    assert config["lora_alpha"] == -4e307 and config["alpha_pattern"] == {"q_proj": 8e307}


# ----------------------------------------------------------------- non-finite factors


def _bad_factor(kind: str) -> np.ndarray:
    b = np.random.default_rng(2).standard_normal((OUT_DIM, RANK)).astype(np.float32)
    if kind == "nan":
        b[3, 1] = np.nan
    elif kind == "inf":
        b[0, 0] = -np.inf
    else:  # finite factors whose product s·B·A overflows float32
        b[:] = 3e38
    return b


@pytest.mark.parametrize("kind", ["nan", "inf", "overflow"])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_nonfinite_factors_are_refused_on_every_path(tmp_path, base, cli, kind, path):
    mem = write_adapter(tmp_path / "mem", b=_bad_factor(kind))
    out = tmp_path / "out"
    for extra in (["--dry-run"], []):
        result = run_path(cli, path, base, mem, out, *extra)
        assert_refused(result, out, "non-finite", "--allow-nonfinite")


@pytest.mark.parametrize("path", ["plain", "prev", "merge"])
def test_allow_nonfinite_keeps_them(tmp_path, base, cli, path):
    mem = write_adapter(tmp_path / "mem", b=_bad_factor("nan"))
    out = tmp_path / "out"
    result = run_path(cli, path, base, mem, out, "--allow-nonfinite")
    assert result.code == 0, result.err
    name = "adapter_model.safetensors" if path != "merge" else "model.safetensors"
    assert any(np.isnan(t).any() for t in load_file(str(out / name)).values())


def test_rank_refuses_nonfinite_even_when_allowed(tmp_path, base, cli):
    """A truncated SVD of NaN factors has no meaning: refused, not a LinAlgError."""
    mem = write_adapter(tmp_path / "mem", b=_bad_factor("inf"))
    out = tmp_path / "out"
    result = run_path(cli, "rank", base, mem, out, "--allow-nonfinite")
    assert_refused(result, out, "--rank")


def test_merge_write_failure_is_one_line_and_leaves_nothing(tmp_path, cli):
    """A merge whose output write is refused half-way (RLIMIT_FSIZE: EFBIG, as ENOSPC on a
    full disk) ends in the engine's one line naming OUT, with no OUT and no temporary."""
    base = write_base(tmp_path / "base", OUT_DIM, 1 << 14)  # 768 KiB of fp32
    mem = write_adapter(tmp_path / "mem", a=np.ones((RANK, 1 << 14), np.float32))
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 19, 1 << 19))

    args = ["extrapolate", base, mem, "--alpha", "4", "--merge", "-o", out, "--device", "cpu"]
    result = cli.run(*args, "--quiet", preexec_fn=limit)
    assert result.code == 1, result.err
    assert result.err.startswith(f"moxkit: error: {out}: cannot write output: File too large")
    assert len(result.err.strip().splitlines()) == 1, result.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# ----------------------------------------------------------------- memory budgets


@pytest.mark.parametrize("path", ["plain", "prev", "rank", "merge", "prev-merge"])
def test_budget_too_small_is_refused_before_work_and_in_dry_run(
    tmp_path, base, cli, path, monkeypatch
):
    mem = write_adapter(tmp_path / "mem")
    out = tmp_path / "out"
    reads = []
    real = adapters.read._read_array
    for module in (adapters.forget, adapters.lowrank):  # where factors are read
        monkeypatch.setattr(module, "_read_array", lambda *a: reads.append(1) or real(*a))
    for extra in (["--dry-run"], []):
        result = run_path(cli, path, base, mem, out, "--max-memory", "2MiB", *extra)
        assert_refused(result, out, "--max-memory", "2.10 MB")
    assert reads == []  # refused before any factor was read


def _big_pair(tmp_path: Path, rank: int) -> tuple[Path, Path]:
    """An adapter of 2 x 24 MiB fp32 factors on a 3072 x 2048 BASE weight."""
    out_dim, in_dim = 3072, 2048
    base = write_base(tmp_path / "base", out_dim, in_dim)
    rng = np.random.default_rng(3)
    a = rng.standard_normal((rank, in_dim), dtype=np.float32)
    b = rng.standard_normal((out_dim, rank), dtype=np.float32)
    mem = write_adapter(tmp_path / "mem", b=b, a=a, r=rank)
    return base, mem


PEAK_SCRIPT = """
import sys
from moxkit.cli.main import main
try:
    main(sys.argv[1:])
finally:  # VmHWM: this process's own peak (ru_maxrss starts from the parent's after fork)
    status = open("/proc/self/status").read().split("VmHWM:")[1].split()[0]
    print(f"PEAK {int(status) * 1024}", file=sys.stderr)
"""


@pytest.mark.parametrize("path", ["rank", "merge"])
def test_accepted_budget_holds_at_peak(tmp_path, path):
    """Run in a fresh process under --max-memory: either refused before work in one line, or
    run with a peak RSS under the budget (the old --prev --rank took 3 GiB under 300 MiB)."""
    base, mem = _big_pair(tmp_path, rank=2048 if path == "rank" else 1024)
    budget = 400 << 20
    args = [str(base) if a == "BASE" else a for a in PATHS[path]]
    out = tmp_path / "out"
    argv = ["extrapolate", str(base), str(mem), "--alpha", "4", "-o", str(out), "-q", *args]
    proc = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT, *argv, "--max-memory", f"{budget}"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    peak = int(lines[-1].split()[1])
    if proc.returncode == 0:
        assert peak <= budget, f"peak {peak / 2**20:.0f} MiB over the budget"
        assert out.is_dir()
    else:
        assert len(lines) == 2 and "--max-memory" in lines[0], proc.stderr
        assert not out.exists()


# ----------------------------------------------------------------- fuzzed configs

numbers = (
    st.integers(-5, 2**70)
    | st.integers(10**300, 10**400)
    | st.floats()
    | st.sampled_from([1e308, -1e308, 3e38, 1e-320])
)
pattern_keys = st.sampled_from(
    ["q_proj", "self_attn.q_proj", MODULE, "^q_proj", "k_proj"]
) | st.text(st.sampled_from(list("q_proj.()*+?[]{}|^$\\0")), min_size=1, max_size=10)
config_values = {
    "r": st.sampled_from([RANK, RANK, 0, -1, 2**70, 10**400, 4.0, True, "4"]),
    "lora_alpha": numbers | st.none() | st.text(max_size=3),
    "rank_pattern": st.dictionaries(
        pattern_keys, st.sampled_from([RANK, 2, 10**400]) | numbers, max_size=3
    ),
    "alpha_pattern": st.dictionaries(pattern_keys, numbers, max_size=3),
    "use_rslora": st.booleans(),
    "fan_in_fan_out": st.booleans(),
    "lora_dropout": numbers,
    "target_modules": st.lists(st.text(max_size=4), max_size=3),
    "init_lora_weights": st.sampled_from([True, False, "gaussian", "pissa", 3]),
    "use_dora": st.booleans(),
}


@settings(
    max_examples=200, deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)  # fmt: skip
@given(changes=st.fixed_dictionaries({}, optional=config_values))
def test_fuzzed_configs_open_or_raise_moxerror(tmp_path_factory, changes):
    """A config either opens (finite scaling, a forget config that is strict JSON) or is
    refused with a one-line MoxError: never an OverflowError, re.error or a hang."""
    folder = tmp_path_factory.mktemp("fuzz") / "mem"
    mem = write_adapter(folder)
    config = {"peft_type": "LORA", "r": RANK, "lora_alpha": 8, **changes}
    raw_config(mem, json.dumps(config))
    try:
        found = open_adapter(mem)
        (module,) = found.modules.values()
        assert math.isfinite(module.scaling)
        folded = adapters.read._folded_config(found.config, 4.0)
    except MoxError as exc:
        assert "\n" not in str(exc)
        return
    json.dumps(folded, allow_nan=False)
