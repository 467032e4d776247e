"""moxkit.atomic: outputs appear whole or not at all, whatever happens while they are built."""

from __future__ import annotations

import fcntl
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moxkit import atomic
from moxkit.errors import MoxError


def names(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_staged_dir_publishes_on_success_with_umask_mode(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    old = os.umask(0o022)
    try:
        with atomic.staged_dir(out, force=False) as tmp:
            assert tmp.parent == out.parent and tmp.name.startswith(".out.moxkit-tmp-")
            (tmp / "x.txt").write_text("hi")
    finally:
        os.umask(old)
    assert (out / "x.txt").read_text() == "hi"
    assert os.stat(out).st_mode & 0o777 == 0o755  # not mkdtemp's 0700
    assert names(out.parent) == ["out"]


def test_error_removes_temp_and_the_parents_it_made(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    with pytest.raises(RuntimeError):
        with atomic.staged_dir(out, force=False) as tmp:
            (tmp / "x").write_text("half")
            raise RuntimeError("boom")
    assert names(tmp_path) == []


def test_staged_file_keeps_suffix_and_refuses_a_file_that_appeared(tmp_path):
    out = tmp_path / "plot.png"
    with pytest.raises(MoxError, match="appeared while writing"):
        with atomic.staged_file(out, force=False) as tmp:
            assert tmp.suffix == ".png"
            tmp.write_text("new")
            out.write_text("someone else's")
    assert out.read_text() == "someone else's"
    assert names(tmp_path) == ["plot.png"]


@pytest.mark.parametrize("kind", ["dir", "file"])
def test_force_replaces_and_never_leaves_neither(tmp_path, kind):
    out = tmp_path / ("out" if kind == "dir" else "out.safetensors")
    if kind == "dir":
        out.mkdir()
        (out / "old").write_text("old")
    else:
        out.write_text("old")
    staged = atomic.staged_dir if kind == "dir" else atomic.staged_file
    with staged(out, force=True) as tmp:
        assert os.path.exists(out)  # the old one stays until the new one is complete
        target = tmp / "new" if kind == "dir" else tmp
        target.write_text("new")
    assert (out / "new" if kind == "dir" else out).read_text() == "new"
    assert names(tmp_path) == [out.name]


def test_force_through_a_link_replaces_the_target_and_keeps_the_link(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (real / "old").write_text("old")
    link = tmp_path / "link"
    link.symlink_to(real)
    with atomic.staged_dir(link, force=True) as tmp:
        (tmp / "new").write_text("new")
    assert link.is_symlink() and names(real) == ["new"]
    assert names(tmp_path) == ["link", "real"]


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda t: (t / "f").write_text("x") and t / "f" / "out", "is not a folder"),
        (lambda t: (t / "dangling").symlink_to(t / "missing") or t / "dangling", "does not exist"),
        (lambda t: t / ("n" * 250), "name too long"),
        (lambda t: t / ("n" * 300), "name too long"),  # past NAME_MAX: lstat fails
        (lambda t: (t / "out").mkdir() or t / "out", "already exists (use force=True to replace"),
        (lambda t: Path("."), "not a name for a new output"),
        (lambda t: Path(".."), "not a name for a new output"),
    ],
)
def test_check_output_refuses_in_one_line(tmp_path, monkeypatch, make, message):
    monkeypatch.chdir(tmp_path)
    out = make(tmp_path)
    with pytest.raises(MoxError, match=re.escape(message)) as exc:
        atomic.check_output(out, force=False)
    assert "\n" not in str(exc.value)


def test_a_trailing_slash_names_a_folder_output_but_never_a_file(tmp_path):
    with atomic.staged_dir(f"{tmp_path / 'out'}/", force=False) as tmp:
        (tmp / "x").write_text("x")
    assert (tmp_path / "out" / "x").read_text() == "x"
    with pytest.raises(MoxError, match="not a name for a new output"):
        with atomic.staged_file(f"{tmp_path / 'report.json'}/", force=False):
            pass
    assert names(tmp_path) == ["out"]


def test_a_failed_fsync_after_publishing_says_out_is_in_place(tmp_path, monkeypatch):
    out = tmp_path / "out"
    real_fsync = atomic._fsync_path

    def failing_on_the_folder(path):
        if Path(path) == tmp_path:
            raise OSError(5, "Input/output error")
        real_fsync(path)

    monkeypatch.setattr(atomic, "_fsync_path", failing_on_the_folder)
    with pytest.raises(MoxError, match="written and in place, but syncing its folder") as exc:
        with atomic.staged_dir(out, force=False, fsync=True) as tmp:
            (tmp / "x").write_text("done")
    assert "\n" not in str(exc.value) and "Input/output error" in str(exc.value)
    assert (out / "x").read_text() == "done"
    assert names(tmp_path) == ["out"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_check_output_refuses_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir(mode=0o555)
    with pytest.raises(MoxError, match="permission denied"):
        atomic.check_output(folder / "out", force=False)


def test_check_output_compares_inputs_by_inode(tmp_path):
    ref = tmp_path / "ref"
    ref.mkdir()
    (ref / "model.safetensors").write_text("")
    alias = tmp_path / "alias"
    alias.symlink_to(ref)
    for out, message in [
        (alias, "would overwrite the input"),
        (alias / "sub", "would lie inside the input"),
        (alias / "model.safetensors", "would overwrite the input"),
        (tmp_path, "folder holding the input"),
    ]:
        with pytest.raises(MoxError, match=message):
            atomic.check_output(out, force=True, inputs=[ref, ref / "model.safetensors"])


def test_stale_temp_of_a_dead_run_is_removed_but_not_a_live_one(tmp_path):
    out = tmp_path / "out"
    dead = tmp_path / ".out.moxkit-tmp-dead"
    dead.mkdir()
    (dead / "shard").write_text("partial")
    live = tmp_path / ".out.moxkit-tmp-live"
    live.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(f"""
                import fcntl, os, sys
                fd = os.open({str(live)!r}, os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX)
                print("locked", flush=True)
                sys.stdin.read()
            """),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with atomic.staged_dir(out, force=False) as tmp:
            (tmp / "x").write_text("")
        assert names(tmp_path) == [".out.moxkit-tmp-live", "out"]
    finally:
        holder.communicate("")
    assert atomic.remove_stale_temps(out) == [live]


def test_new_temp_is_locked_while_in_use(tmp_path):
    with atomic.staged_file(tmp_path / "f.bin", force=False) as tmp:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            with pytest.raises(BlockingIOError):
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)
        assert atomic.remove_stale_temps(tmp_path / "f.bin") == []


def test_second_signal_during_cleanup_is_held(tmp_path, monkeypatch):
    """The first SIGTERM interrupts; one arriving while the temp is removed does not stop
    the removal, and the handlers in place before are restored afterwards."""
    out = tmp_path / "out"
    real_remove = atomic._remove

    def slow_remove(path):
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal, mid-cleanup
        real_remove(path)

    monkeypatch.setattr(atomic, "_remove", slow_remove)
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with atomic.staged_dir(out, force=False) as tmp:
            (tmp / "x").write_text("")
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler runs between bytecodes
                pass
    assert names(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) is before


def test_an_ignored_signal_stays_ignored(tmp_path):
    """A signal the parent set to be ignored (`cmd &` in a script, nohup-style) is not
    turned into an interrupt: the run finishes and publishes."""
    before = signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:
        with atomic.staged_dir(tmp_path / "out", force=False) as tmp:
            (tmp / "x").write_text("")
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # the handler would run between bytecodes
                pass
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGTERM, before)
    assert names(tmp_path / "out") == ["x"]


def test_signal_while_publishing_leaves_out_complete(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setattr(atomic, "HOOK", atomic.signal_at("publish:SIGINT"))
    atomic.published.clear()
    with pytest.raises(KeyboardInterrupt):
        with atomic.staged_dir(out, force=False) as tmp:
            (tmp / "x").write_text("done")
    # the signal came at the publish point: held, OUT put in place, then raised
    assert (out / "x").read_text() == "done"
    assert atomic.published == [out]
    assert names(tmp_path) == ["out"]


def test_fsync_option_publishes_the_same(tmp_path):
    with atomic.staged_dir(tmp_path / "out", force=False, fsync=True) as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x").write_text("x")
    assert (tmp_path / "out" / "sub" / "x").read_text() == "x"
