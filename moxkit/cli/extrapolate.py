"""`moxkit extrapolate`: parse, call moxkit.extrapolate, print."""

from __future__ import annotations

import click

from moxkit.cli.options import config_from, options_from, output_options, quiet_option
from moxkit.engine.options import EngineOptions
from moxkit.errors import MoxError


@click.command("extrapolate")
@click.argument("ref", type=click.Path(path_type=str))
@click.argument("mem", type=click.Path(path_type=str))
@click.option("--alpha", "-a", type=float, required=True, help="Extrapolation strength α > 0.")
@output_options
@click.option(
    "--prev",
    type=click.Path(path_type=str),
    default=None,
    help="Previous forget model PREV: OUT = η·[(1+α)·REF − α·MEM] + (1−η)·PREV.",
)
@click.option(
    "--momentum",
    type=click.Path(path_type=str),
    default=None,
    hidden=True,
    help="Deprecated name of --prev.",
)
@click.option(
    "--eta",
    type=float,
    default=None,
    help="Weight η of the newest extrapolation (with --prev; default: the paper's).",
)
@options_from(EngineOptions)
@click.option(
    "--revision",
    default=None,
    help="Branch, tag or commit for REF/MEM/PREV given as hub ids (org/name[@rev] also works).",
)
@quiet_option
# -- LoRA forget adapters (moxkit.adapters): options for MEM a PEFT adapter folder --
@click.option(
    "--merge",
    is_flag=True,
    help="MEM a LoRA adapter: write the full forget model (merged into REF), not an adapter.",
)
@click.option(
    "--rank",
    type=int,
    default=None,
    help="MEM a LoRA adapter: re-compress the forget adapter to this rank (truncated SVD).",
)
# -- end LoRA options --
def command(ref, mem, alpha, out, prev, momentum, eta, quiet, revision, merge, rank, **kw) -> None:
    """Forget model OUT = (1+α)·REF − α·MEM, streamed out of core.

    REF and MEM (and PREV) are .safetensors files or Hugging Face model directories, sharded
    or not; tensors are matched by name. Arithmetic in fp32, one round-to-nearest-even. OUT
    is a model directory, or a single file if it ends in .safetensors."""
    from moxkit.adapters import is_adapter_dir
    from moxkit.engine.dtypes import parse_dtype
    from moxkit.engine.formula import PAPER_ETA, check_alpha, check_eta
    from moxkit.engine.stream import extrapolate
    from moxkit.sources import resolve_model
    from moxkit.units import parse_size

    if momentum is not None:
        if prev is not None:
            raise MoxError("--momentum is the old name of --prev: pass only --prev")
        click.echo("moxkit: note: --momentum is deprecated; use --prev", err=True)
        prev = momentum
    if prev is None and eta is not None:
        raise MoxError("--eta only applies with --prev PREV")
    # refused before REF and MEM are resolved (a hub id may mean a download); the messages
    # name the API parameters, which main's error handler shows as flags
    check_alpha(alpha)
    if eta is not None:
        check_eta(eta)
    options = config_from(EngineOptions, kw, force=kw.pop("force"), progress=not quiet)
    parse_dtype(options.dtype)
    for name in ("max_memory", "max_shard_size", "max_gpu_memory"):
        if getattr(options, name) is not None:
            parse_size(getattr(options, name), name)
    ref, mem = resolve_model(ref, revision), resolve_model(mem, revision)
    prev = resolve_model(prev, revision) if prev is not None else None
    # -- LoRA forget adapters: MEM a PEFT adapter folder -> moxkit.adapters --
    lora = {}
    if is_adapter_dir(mem):
        from moxkit.adapters import extrapolate_adapter as extrapolate

        lora = {"merge": merge, "rank": rank}
    elif merge or rank is not None:
        raise MoxError("--merge and --rank apply when MEM is a LoRA adapter folder")
    # -- end LoRA --
    eta = PAPER_ETA if eta is None else eta
    report = extrapolate(ref, mem, alpha, out, prev=prev, eta=eta, options=options, **lora)
    if options.dry_run:
        click.echo(report.plan_text())
    if report.nonfinite_tensors:
        click.echo(
            f"warning: non-finite values kept in {len(report.nonfinite_tensors)} tensors "
            f"(first: {report.nonfinite_tensors[0]!r})",
            err=True,
        )
    if not quiet or options.dry_run:
        click.echo(report.summary())
