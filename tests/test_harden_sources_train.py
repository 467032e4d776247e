"""train-mem, unlearn and every other command that loads MODEL through transformers read
only what the trust rules allow (moxkit.sources): a file of the model that links outside its
tree, is not a regular file or is hostile JSON never reaches the loader, so it can never be
re-saved into OUT (the tokenizer, the generation config and the chat template are written
from what transformers loaded, not copied). A model file left out is named in a warning; a
config.json that breaks the rules, or JSON a loader would choke on, is one line and exit 1
with nothing in OUT."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_harden_sources import no_hang
from test_sources import REV, hub_cache

from moxkit.apps.tiny import build_tiny_llama, build_word_tokenizer, save_tiny_model, tiny_facts
from moxkit.cli.main import main
from moxkit.errors import MoxError
from moxkit.hf import NOT_LOADED, checked_view, load_model, load_tokenizer
from moxkit.sources import MAX_MODEL_FILE_BYTES

ROWS = tiny_facts(8)
QUICK = ["--max-steps", "1", "--kl-weight", "0", "--batch-size", "4", "-q"]
# each file a transformers tokenizer or model takes in, with content it would re-save into OUT
SECRETS = {
    "chat_template.jinja": "SECRET-jinja {{ messages }}",
    "generation_config.json": json.dumps({"secret_key": "SECRET-generation"}),
    "added_tokens.json": json.dumps({"SECRET-added": 99}),
    "special_tokens_map.json": json.dumps({"pad_token": "SECRET-pad"}),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("harden-train")
    tok = build_word_tokenizer([f"{r['question']} {r['answer']}" for r in ROWS])
    model = build_tiny_llama(len(tok), hidden_size=32, num_heads=2, intermediate_size=64)
    save_tiny_model(model, tok, root / "ref")
    (root / "forget.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return root


@pytest.fixture
def ref(built, tmp_path) -> Path:
    """A private copy of the tiny model, free to be made hostile."""
    return Path(shutil.copytree(built / "ref", tmp_path / "ref"))


def run(capsys, *args) -> tuple[int, str]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as exc:
        code = exc.code
    finally:
        torch.set_num_threads(before)
    return code, capsys.readouterr().err


def link_secrets(folder: Path, outside: Path, names=tuple(SECRETS)) -> None:
    outside.mkdir(exist_ok=True)
    for name in names:
        secret = outside / f"secret-{name}"
        secret.write_text(SECRETS[name])
        if os.path.lexists(folder / name):
            (folder / name).unlink()
        os.symlink(secret, folder / name)


def assert_no_secret(out: Path, marker: bytes = b"SECRET") -> None:
    assert out.is_dir()
    for path in out.rglob("*"):
        if path.is_file():
            assert marker not in path.read_bytes(), path.name


def test_train_mem_leaves_out_model_files_linking_outside(built, ref, tmp_path, capsys, caplog):
    link_secrets(ref, tmp_path / "private")
    out = tmp_path / "out"
    code, err = run(capsys, "train-mem", ref, "--forget", built / "forget.jsonl", "-o", out,
                    *QUICK)  # fmt: skip
    assert code == 0, err
    assert_no_secret(out)
    for name in SECRETS:  # warnings reach stderr through logging (here: caplog)
        assert f"{name}: links to" in caplog.text, caplog.text
    assert "Traceback" not in err
    AutoTokenizer = pytest.importorskip("transformers").AutoTokenizer
    AutoTokenizer.from_pretrained(out)  # OUT still loads


def test_unlearn_from_a_hub_id_whose_snapshot_links_outside_the_cache(
    built, tmp_path, monkeypatch, capsys, caplog
):
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    snapshot = hub_cache(cache, "org/tiny", built / "ref")
    link_secrets(snapshot, tmp_path / "private", ["chat_template.jinja", "generation_config.json"])
    out = tmp_path / "forget"
    code, err = run(capsys, "unlearn", "org/tiny", "--forget", built / "forget.jsonl", "-o", out,
                    "--alpha", "1", *QUICK)  # fmt: skip
    assert code == 0, err
    assert_no_secret(out)
    warned = caplog.text
    assert (
        "chat_template.jinja: links to" in warned and "generation_config.json: links to" in warned
    )
    ref = load_file(snapshot / "model.safetensors")
    assert load_file(out / "model.safetensors").keys() == ref.keys()


def test_environment_never_reaches_out(cli, built, ref, tmp_path):
    """A chat template linking to /proc/self/environ: the run's environment (HF_TOKEN...)."""
    (ref / "chat_template.jinja").unlink()
    os.symlink("/proc/self/environ", ref / "chat_template.jinja")
    out = tmp_path / "out"
    token = "hf_moxkitHardenProbe1234567890"
    result = cli.run("train-mem", ref, "--forget", built / "forget.jsonl", "-o", out, *QUICK,
                     env={"HF_TOKEN": token, "OMP_NUM_THREADS": "1"}, timeout=600)  # fmt: skip
    assert result.code == 0, result.err
    assert_no_secret(out, token.encode())
    assert "chat_template.jinja: links to /proc/" in result.err


def test_special_files_never_hang_the_loader(built, ref, tmp_path, capsys, caplog):
    for name in ("generation_config.json", "special_tokens_map.json", "added_tokens.json"):
        if os.path.lexists(ref / name):
            (ref / name).unlink()
        os.mkfifo(ref / name)
    out = tmp_path / "out"
    with no_hang(300):
        code, err = run(capsys, "train-mem", ref, "--forget", built / "forget.jsonl", "-o", out,
                        *QUICK)  # fmt: skip
    assert code == 0, err
    assert caplog.text.count("not a regular file") == 3, caplog.text


def test_config_linking_outside_the_tree_is_one_line(built, ref, tmp_path, capsys):
    outside = tmp_path / "elsewhere.json"
    shutil.copyfile(ref / "config.json", outside)
    (ref / "config.json").unlink()
    os.symlink(outside, ref / "config.json")
    out = tmp_path / "out"
    code, err = run(capsys, "train-mem", ref, "--forget", built / "forget.jsonl", "-o", out,
                    *QUICK)  # fmt: skip
    assert code == 1 and not out.exists()
    assert len(err.strip().splitlines()) == 1 and "config.json: links to" in err, err


HOSTILE_JSON = {
    "nested": b'{"a": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "not-utf8": b'{"a": "\xff"}',
    "duplicate": b'{"a": 1, "a": 2}',
    "array": b"[1, 2]",
}


@pytest.mark.parametrize("content", sorted(HOSTILE_JSON))
@pytest.mark.parametrize(
    "name",
    ["config.json", "generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
     "added_tokens.json", "tokenizer.json"],
)  # fmt: skip
def test_hostile_json_is_one_line_naming_the_file(built, ref, tmp_path, capsys, name, content):
    (ref / name).write_bytes(HOSTILE_JSON[content])
    out = tmp_path / "out"
    code, err = run(capsys, "train-mem", ref, "--forget", built / "forget.jsonl", "-o", out,
                    *QUICK)  # fmt: skip
    assert code == 1 and not out.exists(), err
    assert len(err.strip().splitlines()) == 1 and name in err, err


def test_adapter_config_in_model_is_not_followed_to_another_base(built, ref, tmp_path, capsys):
    """transformers loads the model an adapter_config.json names as its base: a MODEL folder
    holding one would train from weights elsewhere. The loader never sees it."""
    other = tmp_path / "other"
    tok = load_tokenizer(built / "ref", "x")
    model = build_tiny_llama(len(tok), hidden_size=32, num_heads=2, intermediate_size=64, seed=5)
    save_tiny_model(model, tok, other)
    config = {"base_model_name_or_path": str(other), "peft_type": "LORA", "r": 2,
              "target_modules": ["q_proj"], "task_type": "CAUSAL_LM"}  # fmt: skip
    (ref / "adapter_config.json").write_text(json.dumps(config))
    loaded = load_model(ref, "MODEL")
    want = load_file(ref / "model.safetensors")
    for name, param in loaded.model.state_dict().items():
        if name in want:
            torch.testing.assert_close(param, want[name], rtol=0, atol=0)


def test_load_model_and_tokenizer_read_only_checked_files(built, ref, tmp_path):
    """The loader every command shares (eval, sweep, the studies) takes the same view."""
    link_secrets(ref, tmp_path / "private")
    tokenizer = load_tokenizer(ref, "MODEL")
    loaded = load_model(ref, "MODEL")
    for tok in (tokenizer, loaded.tokenizer):
        assert "SECRET" not in str(tok.chat_template) and "SECRET-pad" != tok.pad_token
        assert "SECRET-added" not in tok.get_vocab()
    assert not hasattr(loaded.model.generation_config, "secret_key")
    assert loaded.directory == ref  # messages and the engine name MODEL as given
    (ref / "config.json").unlink()
    os.symlink(tmp_path / "private" / "secret-generation_config.json", ref / "config.json")
    with pytest.raises(MoxError, match="config.json: links to"):
        load_model(ref, "MODEL")


def test_cache_snapshot_is_loaded_through_its_blobs(built, tmp_path, monkeypatch):
    """The rules do not get in the way of a normal cache: links into blobs/ load."""
    cache = tmp_path / "hf-cache"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    snapshot = hub_cache(cache, "org/tiny", built / "ref")
    loaded = load_model("org/tiny", "MODEL", revision=REV)
    assert loaded.directory == snapshot
    assert loaded.tokenizer.get_vocab() == load_tokenizer(built / "ref", "x").get_vocab()


def test_tensors_carried_from_model_are_read_from_the_checked_file(built, tmp_path, capsys):
    """A tensor MODEL's checkpoint holds that the model does not train (a buffer) is copied
    from the file as checked, not by a name re-read from a message: a MODEL path with a
    newline (shown quoted in messages) must still work."""
    from safetensors.torch import save_file

    ref = Path(shutil.copytree(built / "ref", tmp_path / "odd\nref"))
    weights = load_file(ref / "model.safetensors")
    weights["extra.buffer"] = torch.arange(4.0)
    save_file(weights, ref / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "out"
    code, err = run(capsys, "train-mem", ref, "--forget", built / "forget.jsonl", "-o", out,
                    *QUICK)  # fmt: skip
    assert code == 0, err
    torch.testing.assert_close(load_file(out / "model.safetensors")["extra.buffer"],
                               torch.arange(4.0), rtol=0, atol=0)  # fmt: skip


ENTRIES = ["fifo", "outside", "proc", "dir", "huge", "nested", "plain", "loop", "inside-link"]


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(entries=st.dictionaries(
    st.sampled_from(["generation_config.json", "tokenizer_config.json", "special_tokens_map.json",
                     "added_tokens.json", "chat_template.jinja", "vocab.json", "merges.txt",
                     "tokenizer.model", "adapter_config.json"]),
    st.sampled_from(ENTRIES), max_size=4))  # fmt: skip
def test_fuzzed_checked_view(built, tmp_path_factory, entries):
    """Whatever MODEL's files are, the loader's view holds links only to regular files of
    the model's tree (nothing else is there for transformers to find), or the view is
    refused with one line naming a file a loader could not read whole within bounds (JSON
    past read_json's, anything else past MAX_MODEL_FILE_BYTES)."""
    base = tmp_path_factory.mktemp("view")
    ref = Path(shutil.copytree(built / "ref", base / "ref"))
    (base / "outside.json").write_text("{}")
    (ref / "sub").mkdir()
    (ref / "sub" / "real.json").write_text("{}")
    for name, entry in entries.items():
        path = ref / name
        if os.path.lexists(path):
            path.unlink()
        if entry == "fifo":
            os.mkfifo(path)
        elif entry == "outside":
            path.symlink_to(base / "outside.json")
        elif entry == "proc":
            path.symlink_to("/proc/self/environ")
        elif entry == "dir":
            path.mkdir()
        elif entry == "huge":
            with open(path, "wb") as f:
                f.truncate(MAX_MODEL_FILE_BYTES + 1)
        elif entry == "nested":
            path.write_bytes(b"[" * 5000 + b"]" * 5000)
        elif entry == "plain":
            path.write_text("{}")
        elif entry == "loop":
            path.symlink_to(name)
        else:
            path.symlink_to("sub/real.json")
    unloadable = [n for n, e in entries.items() if n not in NOT_LOADED and (
        e == "huge" or e == "nested" and n.endswith(".json"))]  # fmt: skip
    try:
        with no_hang(30):
            view = checked_view(ref, "MODEL")
    except MoxError as exc:
        assert "\n" not in str(exc) and any(n in str(exc) for n in unloadable), str(exc)
        return
    assert not unloadable
    try:
        names = set(os.listdir(view.name))
        tree = str(ref.resolve()) + os.sep
        for name in names:
            target = os.readlink(os.path.join(view.name, name))
            assert target.startswith(tree) and Path(target).is_file(), (name, target)
        for name, entry in entries.items():
            expected = entry in ("plain", "inside-link", "nested") and name not in NOT_LOADED
            assert (name in names) == expected, (name, entry)
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    finally:
        view.cleanup()
