"""The entry point's exit codes: what a command asks for through click is what the shell sees."""

import click
import pytest

from moxkit.cli import main as cli_main


def test_ctx_exit_code_reaches_the_shell(monkeypatch):
    @click.command("exit-three")
    def exit_three() -> None:
        click.get_current_context().exit(3)

    monkeypatch.setattr(cli_main.cli, "get_command", lambda ctx, name: exit_three)
    with pytest.raises(SystemExit) as info:
        cli_main._run(["exit-three"], published=0)
    assert info.value.code == 3


def test_help_exits_zero(capsys):
    cli_main._run(["--help"], published=0)  # returns normally: exit status 0
    assert "extrapolate" in capsys.readouterr().out


@pytest.mark.parametrize("given, want", [(None, "1"), ("3", "3")])
def test_openblas_threads_default_to_one_unless_the_user_says(given, want):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    if given:
        env["OPENBLAS_NUM_THREADS"] = given
    code = "import moxkit.cli.main, os; print(os.environ['OPENBLAS_NUM_THREADS'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == want, out.stderr
