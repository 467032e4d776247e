"""Where models come from (paths, Hugging Face cache snapshots, hub ids) and the trust rules
applied to everything found in a model folder: plain names, links kept inside the model's
tree, regular files only, bounded JSON. The hub cache is built by hand and everything runs
offline."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from ckpt_factory import random_tensor, save_sharded
from safetensors.torch import load_file

from moxkit.engine.checkpoint import open_checkpoint
from moxkit.engine.provenance import carried_files
from moxkit.errors import MoxError
from moxkit.sources import (
    MAX_JSON_DEPTH,
    member,
    parse_json,
    read_json,
    resolve_model,
    shown,
    tree_root,
    user_file,
)

REV = "0123456789abcdef0123456789abcdef01234567"


def tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    return {f"model.l{i}.weight": random_tensor((4, 3), torch.float32, seed + i) for i in range(4)}


def hub_cache(cache: Path, repo: str, model: Path, revision: str = REV) -> Path:
    """Put the files of `model` into `cache` as huggingface_hub lays a download out:
    blobs named by hash, snapshots/REV/ holding relative links into ../../blobs,
    refs/main naming the revision. Returns the snapshot folder."""
    org, name = repo.split("/")
    root = cache / f"models--{org}--{name}"
    snapshot = root / "snapshots" / revision
    (root / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True)
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(revision)
    for file in sorted(model.iterdir()):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copyfile(file, root / "blobs" / digest)
        os.symlink(f"../../blobs/{digest}", snapshot / file.name)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "hf-cache"
    path.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return path


@pytest.fixture
def sharded(tmp_path) -> Path:
    model = tmp_path / "model"
    save_sharded(tensors(), model, per_shard=2)
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "dtype": "float32"}))
    (model / "tokenizer.json").write_text("{}")
    return model


def test_sharded_cache_snapshot_opens_through_links_into_blobs(cache, sharded):
    snapshot = hub_cache(cache, "org/tiny", sharded)
    assert all((snapshot / n).is_symlink() for n in os.listdir(snapshot))
    assert tree_root(snapshot) == snapshot.parent.parent.resolve()
    ckpt = open_checkpoint(snapshot)
    assert list(ckpt.tensors) == list(tensors())
    assert len(ckpt.files) == 2
    # carried files are read through the same rules: links into blobs/ are fine
    assert [f.name for f in carried_files(snapshot)] == ["config.json", "tokenizer.json"]


def test_hub_id_resolves_from_the_cache_offline(cache, sharded):
    snapshot = hub_cache(cache, "org/tiny", sharded)
    assert resolve_model("org/tiny") == snapshot
    assert resolve_model("org/tiny", revision=REV) == snapshot
    assert resolve_model(f"org/tiny@{REV}") == snapshot
    assert list(open_checkpoint("org/tiny").tensors) == list(tensors())


def test_hub_id_offline_and_not_cached_is_one_line(cache):
    with pytest.raises(MoxError, match="not in the cache .* HF_HUB_OFFLINE=1"):
        resolve_model("org/absent")
    with pytest.raises(MoxError, match="no such file or directory"):
        resolve_model("not-a-hub-id-and-missing")


def test_partly_downloaded_snapshot_offline(cache, sharded):
    snapshot = hub_cache(cache, "org/tiny", sharded)
    (snapshot / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(MoxError, match="only partly downloaded"):
        resolve_model("org/tiny")


def test_unknown_revision_offline(cache, sharded):
    hub_cache(cache, "org/tiny", sharded)
    with pytest.raises(MoxError, match="org/tiny@v9"):
        resolve_model("org/tiny", revision="v9")


def test_extrapolate_cli_takes_hub_ids_and_revision(cli, cache, sharded, tmp_path):
    hub_cache(cache, "org/ref", sharded)
    mem = tmp_path / "mem"
    save_sharded({k: v + 1 for k, v in tensors().items()}, mem, per_shard=3)
    result = cli("extrapolate", "org/ref", mem, "-a", 2, "-o", tmp_path / "out", "-q",
                 "--revision", REV)  # fmt: skip
    assert result.code == 0, result.err
    out = load_file(tmp_path / "out" / "model.safetensors")
    for name, ref in tensors().items():
        torch.testing.assert_close(out[name], 3 * ref - 2 * (ref + 1), rtol=0, atol=1e-6)
    assert (tmp_path / "out" / "tokenizer.json").read_text() == "{}"
    result = cli("extrapolate", "org/ref", mem, "-a", 2, "-o", tmp_path / "o2", "--revision", "v9")
    assert result.code == 1 and "org/ref@v9" in result.err
    assert len(result.err.strip().splitlines()) == 1


def test_index_names_must_be_plain_file_names(sharded):
    index = sharded / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    for bad in ["../model/model-00001-of-00002.safetensors", "/etc/passwd", "sub/x.safetensors",
                "..", "a\\b.safetensors"]:  # fmt: skip
        data["weight_map"]["model.l0.weight"] = bad
        index.write_text(json.dumps(data))
        with pytest.raises(MoxError, match="not a plain file name"):
            open_checkpoint(sharded)


def test_links_leaving_the_model_tree_are_refused(sharded, tmp_path):
    outside = tmp_path / "outside.safetensors"
    shard = sharded / "model-00002-of-00002.safetensors"
    shutil.move(shard, outside)
    os.symlink(outside, shard)
    with pytest.raises(MoxError, match="outside the model's folder"):
        open_checkpoint(sharded)
    # a link inside the folder is followed
    shard.unlink()
    (sharded / "data").mkdir()
    shutil.move(outside, sharded / "data" / "shard2")
    os.symlink("data/shard2", shard)
    assert len(open_checkpoint(sharded).tensors) == 4


def test_carried_files_never_leave_the_tree_nor_read_special_files(sharded, tmp_path, caplog):
    secret = tmp_path / "secret.txt"
    secret.write_text("HF_TOKEN=hf_xxx")
    (sharded / "tokenizer.json").unlink()
    os.symlink(secret, sharded / "tokenizer.json")
    os.symlink("/proc/self/environ", sharded / "vocab.json")
    os.mkfifo(sharded / "merges.txt")
    (sharded / "moxkit_args.json").write_text("{}")
    (sharded / "moxkit_log.jsonl").write_text("{}\n")
    names = [f.name for f in carried_files(sharded)]
    assert names == ["config.json"]
    warnings = " ".join(r.getMessage() for r in caplog.records)
    assert "tokenizer.json" in warnings and "vocab.json" in warnings and "merges.txt" in warnings


def test_fifo_named_safetensors_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    with pytest.raises(MoxError, match="not a regular file"):
        open_checkpoint(tmp_path)
    with pytest.raises(MoxError, match="not a regular file"):
        open_checkpoint(tmp_path / "model.safetensors")


def test_symlink_loop_and_dangling_link(tmp_path):
    (tmp_path / "m").mkdir()
    os.symlink("model.safetensors", tmp_path / "m" / "model.safetensors")
    with pytest.raises(MoxError, match="symlink loop"):
        open_checkpoint(tmp_path / "m")
    os.symlink("nowhere", tmp_path / "dangling.safetensors")
    with pytest.raises(MoxError, match="dangling.safetensors"):
        user_file(tmp_path / "dangling.safetensors")


def test_non_utf8_file_names_are_shown_quoted(tmp_path):
    name = os.fsdecode(b"bad\xff\nname.safetensors")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / name).write_bytes(b"\x02\0\0\0\0\0\0\0[]")
    with pytest.raises(MoxError) as exc:
        open_checkpoint(tmp_path / "m")
    message = str(exc.value)
    assert "\n" not in message and "\\udcff" in message
    message.encode("utf-8")  # printable on any terminal
    assert shown("plain/path") == "plain/path"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"[1, 2]", "not a JSON object"),
        (b'{"a": 1, "a": 2}', "names 'a' twice"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),
        ('{"a": 1}'.encode("utf-16"), "not UTF-8"),
        (b'{"a": ' + b"9" * 5000 + b"}", "not usable JSON"),
        (b'{"a": ' + b"[" * 5000 + b"]" * 5000 + b"}", "nested too deeply"),
        (b'{"a": ' + b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH + b"}", "more than 64 levels"),
        (b"{oops", "not valid JSON"),
    ],
    ids=["array", "duplicate", "bom", "utf16", "bigint", "recursion", "depth", "syntax"],
)
def test_read_json_bounds(tmp_path, content, message):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    with pytest.raises(MoxError, match=message) as exc:
        read_json(member(tmp_path, "config.json"), "config")
    assert "\n" not in str(exc.value)


def test_read_json_size_cap_and_budget(tmp_path):
    path = tmp_path / "config.json"
    path.write_bytes(b'{"a": 1}' + b" " * 10_000)
    with pytest.raises(MoxError, match="reads JSON files up to 1,000 bytes"):
        read_json(member(tmp_path, "config.json"), "config", max_bytes=1000)
    with pytest.raises(MoxError, match="memory budget"):
        read_json(member(tmp_path, "config.json"), "config", budget=1)
    assert parse_json(b'{"a": [1, {"b": null}]}', "x") == {"a": [1, {"b": None}]}
