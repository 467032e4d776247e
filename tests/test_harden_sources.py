"""A crafted Hugging Face cache must not make moxkit read another model, hang or trace back.

The cache is built by hand (tests/test_sources.hub_cache) and everything runs offline; the
one online case points the hub at a closed local port, so nothing is downloaded. Checked:
the revision (a commit hash or a plain ref name, never a path), the ref file (a small regular
file holding a commit hash, read without following links, without blocking, strictly
decoded), the snapshot (the folder the hub made inside the repository, not a link to one
elsewhere), the files of a snapshot (links into the repository's own blobs only), and the
tree listings huggingface_hub keeps (never read offline; checked before it is let loose
online). A hang would stop the suite, so every case that could hang runs under an alarm."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import string
from pathlib import Path

import pytest
from ckpt_factory import save_sharded
from hypothesis import given, settings
from hypothesis import strategies as st
from test_sources import REV, hub_cache, tensors

from moxkit.engine.checkpoint import open_checkpoint
from moxkit.engine.provenance import carried_files
from moxkit.errors import MoxError
from moxkit.sources import check_revision, resolve_model

OTHER = "fedcba9876543210fedcba9876543210fedcba98"


class Hung(BaseException):
    """Raised by the alarm: a BaseException, so no `except Exception` can swallow it."""


@contextlib.contextmanager
def no_hang(seconds: int = 60):
    """Fail the test (instead of hanging the suite) if the block blocks forever. A blocked
    open() or read() is interrupted by the signal and the handler's exception propagates."""

    def handler(signum, frame):
        raise Hung(f"still blocked after {seconds} s")

    previous = signal.signal(signal.SIGALRM, handler)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message
    return message


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "hf-cache"
    path.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return path


def model_folder(where: Path, seed: int) -> Path:
    save_sharded(tensors(seed), where, per_shard=2)
    (where / "config.json").write_text(json.dumps({"model_type": "llama", "seed": seed}))
    return where


@pytest.fixture
def victim(cache, tmp_path) -> Path:
    """org/tiny in the cache; returns its repository folder (models--org--tiny)."""
    return hub_cache(cache, "org/tiny", model_folder(tmp_path / "tiny", 0)).parent.parent


@pytest.fixture
def other(cache, tmp_path) -> Path:
    """A second model in the cache (org/other) and its snapshot: what an attack reads."""
    return hub_cache(cache, "org/other", model_folder(tmp_path / "other", 7), OTHER)


# ------------------------------------------------------------------------------ refs


@pytest.mark.parametrize("kind", ["relative", "absolute"])
def test_ref_holding_a_path_is_refused(victim, other, kind):
    """huggingface_hub joins the ref's text onto snapshots/: a path there leaves the repo."""
    text = f"../../models--org--other/snapshots/{OTHER}" if kind == "relative" else str(other)
    (victim / "refs" / "main").write_text(text)
    with pytest.raises(MoxError) as exc:
        resolve_model("org/tiny")
    assert "refs/main" in one_line(exc) and "commit hash" in str(exc.value)
    with pytest.raises(MoxError, match="refs/main"):
        open_checkpoint("org/tiny")


def test_ref_is_read_strictly(victim):
    ref = victim / "refs" / "main"
    for content, message in [
        (b"\xff\xfe" + b"a" * 38, "not ASCII text"),
        (b"", "not a commit hash"),
        (REV.upper().encode(), "not a commit hash"),
        (REV.encode() + b"\0", "not a commit hash"),
        (b"x" * 5000, "5,000 bytes"),
    ]:
        ref.write_bytes(content)
        with pytest.raises(MoxError, match=message) as exc:
            resolve_model("org/tiny")
        one_line(exc)
    ref.write_bytes(REV.encode() + b"\n")  # a trailing newline (an editor's) is fine
    assert resolve_model("org/tiny").name == REV


def test_ref_that_is_a_fifo_does_not_hang(victim):
    (victim / "refs" / "main").unlink()
    os.mkfifo(victim / "refs" / "main")
    with no_hang(), pytest.raises(MoxError, match="not a regular file") as exc:
        resolve_model("org/tiny")
    one_line(exc)


def test_ref_linked_to_a_device_or_huge_is_never_read_whole(victim, tmp_path):
    ref = victim / "refs" / "main"
    ref.unlink()
    os.symlink("/dev/zero", ref)
    with no_hang(), pytest.raises(MoxError, match="a link") as exc:
        resolve_model("org/tiny")
    one_line(exc)
    ref.unlink()
    with open(ref, "wb") as f:  # sparse: 1.5 GB claimed, nothing on disk
        f.truncate(1_500_000_000)
    with no_hang(), pytest.raises(MoxError, match="1,500,000,000 bytes") as exc:
        resolve_model("org/tiny")
    one_line(exc)


def test_refs_folder_linked_elsewhere_is_refused(victim, tmp_path):
    elsewhere = tmp_path / "elsewhere-refs"
    elsewhere.mkdir()
    (elsewhere / "main").write_text(REV)
    (victim / "refs" / "main").unlink()
    (victim / "refs").rmdir()
    os.symlink(elsewhere, victim / "refs")
    with pytest.raises(MoxError, match="refs.* link") as exc:
        resolve_model("org/tiny")
    one_line(exc)


# ------------------------------------------------------------------------------ revisions


@pytest.mark.parametrize(
    "revision",
    ["../../x", "/abs/path", "main/../main", "a//b", ".hidden", "x.lock", "main/", "-rf",
     "a b", "main\n", "ma\0in", "é", "x" * 300],
)  # fmt: skip
def test_revisions_that_are_not_ref_names_are_refused(victim, revision):
    with pytest.raises(MoxError, match="not a commit hash or a ref name") as exc:
        resolve_model("org/tiny", revision=revision)
    one_line(exc)


def test_revision_naming_a_file_outside_the_repo_cannot_redirect(victim, other, tmp_path):
    """A revision walking out of refs/ to a file whose text is a path to another model."""
    evil = tmp_path / "evil-ref"
    evil.write_text(str(other))
    up = os.path.relpath(evil, victim / "refs")
    with pytest.raises(MoxError, match="not a commit hash or a ref name"):
        resolve_model("org/tiny", revision=up)
    with pytest.raises(MoxError, match="not a commit hash or a ref name|no such file"):
        resolve_model(f"org/tiny@{evil}")
    with pytest.raises(MoxError, match="not a commit hash or a ref name"):
        resolve_model(f"org/tiny@{other}")


def test_extrapolate_cli_refuses_a_path_revision(cli, victim, other, tmp_path):
    mem = model_folder(tmp_path / "mem", 1)
    out = tmp_path / "out"
    up = os.path.relpath(other.parent.parent / "refs" / "main", victim / "refs")
    result = cli("extrapolate", "org/tiny", mem, "-a", 1, "-o", out, "--revision", up, "-q")
    assert result.code == 1 and "not a commit hash or a ref name" in result.err
    assert len(result.err.strip().splitlines()) == 1 and "Traceback" not in result.err
    assert not out.exists()


def test_valid_revisions_still_resolve(victim):
    (victim / "refs" / "v1.0").write_text(REV)
    (victim / "refs" / "refs" / "pr").mkdir(parents=True)
    (victim / "refs" / "refs" / "pr" / "3").write_text(REV)
    for revision in (None, "main", "v1.0", "refs/pr/3", REV):
        assert resolve_model("org/tiny", revision=revision) == victim / "snapshots" / REV


# ------------------------------------------------------------------------------ snapshots


def test_snapshot_linked_to_a_folder_elsewhere_is_refused(victim, tmp_path):
    elsewhere = model_folder(tmp_path / "elsewhere", 3)
    snapshot = victim / "snapshots" / REV
    for name in os.listdir(snapshot):
        (snapshot / name).unlink()
    snapshot.rmdir()
    os.symlink(elsewhere, snapshot)
    for name in ("org/tiny", f"org/tiny@{REV}"):
        with pytest.raises(MoxError, match="link") as exc:
            resolve_model(name)
        assert REV in one_line(exc)


def test_snapshot_files_link_only_into_the_repos_own_blobs(victim, other, caplog):
    """Inside the repository but not a blob (refs/main), or another repository's blob: both
    are outside what a snapshot may link to."""
    snapshot = victim / "snapshots" / REV
    (snapshot / "tokenizer.json").symlink_to("../../refs/main")
    blob = next((other.parent.parent / "blobs").iterdir())
    (snapshot / "vocab.json").symlink_to(os.path.relpath(blob, snapshot))
    names = [f.name for f in carried_files(snapshot)]
    assert names == ["config.json"]
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "tokenizer.json" in warned and "vocab.json" in warned
    shard = snapshot / "model-00002-of-00002.safetensors"
    shard.unlink()
    shard.symlink_to(os.path.relpath(blob, snapshot))
    with pytest.raises(MoxError, match="outside"):
        open_checkpoint(snapshot)


# ------------------------------------------------------------------------------ tree listings


def nested(depth: int) -> bytes:
    return b'{"files": ' + b"[" * depth + b"]" * depth + b"}"


def test_tree_listings_are_not_read_offline(victim):
    """huggingface_hub reads trees/<commit>.json to tell a partial snapshot (deep nesting:
    RecursionError; a FIFO: a hang); moxkit tells it from the index, offline."""
    trees = victim / "trees"
    trees.mkdir()
    (trees / f"{REV}.json").write_bytes(nested(100_000))
    assert resolve_model("org/tiny") == victim / "snapshots" / REV
    (trees / f"{REV}.json").unlink()
    os.mkfifo(trees / f"{REV}.json")
    with no_hang():
        assert resolve_model("org/tiny") == victim / "snapshots" / REV


@pytest.mark.parametrize("entry", ["fifo", "nested", "link", "huge", "ref-fifo"])
def test_hostile_cache_is_refused_before_the_hub_library_is_let_loose(victim, monkeypatch, entry):
    """Online with a partial snapshot, the hub library would read trees/ and refs/ itself:
    moxkit checks them first. HF_ENDPOINT is a closed local port: nothing is downloaded."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    (victim / "snapshots" / REV / "model-00002-of-00002.safetensors").unlink()
    trees = victim / "trees"
    trees.mkdir()
    listing = trees / f"{REV}.json"
    if entry == "fifo":
        os.mkfifo(listing)
    elif entry == "nested":
        listing.write_bytes(nested(100_000))
    elif entry == "link":
        listing.symlink_to("/dev/zero")
    elif entry == "huge":
        with open(listing, "wb") as f:
            f.truncate(1_500_000_000)
    else:
        (victim / "refs" / "main").unlink()
        os.mkfifo(victim / "refs" / "main")
    with no_hang(), pytest.raises(MoxError) as exc:
        resolve_model("org/tiny")
    message = one_line(exc)
    assert ("trees" in message or "refs" in message) and "download failed" not in message


# ------------------------------------------------------------------------------ fuzz

COMMITS = [REV, OTHER, "0" * 40]
ref_texts = (
    st.sampled_from(COMMITS).map(str.encode)
    | st.sampled_from(COMMITS).map(lambda c: (c + "\n").encode())
    | st.sampled_from(["../../models--org--other/snapshots/" + OTHER, "/etc", "..", ""]).map(
        str.encode
    )
    | st.binary(max_size=60)
)


@st.composite
def caches(draw) -> dict:
    return {
        "ref": draw(st.sampled_from(["file", "fifo", "dir", "link-in", "link-out", "absent"])),
        "text": draw(ref_texts),
        "snapshot": draw(st.sampled_from(["dir", "link-out", "link-in", "file", "absent"])),
        "revision": draw(
            st.none()
            | st.sampled_from(["main", REV, OTHER, "../main", "refs/../main", "v1"])
            | st.text(string.printable, max_size=20)
        ),
    }


def build(spec: dict, repo: Path, other: Path) -> None:
    ref = repo / "refs" / "main"
    ref.unlink()
    kind = spec["ref"]
    if kind == "file":
        ref.write_bytes(spec["text"])
    elif kind == "fifo":
        os.mkfifo(ref)
    elif kind == "dir":
        ref.mkdir()
    elif kind == "link-in":
        (repo / "refs" / "real").write_bytes(spec["text"])
        ref.symlink_to("real")
    elif kind == "link-out":
        ref.symlink_to(other.parent.parent / "refs" / "main")
    snapshot = repo / "snapshots" / REV
    kind = spec["snapshot"]
    if kind != "dir":
        for name in os.listdir(snapshot):
            (snapshot / name).unlink()
        snapshot.rmdir()
    if kind == "link-out":
        snapshot.symlink_to(other)
    elif kind == "link-in":
        (repo / "snapshots" / "real").mkdir()
        snapshot.symlink_to("real")
    elif kind == "file":
        snapshot.write_text("not a folder")


@settings(max_examples=150, deadline=None, derandomize=True, database=None)
@given(spec=caches())
def test_fuzzed_cache_trees(tmp_path_factory, spec):
    """Whatever the refs and snapshots hold, a hub id resolves to the repository's own
    snapshot folder of a commit hash, or fails with one line; it never hangs, never reads
    another model and never raises anything else."""
    base = tmp_path_factory.mktemp("fuzz")
    cache = base / "hf-cache"
    cache.mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("HF_HUB_CACHE", str(cache))
    mp.setenv("HF_HUB_OFFLINE", "1")
    try:
        repo = hub_cache(cache, "org/tiny", model_folder(base / "tiny", 0)).parent.parent
        other = hub_cache(cache, "org/other", model_folder(base / "other", 7), OTHER)
        build(spec, repo, other)
        with no_hang(30):
            try:
                found = resolve_model("org/tiny", revision=spec["revision"])
            except MoxError as exc:
                assert "\n" not in str(exc)
                return
    finally:
        mp.undo()
    assert found.parent == repo / "snapshots" and re.fullmatch("[0-9a-f]{40}", found.name)
    assert os.path.realpath(found) == str(repo.resolve() / "snapshots" / found.name)
    assert spec["snapshot"] == "dir" and found.name == REV


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(revision=st.text(max_size=40) | st.sampled_from(["refs/pr/1", "v1.2-rc_3", REV]))
def test_accepted_revisions_stay_inside_refs(revision):
    """Oracle: a revision accepted as a ref name is a relative path that normalises to
    itself (no '..', no '.', no empty part, no absolute path), of printable ASCII."""
    try:
        accepted = check_revision(revision, "org/x") == revision
    except MoxError as exc:
        assert "\n" not in str(exc)
        return
    assert accepted
    assert os.path.normpath(revision) == revision and not os.path.isabs(revision)
    assert not any(part in ("", ".", "..") for part in revision.split("/"))
    assert revision.isascii() and revision.isprintable() and " " not in revision


TARGETS = ["blob", "blob-fifo", "refs", "other-snapshot-file", "other-repo-blob", "outside",
           "proc", "dir", "loop", "dangling", "plain"]  # fmt: skip


@settings(max_examples=60, deadline=None, derandomize=True, database=None)
@given(links=st.dictionaries(st.sampled_from(["config.json", "tokenizer.json", "vocab.json",
                                              "chat_template.jinja", "merges.txt"]),
                             st.sampled_from(TARGETS), max_size=5))  # fmt: skip
def test_fuzzed_snapshot_links(tmp_path_factory, links):
    """Whatever the files of a cache snapshot link to, the model files moxkit reads are
    regular files inside that snapshot or its own repository's blobs/, and every other one
    is left out (never an exception other than none at all)."""
    base = tmp_path_factory.mktemp("links")
    cache = base / "hf-cache"
    repo = hub_cache(cache, "org/tiny", model_folder(base / "tiny", 0)).parent.parent
    other = hub_cache(cache, "org/other", model_folder(base / "other", 7), OTHER)
    snapshot = repo / "snapshots" / REV
    (repo / "snapshots" / OTHER).mkdir()
    (repo / "snapshots" / OTHER / "file").write_text("{}")
    (base / "outside").write_text("{}")
    os.mkfifo(repo / "blobs" / "fifo")
    (repo / "blobs" / "json").write_text("{}")
    where = {
        "blob": repo / "blobs" / "json",
        "blob-fifo": repo / "blobs" / "fifo",
        "refs": repo / "refs" / "main",
        "other-snapshot-file": repo / "snapshots" / OTHER / "file",
        "other-repo-blob": next((other.parent.parent / "blobs").iterdir()),
        "outside": base / "outside",
        "proc": Path("/proc/self/environ"),
        "dir": repo / "blobs",
        "dangling": repo / "blobs" / "absent",
    }
    for name, target in links.items():
        if os.path.lexists(snapshot / name):
            (snapshot / name).unlink()
        if target == "loop":
            (snapshot / name).symlink_to(name)
        elif target == "plain":
            (snapshot / name).write_text("{}")
        else:
            (snapshot / name).symlink_to(os.path.relpath(where[target], snapshot))
    with no_hang(30):
        files = carried_files(snapshot)
    blobs, own = str(repo.resolve() / "blobs") + os.sep, str(snapshot.resolve()) + os.sep
    for file in files:
        assert file.real.startswith((blobs, own))
        assert Path(file.real).is_file() and not Path(file.real).is_fifo()
    kept = {f.name for f in files}
    for name, target in links.items():
        assert (name in kept) == (target in ("blob", "plain")), (name, target)
