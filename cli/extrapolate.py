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
    "--momentum",
    "prev",
    type=click.Path(path_type=str),
    default=None,
    help="Previous forget model PREV: OUT = η·[(1+α)·REF − α·MEM] + (1−η)·PREV.",
)
@click.option(
    "--eta",
    type=float,
    default=None,
    help="Weight of the newest extrapolation (with --momentum; default 0.675, the paper's).",
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
@click.option("--allow-nonfinite", is_flag=True, help="Keep NaN/inf results instead of failing.")
@click.option("--dry-run", is_flag=True, help="Validate and print the plan; write nothing.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar and no summary line.")
def command(
    ref,
    mem,
    alpha,
    out,
    prev,
    eta,
    dtype,
    max_memory,
    max_shard_size,
    device,
    max_gpu_memory,
    force,
    allow_nonfinite,
    dry_run,
    quiet,
) -> None:
    """Forget model OUT = (1+α)·REF − α·MEM, streamed out of core.

    REF and MEM (and PREV) are .safetensors files or Hugging Face model directories, sharded
    or not; tensors are matched by name. Arithmetic in fp32, one round-to-nearest-even."""
    from moxkit.stream import extrapolate

    if prev is None and eta is not None:
        raise MoxError("--eta only applies with --momentum PREV")
    report = extrapolate(
        ref,
        mem,
        out,
        alpha,
        momentum=prev,
        eta=0.675 if eta is None else eta,
        dtype=dtype,
        max_memory=max_memory,
        max_shard_size=max_shard_size,
        device=device,
        max_gpu_memory=max_gpu_memory,
        force=force,
        allow_nonfinite=allow_nonfinite,
        dry_run=dry_run,
        progress=not quiet,
    )
    if dry_run:
        click.echo(report.plan_text())
    if report.nonfinite_tensors:
        click.echo(
            f"warning: non-finite values kept in {len(report.nonfinite_tensors)} tensors "
            f"(first: {report.nonfinite_tensors[0]})",
            err=True,
        )
    if not quiet or dry_run:
        click.echo(report.summary())
