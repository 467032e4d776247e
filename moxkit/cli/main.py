"""The `moxkit` command group. Subcommands are imported only when run, so `moxkit --help`
is instant and one command's heavy imports never slow another."""

from __future__ import annotations

import importlib
import os
import re
import signal
import sys

# numpy's OpenBLAS starts a thread per core at import and they spin for a while after: 0.1-0.25 s
# of CPU per `moxkit extrapolate` on 2 cores, competing with the pipeline (measured by the issue
# 14 work). moxkit's only numpy linear algebra is the adapters' rank-sized QR/SVD; torch uses MKL.
# A user's own setting wins.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import click  # noqa: E402

from moxkit import __version__, atomic  # noqa: E402
from moxkit.errors import MoxError  # noqa: E402
from moxkit.extras import missing_extra  # noqa: E402

# command name -> module in moxkit.cli that defines a click command called `command`
COMMANDS = {
    "extrapolate": ("extrapolate", "Forget model = (1+α)·REF − α·MEM, streamed out of core."),
    "train-mem": ("train_mem", "Train the memorization model θ_mem."),
    "unlearn": ("unlearn", "Unlearn end to end: MOX or a baseline."),
    "eval": ("evaluate", "TOFU- and MUSE-style metrics of a model."),
    "data": ("data", "Built-in data sets (tofu-mini)."),
    "demo": ("demo", "The whole MOX story on a built-in default, on a CPU."),
    "sweep": ("sweep", "Scan α: evaluate the forget model at several α."),
    "model": ("model", "A real pretrained model from a pip package, as a Hugging Face folder."),
}


class LazyGroup(click.Group):
    running: click.Command | None = None  # the subcommand of this run, for error messages

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"moxkit.cli.{COMMANDS[name][0]}")
        self.running = module.command
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, help_) in COMMANDS.items()]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="moxkit")
def cli() -> None:
    """moxkit: machine unlearning by model extrapolation (MOX)."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors become one line on stderr and exit code 1; Ctrl-C and
    SIGTERM end in one line and exit code 130, after every cleanup has run. As the process's
    entry point (argv None), once the outcome is decided the process only exits: a signal
    arriving during interpreter shutdown is ignored rather than turned into a traceback or a
    death by signal after the work is done."""
    published = len(atomic.published)  # outputs completed before this command
    cli.running = None
    try:
        _run(argv, published)
    finally:
        if argv is None:
            for sig in (signal.SIGINT, signal.SIGTERM):
                signal.signal(sig, signal.SIG_IGN)


def _run(argv: list[str] | None, published: int) -> None:
    # reports are printed inside: settle() holds later signals; as the process's entry point
    # (argv None) the signals stay ignored after the block, never back to their defaults
    with atomic.interruptible(final=argv is None):
        try:
            code = cli.main(args=argv, standalone_mode=False)  # ctx.exit(n) returns n here
        except (click.exceptions.Abort, KeyboardInterrupt):
            atomic.settle()
            done = atomic.published[published:]
            done = f"; {done[-1]} was complete and is kept" if done else ""
            click.echo(one_line(f"moxkit: interrupted{done}"), err=True)
            sys.exit(130)
        except click.ClickException as exc:
            atomic.settle()
            exc.show()
            sys.exit(exc.exit_code)
        except MoxError as exc:
            atomic.settle()
            click.echo(one_line(f"moxkit: error: {for_cli(exc, cli.running)}"), err=True)
            sys.exit(1)
        except ModuleNotFoundError as exc:  # an optional part of moxkit not installed
            fix = missing_extra(exc)
            if fix is None:
                raise
            atomic.settle()
            click.echo(one_line(f"moxkit: error: {fix}"), err=True)
            sys.exit(1)
    if isinstance(code, int) and code != 0:
        sys.exit(code)


def for_cli(exc: MoxError, command: click.Command | None = None) -> str:
    """The message of `exc` as the CLI says it: each API parameter it names (exc.params)
    becomes the flag or argument that sets it. `name=True` becomes the flag, `name=value`
    the flag and the value, and the first bare `name` the flag; other occurrences of the word
    (a path, a tensor name, the noun) are left alone."""
    text = str(exc)
    known = flags(command) if exc.params else {}
    for param in exc.params:
        flag = known.get(param)
        if flag is None:
            continue
        name, put = re.escape(param), flag.replace("\\", "\\\\")
        text = re.sub(rf"(?<![\w.-]){name}=True\b", put, text)
        text = re.sub(rf"(?<![\w.-]){name}=(['\"]?)([^\s'\",;)]*)\1", put + r" \2", text)
        text = re.sub(rf"(?<![\w./'\"-]){name}(?![\w/'\"=-]|\.\w)", put, text, count=1)
    return text


def flags(command: click.Command | None = None) -> dict[str, str]:
    """API parameter name -> what sets it on the command line, read from the click commands
    themselves (options generated from the settings dataclasses, by moxkit.fields.flag_of,
    and the hand-written ones): their parameter names are the API's. `command`'s own come
    first; a parameter it lacks is looked up in the other commands."""
    table: dict[str, str] = {}
    commands = [importlib.import_module(f"moxkit.cli.{m}").command for m, _ in COMMANDS.values()]
    for cmd in ([command] if command is not None else []) + commands:
        for param in cmd.params:
            if param.name is not None and param.name not in table:
                table[param.name] = _shown_as(param)
    return table


def _shown_as(param: click.Parameter) -> str:
    if isinstance(param, click.Argument):
        return param.human_readable_name.upper()
    longs = [o for o in param.opts if o.startswith("--")]
    return (longs or param.opts)[0]


def one_line(text: str) -> str:
    """`text` as one printable line: line breaks, other control characters and characters
    that cannot be encoded (lone surrogates) are escaped, so a file or tensor name can never
    start a line of its own (and forge a second "moxkit: error:")."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text)


if __name__ == "__main__":
    main()
