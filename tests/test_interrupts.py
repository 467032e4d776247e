"""Interruptions at every point of a run: signals delivered at named points of the pipeline
(moxkit.atomic.reached, driven by MOXKIT_TEST_SIGNALS in a subprocess or atomic.HOOK in
process), second signals during cleanup, SIGKILL and a rerun, concurrent runs on one OUT.
Every run ends in one line with nothing left beside OUT, or with OUT complete."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from ckpt_factory import emulate, random_tensor
from safetensors.torch import load_file, save_file

from moxkit import atomic

N_TENSORS = 6  # several chunks: the points are reached while others are in flight


@pytest.fixture
def models(tmp_path):
    ref = {f"layer{i}.w": random_tensor((256, 64), torch.bfloat16, i) for i in range(N_TENSORS)}
    mem = {
        k: random_tensor(v.shape, torch.bfloat16, 100 + i) for i, (k, v) in enumerate(ref.items())
    }
    save_file(ref, tmp_path / "ref.safetensors")
    save_file(mem, tmp_path / "mem.safetensors")
    return tmp_path, ref, mem


def args(root: Path, out: Path, *extra) -> list:
    return ["extrapolate", root / "ref.safetensors", root / "mem.safetensors", "-a", 4, "-o", out,
            "-q", *extra]  # fmt: skip


def beside(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir())


def assert_correct(out: Path, ref, mem) -> None:
    got = load_file(out / "model.safetensors")
    for name in ref:
        assert torch.equal(got[name], emulate(ref[name], mem[name], 4.0)), name


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# every point with SIGTERM; SIGINT takes the same handler, checked once
CASES = [(p, "SIGTERM") for p in ("staging", "read", "compute", "computed", "write", "cleanup")]


@pytest.mark.parametrize("point, sig", [*CASES, ("compute", "SIGINT")])
def test_signal_at_each_point_leaves_nothing(cli, models, point, sig):
    root, _, _ = models
    result = cli.run(*args(root, root / "out"), env={"MOXKIT_TEST_SIGNALS": f"{point}:{sig}"})
    assert result.code == 130, result.err
    assert one_line(result.err) == "moxkit: interrupted"
    assert beside(root) == ["mem.safetensors", "ref.safetensors"]


def test_signal_while_publishing_keeps_the_complete_output(cli, models):
    root, ref, mem = models
    result = cli.run(*args(root, root / "out"), env={"MOXKIT_TEST_SIGNALS": "publish:SIGTERM"})
    assert result.code == 130
    assert "was complete and is kept" in one_line(result.err)
    assert beside(root) == ["mem.safetensors", "out", "ref.safetensors"]
    assert_correct(root / "out", ref, mem)


@pytest.mark.parametrize(
    "plan",
    [
        "compute:SIGINT,cleanup:SIGTERM,cleanup:SIGINT",  # both cleanups: pipeline, then staging
        "write:SIGTERM,cleanup:SIGTERM,cleanup:SIGTERM",
        "cleanup:SIGTERM,cleanup:SIGINT",  # the first signal lands in cleanup itself
    ],
)
def test_second_signal_during_cleanup_is_held(cli, models, plan):
    root, _, _ = models
    result = cli.run(*args(root, root / "out"), env={"MOXKIT_TEST_SIGNALS": plan})
    assert result.code == 130, result.err
    assert one_line(result.err) == "moxkit: interrupted"
    assert beside(root) == ["mem.safetensors", "ref.safetensors"]


def test_force_replacement_interrupted_keeps_old_or_new(cli, models):
    """--force over an existing OUT: interrupted before publishing, the old OUT stays as it
    was; interrupted while publishing, the new one is in place. Never neither."""
    root, ref, mem = models
    out = root / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    result = cli.run(*args(root, out, "--force"), env={"MOXKIT_TEST_SIGNALS": "write:SIGTERM"})
    assert result.code == 130 and beside(out) == ["old.txt"]
    result = cli.run(*args(root, out, "--force"), env={"MOXKIT_TEST_SIGNALS": "publish:SIGINT"})
    assert result.code == 130 and "complete" in result.err
    assert beside(out) == ["README.md", "model.safetensors"]
    assert_correct(out, ref, mem)
    assert beside(root) == ["mem.safetensors", "out", "ref.safetensors"]


def test_signal_between_the_two_renames_without_renameat2(cli, models, monkeypatch):
    """Where the file system has no RENAME_EXCHANGE, --force renames the old OUT aside, then
    the new one into place: a signal in between is held until both are done."""
    root, ref, mem = models
    out = root / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    monkeypatch.setattr(atomic, "_LIBC", [None])
    monkeypatch.setattr(atomic, "HOOK", atomic.signal_at("renamed-aside:SIGTERM"))
    result = cli(*args(root, out, "--force"))
    assert result.code == 130 and "complete" in one_line(result.err)
    assert_correct(out, ref, mem)
    assert beside(root) == ["mem.safetensors", "out", "ref.safetensors"]


def test_sigkill_leaves_a_temp_the_next_run_removes(cli, models):
    root, ref, mem = models
    result = cli.run(*args(root, root / "out"), env={"MOXKIT_TEST_SIGNALS": "write:SIGKILL"})
    assert result.code == -signal.SIGKILL
    stale = [n for n in beside(root) if n.startswith(".out.moxkit-tmp-")]
    assert len(stale) == 1
    result = cli(*args(root, root / "out"))
    assert result.code == 0, result.err
    assert beside(root) == ["mem.safetensors", "out", "ref.safetensors"]
    assert_correct(root / "out", ref, mem)


def _wait_stopped(proc: subprocess.Popen) -> None:
    """Until `proc` has stopped itself (state T in /proc): no sleeping and hoping."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        state = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in "tT":
            return
        if proc.poll() is not None:
            pytest.fail(f"run ended before it stopped: {proc.communicate()}")
        time.sleep(0.005)
    pytest.fail("run never stopped")


def test_concurrent_runs_on_one_output(cli, models):
    """Run A stops itself mid-write (SIGSTOP: its temp is live); run B on the same OUT must
    not remove A's temp and completes; A, resumed, must not overwrite B's OUT."""
    root, ref, mem = models
    a = cli.popen(*args(root, root / "out"), env={"MOXKIT_TEST_SIGNALS": "write:SIGSTOP"})
    try:
        _wait_stopped(a)
        b = cli(*args(root, root / "out"))
        assert b.code == 0, b.err
        assert len([n for n in beside(root) if ".moxkit-tmp-" in n]) == 1  # A's, untouched
    finally:
        a.send_signal(signal.SIGCONT)
        _, err = a.communicate(timeout=60)
    assert a.returncode == 1 and "appeared while writing" in one_line(err)
    assert beside(root) == ["mem.safetensors", "out", "ref.safetensors"]
    assert_correct(root / "out", ref, mem)


SLOW_WORKER = textwrap.dedent(
    """
    # A backend whose worker thread computes late: it holds only raw addresses of the
    # operands (as the C loop's pool threads do), and starts when close() asks it to finish.
    # Should the pipeline unmap the input windows or free the buffers before closing the
    # backend, the worker touches unmapped memory and the process dies of SIGSEGV.
    import ctypes, os, signal, sys, threading
    import numpy as np
    import moxkit.engine.stream
    from moxkit.engine.backends import CpuBackend
    from moxkit.cli.main import main

    def raw(x):  # an array over the same memory that keeps nothing alive
        return np.frombuffer((ctypes.c_char * x.nbytes).from_address(x.ctypes.data), x.dtype)

    class SlowWorkerBackend(CpuBackend):
        writes_files = False  # the output-buffer path (test_stream_fused.py: the other)

        def extrapolate(self, out, ref, mem, prev, coeffs):
            ops = [raw(x) for x in (out, ref, mem)]
            del out, ref, mem, prev
            self.go = threading.Event()
            def work():
                self.go.wait()
                CpuBackend.extrapolate(self, *ops, None, coeffs)
            self.worker = threading.Thread(target=work)
            self.worker.start()
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C while the worker is busy
            self.worker.join()
            return True

        def close(self):
            if getattr(self, "worker", None) is not None:
                self.go.set()
                self.worker.join()
            super().close()

    moxkit.engine.stream.get_backend = lambda device, **options: SlowWorkerBackend()
    main(sys.argv[1:])
    """
)


def test_ctrl_c_while_a_worker_computes_releases_nothing_early(models):
    root, _, _ = models
    cmd = [sys.executable, "-c", SLOW_WORKER, *map(str, args(root, root / "out"))]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 130, (result.returncode, result.stderr)
    assert one_line(result.stderr) == "moxkit: interrupted"
    assert beside(root) == ["mem.safetensors", "ref.safetensors"]


@pytest.mark.skipif(os.geteuid() != 0, reason="bind mounts need root")
def test_output_reaching_an_input_through_a_bind_mount_is_refused(cli, models, tmp_path_factory):
    root, _, _ = models
    mount = tmp_path_factory.mktemp("mnt")
    made = subprocess.run(["mount", "--bind", str(root), str(mount)], capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot make a bind mount here: {made.stderr.decode().strip()}")
    try:
        for out in (mount / "ref.safetensors", mount):
            result = cli(*args(root, out, "--force"))
            assert result.code == 1 and "the output would" in one_line(result.err), out
        assert load_file(root / "ref.safetensors")
    finally:
        subprocess.run(["umount", str(mount)], check=True)


TRUNCATE_AT = textwrap.dedent(
    """
    # Another process truncates REF while a run reads it: at `point`, REF is cut to its
    # header, so mapped windows and reads reach past its end.
    import os, sys
    from moxkit import atomic
    from moxkit.cli.main import main

    point, ref = sys.argv[1], sys.argv[3]
    def truncate(reached):
        if reached == point:
            atomic.HOOK = None
            with open(ref, "rb") as f:
                size = 8 + int.from_bytes(f.read(8), "little")
            os.truncate(ref, size)
    atomic.HOOK = truncate
    main(sys.argv[2:])
    """
)


@pytest.mark.parametrize("point", ["staging", "read", "computed"])
def test_input_truncated_mid_run_ends_in_one_line(models, point):
    root, _, _ = models
    cmd = [sys.executable, "-c", TRUNCATE_AT, point, *map(str, args(root, root / "out"))]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, (result.returncode, result.stderr)
    line = one_line(result.stderr)
    assert line.startswith("moxkit: error: ") and "ref.safetensors" in line, line
    assert beside(root) == ["mem.safetensors", "ref.safetensors"]
