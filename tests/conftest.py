"""Shared test setup. TRITON_INTERPRET must be set before Triton is first imported, so that the
Triton kernels run (slowly, exactly) on the CPU when there is no GPU."""

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from subprocess import PIPE

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a hard dependency
    _HAS_CUDA = False

if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# moxkit leaves alone a signal its parent ignored (`make test &` in a script ignores SIGINT):
# the tests that deliver signals need them live, here and in the processes they start
for _sig, _handler in (
    (signal.SIGINT, signal.default_int_handler),
    (signal.SIGTERM, signal.SIG_DFL),
):
    if signal.getsignal(_sig) is signal.SIG_IGN:
        signal.signal(_sig, _handler)


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@dataclass
class CliResult:
    code: int
    out: str
    err: str


class Cli:
    """Runs `moxkit ...` for tests. Calling it runs in process through click (fast; stdout
    and stderr captured by pytest); .run() and .popen() start a real process, for what needs
    one: signals, resource limits, peak RSS, environment variables read at import."""

    def __init__(self, capsys):
        self._capsys = capsys

    def __call__(self, *args) -> CliResult:
        from moxkit.cli.main import main

        self._capsys.readouterr()
        argv = [str(a) for a in args]
        if argv[:1] == ["extrapolate"] and not any(a.startswith("--max-memory") for a in argv):
            # the budget counts this process's RSS, which is pytest's (models of earlier tests
            # included); give the default 1 GiB on top of what the process already holds
            import psutil

            argv += ["--max-memory", str(psutil.Process().memory_info().rss + (1 << 30))]
        try:
            main(argv)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        captured = self._capsys.readouterr()
        return CliResult(code, captured.out, captured.err)

    @staticmethod
    def argv(*args) -> list[str]:
        return [sys.executable, "-m", "moxkit.cli.main", *map(str, args)]

    def popen(self, *args, env: dict | None = None, **kwargs) -> subprocess.Popen:
        full_env = {**os.environ, **(env or {})}
        return subprocess.Popen(
            self.argv(*args), env=full_env, stdout=PIPE, stderr=PIPE, text=True, **kwargs
        )

    def run(self, *args, env: dict | None = None, timeout: float = 120, **kwargs) -> CliResult:
        proc = self.popen(*args, env=env, **kwargs)
        out, err = proc.communicate(timeout=timeout)
        return CliResult(proc.returncode, out, err)


@pytest.fixture(scope="session", autouse=True)
def cpu_without_native_bf16():
    """The CPU as in-process tests see it: without native bf16, whatever CPU runs them, so
    that what depends on it (bf16 is refused, never a default there) is the same on every
    machine. Session-wide, so module fixtures that train see it too; the bf16 tests set the
    flags they need."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("moxkit.train.precision.cpu_flags", lambda: {"avx2", "avx512f"})
        yield


@pytest.fixture
def cli(capsys) -> Cli:
    return Cli(capsys)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Training tests on two shared cores: one torch thread per process is several times
    faster than two."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
