"""Every input a user can get wrong ends in one clear line naming the file or tensor, a
non-zero exit, no traceback, and nothing left where the output would be."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import astuple

import pytest
import torch
from ckpt_factory import random_tensor, save_sharded, write_raw_safetensors
from safetensors.torch import load_file, save_file

import moxkit


def run_ok(cli, *args) -> str:
    result = cli("extrapolate", *args)
    assert result.code == 0, result.err
    return result.out


@pytest.fixture
def pair(tmp_path):
    t = {
        "model.w": random_tensor((8, 4), torch.bfloat16, 0),
        "model.b": random_tensor((4,), torch.bfloat16, 1),
    }
    save_file(t, tmp_path / "ref.safetensors")
    save_file({k: v + 1 for k, v in t.items()}, tmp_path / "mem.safetensors")
    return tmp_path / "ref.safetensors", tmp_path / "mem.safetensors"


def assert_clean_failure(cli, tmp_path, args, pattern: str, code: int = 1):
    before = sorted(p.name for p in tmp_path.iterdir())
    rc, _, err = astuple(cli("extrapolate", *args))
    assert rc == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert pattern in lines[0], lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no OUT, no temporary


def corrupt(tmp_path, header, data=b"", name="bad.safetensors"):
    path = tmp_path / name
    write_raw_safetensors(path, header, data)
    return path


W = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


@pytest.mark.parametrize(
    "header, data, message",
    [
        (
            {"model.w": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 8,
            "unknown dtype",
        ),
        (
            {"model.w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
            b"\0" * 8,
            "expected 12",
        ),
        (
            {"model.w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
            b"\0" * 4,
            "truncated",
        ),
        ({"model.w": {"dtype": "F32", "shape": "2", "data_offsets": [0, 8]}}, b"\0" * 8, "shape"),
        (
            {"model.w": {"dtype": "F32", "shape": [2], "data_offsets": [8, 0]}},
            b"\0" * 8,
            "data_offsets",
        ),
        (
            {"model.w": W, "model.b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}},
            b"\0" * 8,
            "overlaps",
        ),
        ({"__metadata__": {"a": 1}, "model.w": W}, b"\0" * 8, "__metadata__"),
    ],
    ids=["dtype", "size", "truncated", "shape", "offsets", "overlap", "metadata"],
)
def test_corrupt_headers(cli, tmp_path, pair, header, data, message):
    bad = corrupt(tmp_path, header, data)
    assert_clean_failure(
        cli, tmp_path, [pair[0], bad, "--alpha", 4, "-o", tmp_path / "out"], message
    )


def test_not_safetensors_and_header_length(cli, tmp_path, pair):
    (tmp_path / "junk.safetensors").write_bytes(b"hello world, this is not a model")
    assert_clean_failure(
        cli,
        tmp_path,
        [tmp_path / "junk.safetensors", pair[1], "-a", 4, "-o", tmp_path / "o"],
        "does not fit",
    )
    (tmp_path / "tiny.safetensors").write_bytes(b"abc")
    assert_clean_failure(
        cli,
        tmp_path,
        [pair[0], tmp_path / "tiny.safetensors", "-a", 4, "-o", tmp_path / "o"],
        "too small",
    )
    raw = b"{not json}     "
    (tmp_path / "nj.safetensors").write_bytes(len(raw).to_bytes(8, "little") + raw)
    assert_clean_failure(
        cli,
        tmp_path,
        [tmp_path / "nj.safetensors", pair[1], "-a", 4, "-o", tmp_path / "o"],
        "not valid JSON",
    )


def test_missing_paths_and_empty_directory(cli, tmp_path, pair):
    assert_clean_failure(
        cli,
        tmp_path,
        [tmp_path / "nope", pair[1], "-a", 4, "-o", tmp_path / "o"],
        "no such file",
    )
    (tmp_path / "empty").mkdir()
    assert_clean_failure(
        cli,
        tmp_path,
        [tmp_path / "empty", pair[1], "-a", 4, "-o", tmp_path / "o"],
        "no model.safetensors",
    )


def test_bad_index_files(cli, tmp_path, pair):
    t = {f"model.l{i}": random_tensor((4,), torch.float32, i) for i in range(4)}
    save_sharded(t, tmp_path / "sharded", per_shard=2)
    index_path = tmp_path / "sharded" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    args = [tmp_path / "sharded", tmp_path / "sharded", "-a", 4, "-o", tmp_path / "o"]

    index_path.write_text("{oops")
    assert_clean_failure(cli, tmp_path, args, "index is not valid JSON")
    index_path.write_text(json.dumps({"metadata": {}}))
    assert_clean_failure(cli, tmp_path, args, "no 'weight_map'")
    index_path.write_text(
        json.dumps(
            {"weight_map": dict(index["weight_map"], extra="model-00009-of-00009.safetensors")}
        )
    )
    assert_clean_failure(cli, tmp_path, args, "shard model-00009-of-00009.safetensors is missing")
    index_path.write_text(
        json.dumps(
            {"weight_map": dict(index["weight_map"], ghost="model-00001-of-00002.safetensors")}
        )
    )
    assert_clean_failure(cli, tmp_path, args, "tensor 'ghost' named by the index is not in it")
    index_path.write_text(json.dumps({"weight_map": {"model.l0": "../../etc/passwd"}}))
    assert_clean_failure(cli, tmp_path, args, "outside the model directory")


def test_mismatched_checkpoints(cli, tmp_path, pair):
    ref = pair[0]
    save_file({"model.w": random_tensor((8, 4), torch.bfloat16, 0)}, tmp_path / "fewer.safetensors")
    assert_clean_failure(
        cli,
        tmp_path,
        [ref, tmp_path / "fewer.safetensors", "-a", 4, "-o", tmp_path / "o"],
        "lacks tensor 'model.b'",
    )
    save_file(
        {
            "model.w": random_tensor((8, 4), torch.bfloat16, 0),
            "model.b": random_tensor((4,), torch.bfloat16, 1),
            "lm_head.weight": random_tensor((4,), torch.bfloat16, 1),
        },
        tmp_path / "more.safetensors",
    )
    assert_clean_failure(
        cli,
        tmp_path,
        [ref, tmp_path / "more.safetensors", "-a", 4, "-o", tmp_path / "o"],
        "tied embeddings",
    )
    save_file(
        {
            "model.w": random_tensor((4, 8), torch.bfloat16, 0),
            "model.b": random_tensor((4,), torch.bfloat16, 1),
        },
        tmp_path / "shape.safetensors",
    )
    assert_clean_failure(
        cli,
        tmp_path,
        [ref, tmp_path / "shape.safetensors", "-a", 4, "-o", tmp_path / "o"],
        "'model.w' has shape [4, 8] in MEM but [8, 4] in REF",
    )
    save_file(
        {
            "model.w": torch.zeros((8, 4), dtype=torch.int32),
            "model.b": random_tensor((4,), torch.bfloat16, 1),
        },
        tmp_path / "int.safetensors",
    )
    assert_clean_failure(
        cli,
        tmp_path,
        [ref, tmp_path / "int.safetensors", "-a", 4, "-o", tmp_path / "o"],
        "'model.w' in MEM is I32",
    )
    save_file(
        {
            "model.w": random_tensor((8, 4), torch.float64, 0),
            "model.b": random_tensor((4,), torch.bfloat16, 1),
        },
        tmp_path / "f64.safetensors",
    )
    assert_clean_failure(
        cli,
        tmp_path,
        [ref, tmp_path / "f64.safetensors", "-a", 4, "-o", tmp_path / "o"],
        "is F64",
    )
    assert_clean_failure(
        cli,
        tmp_path,
        [ref, pair[1], "-a", 4, "--prev", tmp_path / "fewer.safetensors", "-o", tmp_path / "o"],
        "PREV lacks tensor",
    )


@pytest.mark.parametrize(
    "extra, message",
    [
        (["-a", "0"], "--alpha 0.0: must be between"),
        (["-a", "1e30"], "--alpha 1e+30: must be between"),
        (["-a", "1e-50"], "--alpha 1e-50: must be between"),
        (["-a", "nan"], "--alpha nan"),
        (["-a", "4", "--dtype", "int8"], "--dtype 'int8'"),
        (["-a", "4", "--max-memory", "lots"], "--max-memory 'lots'"),
        (["-a", "4", "--max-memory", "10MB"], "memory budget --max-memory is 10.00 MB"),
        (["-a", "4", "--max-shard-size", "-5GB"], "--max-shard-size"),
        (["-a", "4", "--eta", "0.3"], "--eta only applies with --prev"),
        (["-a", "4", "--device", "tpu"], "--device 'tpu': expected cpu, cuda or auto"),
        (["-a", "4", "--device", "cuda"], "no CUDA device"),
    ],
)
def test_bad_options(cli, tmp_path, pair, extra, message):
    if "cuda" in extra and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert_clean_failure(cli, tmp_path, [*pair, *extra, "-o", tmp_path / "out"], message)


def test_eta_range_with_momentum(cli, tmp_path, pair):
    args = [*pair, "-a", 4, "--prev", pair[0], "--eta", "1.5", "-o", tmp_path / "out"]
    assert_clean_failure(cli, tmp_path, args, "--eta 1.5: must be in (0, 1]")


def test_missing_required_option_is_a_usage_error(cli, tmp_path, pair):
    rc, _, err = astuple(cli("extrapolate", *pair, "-o", tmp_path / "out"))
    assert rc == 2 and "Missing option '--alpha'" in err and "Traceback" not in err


def test_existing_output_and_force(cli, tmp_path, pair):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("precious")
    assert_clean_failure(
        cli, tmp_path, [*pair, "-a", 4, "-o", tmp_path / "out"], "already exists (use --force"
    )
    assert (tmp_path / "out" / "keep.txt").read_text() == "precious"
    run_ok(cli, *pair, "-a", 4, "-o", tmp_path / "out", "--force", "--quiet")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md",
        "model.safetensors",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_may_not_be_an_input(cli, tmp_path):
    t = {"w": random_tensor((4,), torch.float32, 0)}
    save_sharded(t, tmp_path / "ref", per_shard=1)
    save_file(t, tmp_path / "mem.safetensors")
    for out in (tmp_path / "ref", tmp_path / "mem.safetensors", tmp_path):
        assert_clean_failure(
            cli,
            tmp_path,
            [tmp_path / "ref", tmp_path / "mem.safetensors", "-a", 4, "-o", out, "--force"],
            "the output would",
        )
    assert (tmp_path / "ref" / "model.safetensors").is_file()


def test_nonfinite_via_cli(cli, tmp_path):
    save_file({"w": torch.tensor([1.0, float("nan")])}, tmp_path / "ref.safetensors")
    save_file({"w": torch.tensor([1.0, 2.0])}, tmp_path / "mem.safetensors")
    args = [
        tmp_path / "ref.safetensors",
        tmp_path / "mem.safetensors",
        "-a",
        4,
        "-o",
        tmp_path / "out",
    ]
    assert_clean_failure(cli, tmp_path, args, "tensor 'w': the result has non-finite values")
    out = run_ok(cli, *args, "--allow-nonfinite")
    assert "wrote" in out and (tmp_path / "out" / "model.safetensors").is_file()


def test_dry_run_and_summary_lines(cli, tmp_path, pair):
    out = run_ok(cli, *pair, "-a", 4, "-o", tmp_path / "out", "--dry-run")
    assert "OUT = (1+4)·REF − 4·MEM" in out and "nothing written" in out
    assert not (tmp_path / "out").exists()
    out = run_ok(cli, *pair, "-a", 4, "-o", tmp_path / "out")
    assert out.startswith(f"wrote {tmp_path / 'out'} (2 tensors extrapolated, 0 copied, 1 shard)")
    shutil.rmtree(tmp_path / "out")
    assert run_ok(cli, *pair, "-a", 4, "-o", tmp_path / "out", "-q") == ""


def test_a_trailing_slash_on_out_is_the_same_folder(cli, tmp_path, pair):
    out = run_ok(cli, *pair, "-a", 4, "-o", f"{tmp_path / 'out'}/")
    assert out.startswith(f"wrote {tmp_path / 'out'} ")
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[-1] == "model.safetensors"


@pytest.mark.parametrize(
    "make_out, message",
    [
        (lambda t: ".", "not a name for a new output"),
        (lambda t: (t / "file").write_text("x") and t / "file" / "out", "is not a folder"),
        (lambda t: t / ("n" * 240), "name too long"),
        (lambda t: (t / "link").symlink_to(t / "gone") or t / "link", "which does not exist"),
    ],
    ids=["dot", "under-a-file", "too-long", "dangling-link"],
)
def test_unusable_outputs_in_one_line(cli, tmp_path, pair, monkeypatch, make_out, message):
    monkeypatch.chdir(tmp_path)
    out = make_out(tmp_path)
    assert_clean_failure(cli, tmp_path, [*pair, "-a", 4, "-o", out, "--force"], message)


def test_force_through_a_link_to_a_folder_replaces_the_target(cli, tmp_path, pair):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "old.txt").write_text("old")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    run_ok(cli, *pair, "-a", 4, "-o", tmp_path / "link", "--force", "-q")
    assert (tmp_path / "link").is_symlink()
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == [
        "README.md",
        "model.safetensors",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_output_mode_follows_the_umask_and_failed_runs_remove_their_parents(
    cli, tmp_path, pair, monkeypatch
):
    monkeypatch.setattr(os, "umask", os.umask)  # restored below whatever happens
    old = os.umask(0o022)
    try:
        run_ok(cli, *pair, "-a", 4, "-o", tmp_path / "new" / "out", "-q")
    finally:
        os.umask(old)
    assert os.stat(tmp_path / "new" / "out").st_mode & 0o777 == 0o755
    save_file({"model.w": torch.full((8, 4), float("nan")), "model.b": torch.zeros(4)},
              tmp_path / "nan.safetensors")  # fmt: skip
    args = [tmp_path / "nan.safetensors", pair[1], "-a", 4, "-o", tmp_path / "a" / "b" / "out"]
    assert_clean_failure(cli, tmp_path, args, "non-finite")  # a/ and a/b/ are gone too


def test_a_newline_in_a_name_cannot_forge_a_second_line(cli, tmp_path, pair):
    ref = tmp_path / "ref\nmoxkit: error: forged"
    ref.mkdir()  # an empty model folder: the message names it
    before = sorted(p.name for p in tmp_path.iterdir())
    result = cli("extrapolate", ref, pair[1], "-a", 4, "-o", tmp_path / "out")
    assert result.code == 1 and len(result.err.strip().splitlines()) == 1, result.err
    assert "ref\\nmoxkit" in result.err and sorted(p.name for p in tmp_path.iterdir()) == before


def test_momentum_is_the_deprecated_name_of_prev(cli, tmp_path, pair):
    result = cli("extrapolate", *pair, "-a", 4, "--momentum", pair[0], "-o", tmp_path / "o", "-q")
    assert result.code == 0 and result.err.strip() == (
        "moxkit: note: --momentum is deprecated; use --prev"
    )
    with pytest.warns(DeprecationWarning, match="prev="):
        moxkit.extrapolate(*pair, 4.0, tmp_path / "o2", momentum=pair[0], progress=False)
    a = load_file(tmp_path / "o" / "model.safetensors")
    b = load_file(tmp_path / "o2" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_old_argument_order_still_works_and_warns(tmp_path, pair):
    """extrapolate(ref, mem, alpha, out) is the order of every extrapolate function; the old
    (ref, mem, out, alpha), told apart by the types, gives the same bytes with a warning."""
    moxkit.extrapolate(*pair, 4.0, tmp_path / "new", progress=False)
    with pytest.warns(DeprecationWarning, match=r"extrapolate\(ref, mem, alpha, out\)"):
        moxkit.extrapolate(*pair, tmp_path / "old", 4.0, progress=False)
    new = (tmp_path / "new" / "model.safetensors").read_bytes()
    assert (tmp_path / "old" / "model.safetensors").read_bytes() == new
    with pytest.raises(TypeError, match="unexpected keyword argument 'max_mem'"):
        moxkit.extrapolate(*pair, 4.0, tmp_path / "x", max_mem="1GB")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"alpha": 0.0}, "alpha 0.0: must be between"),
        ({"alpha": 4.0, "max_memory": "lots"}, "max_memory 'lots'"),
        ({"alpha": 4.0, "max_shard_size": "-1GB"}, "max_shard_size"),
        ({"alpha": 4.0, "prev": "p", "momentum": "m"}, "prev and momentum name the same"),
    ],
)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_python_api_names_its_own_arguments(tmp_path, pair, kwargs, message):
    with pytest.raises(moxkit.MoxError) as exc:
        moxkit.extrapolate(*pair, out=tmp_path / "out", progress=False, **kwargs)
    assert str(exc.value).startswith(message) and "--" not in str(exc.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mem.safetensors", "ref.safetensors"]


def test_python_api_accepts_torch_dtypes(tmp_path, pair):
    moxkit.extrapolate(*pair, 4.0, tmp_path / "out", dtype=torch.float16, progress=False)
    got = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in got.values()} == {torch.float16}


def test_fsync_writes_the_same_output(cli, tmp_path, pair):
    run_ok(cli, *pair, "-a", 4, "-o", tmp_path / "a", "-q")
    run_ok(cli, *pair, "-a", 4, "-o", tmp_path / "b", "-q", "--fsync")
    a, b = (tmp_path / d / "model.safetensors" for d in "ab")
    assert a.read_bytes() == b.read_bytes()


def test_python_api_names_its_own_dtype_argument(tmp_path, pair):
    """The API speaks of `dtype`, the CLI of `--dtype`: neither names the other's spelling."""
    import moxkit

    with pytest.raises(moxkit.MoxError, match=r"^dtype 'int8': expected one of"):
        moxkit.extrapolate(pair[0], pair[1], 4.0, tmp_path / "out", dtype="int8")
    assert not (tmp_path / "out").exists()


def test_config_over_the_memory_budget_is_refused_before_any_work(tmp_path, pair, monkeypatch):
    """carried_files checks config.json within the budget in prepare, not after the weights."""
    from moxkit import sources
    from moxkit.engine import stream

    ref = tmp_path / "refdir"
    ref.mkdir()
    shutil.copy(pair[0], ref / "model.safetensors")
    (ref / "config.json").write_text(json.dumps({"torch_dtype": "bfloat16"}))
    monkeypatch.setattr(sources, "JSON_PARSE_FACTOR", 2**40)  # config "needs" terabytes
    with pytest.raises(moxkit.MoxError, match="config.json: reading the config"):
        stream.prepare(ref, pair[1], 4.0, tmp_path / "out", dtype="fp16", max_memory="4GB")
    assert not (tmp_path / "out").exists()
