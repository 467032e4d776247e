"""`moxkit extrapolate`: parse, call moxkit.extrapolate, print."""

from __future__ import annotations

import click

from moxkit.errors import MoxError


@click.command("extrapolate")
@click.argument("ref", type=click.Path(path_type=str))
@click.argument("mem", type=click.Path(path_type=str))
@click.option("--alpha", "-a", type=float, required=True, help="Extrapolation strength α > 0.")
@click.option(
    "-o",
    "--out",
    required=True,
    type=click.Path(path_type=str),
    help="Output model directory (or a .safetensors file).",
)
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
@click.option(
    "--dtype",
    default=None,
    help="Output dtype of floating tensors: bf16, fp16, fp32 (default: REF's).",
)
@click.option(
    "--max-memory", default="1GiB", show_default=True, help="Peak resident memory of the process."
)
@click.option(
    "--max-shard-size",
    default="5GB",
    show_default=True,
    help="Largest output shard (decimal units, like transformers).",
)
@click.option(
    "--device", default="auto", show_default=True, help="cpu, cuda, or auto (CUDA when present)."
)
@click.option("--max-gpu-memory", default=None, help="GPU memory budget for --device cuda.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option(
    "--fsync",
    is_flag=True,
    help="Flush OUT to disk before reporting it written (survives a power loss; slower).",
)
@click.option("--allow-nonfinite", is_flag=True, help="Keep NaN/inf results instead of failing.")
@click.option("--dry-run", is_flag=True, help="Validate and print the plan; write nothing.")
@click.option(
    "--revision",
    default=None,
    help="Branch, tag or commit for REF/MEM/PREV given as hub ids (org/name[@rev] also works).",
)
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary line.")
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
def command(ref, mem, alpha, out, prev, momentum, eta, quiet, dry_run, **options) -> None:
    """Forget model OUT = (1+α)·REF − α·MEM, streamed out of core.

    REF and MEM (and PREV) are .safetensors files or Hugging Face model directories, sharded
    or not; tensors are matched by name. Arithmetic in fp32, one round-to-nearest-even."""
    from moxkit.adapters import is_adapter_dir
    from moxkit.engine.formula import PAPER_ETA
    from moxkit.engine.stream import extrapolate
    from moxkit.sources import resolve_model

    if momentum is not None:
        if prev is not None:
            raise MoxError("--momentum is the old name of --prev: pass only --prev")
        click.echo("moxkit: note: --momentum is deprecated; use --prev", err=True)
        prev = momentum
    if prev is None and eta is not None:
        raise MoxError("--eta only applies with --prev PREV")
    revision = options.pop("revision")
    ref, mem = resolve_model(ref, revision), resolve_model(mem, revision)
    prev = resolve_model(prev, revision) if prev is not None else None
    # -- LoRA forget adapters: MEM a PEFT adapter folder -> moxkit.adapters --
    lora = {"merge": options.pop("merge"), "rank": options.pop("rank")}
    if is_adapter_dir(mem):
        from moxkit.adapters import extrapolate_adapter as extrapolate

        options.update(lora)
    elif lora["merge"] or lora["rank"] is not None:
        raise MoxError("--merge and --rank apply when MEM is a LoRA adapter folder")
    # -- end LoRA --
    report = extrapolate(
        ref,
        mem,
        out,
        alpha,
        prev=prev,
        eta=PAPER_ETA if eta is None else eta,
        dry_run=dry_run,
        progress=not quiet,
        **options,
    )
    if dry_run:
        click.echo(report.plan_text())
    if report.nonfinite_tensors:
        click.echo(
            f"warning: non-finite values kept in {len(report.nonfinite_tensors)} tensors "
            f"(first: {report.nonfinite_tensors[0]!r})",
            err=True,
        )
    if not quiet or dry_run:
        click.echo(report.summary())
