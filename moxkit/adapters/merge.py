"""The streamed merge: BASE + s·B·A written as a full model for servers without LoRA. It is a
producer in the engine's one output pipeline (moxkit.engine.stream.write_output: the planned
layout, staged atomic output, index, carried files, model card, progress, one-line errors):
each adapted weight is produced in row tiles, W_tile + s·(B_rows·A) in fp32 on the CPU or CUDA
(torch), one rounding to the output dtype, under the same memory budget as
`moxkit extrapolate`; the other tensors are copied (or converted to the output dtype)."""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

from .. import __version__
from ..atomic import check_output
from ..engine.backends import device_of
from ..engine.checkpoint import Checkpoint, FileReader, TensorInfo, open_checkpoint
from ..engine.dtypes import ARITHMETIC_CODES, SIZES, TABLE, parse_dtype
from ..engine.options import EngineOptions
from ..engine.stream import (
    OutputPlan,
    changed_input,
    fit_elems,
    gpu_options,
    memory_budget,
    nonfinite,
    plan_output,
    write_output,
)
from ..engine.writer import OutputTensor, ShardWriter
from ..errors import InputError
from ..progress import ByteProgress
from ..units import parse_size
from .lowrank import (
    AdapterReport,
    _check_budget,
    _factor_elems,
    _LowRank,
    _raw_factors,
    _scan_bytes,
)
from .read import COPY_CHUNK_BYTES, Adapter, _check_against_base, _orientation, open_adapter

MAX_TILE_ELEMS = 8 << 20
MIN_TILE_ELEMS = 64 * 1024


def merge_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    out: str | os.PathLike,
    *,
    options: EngineOptions | None = None,
    **overrides,
) -> AdapterReport:
    """BASE + s·B·A for every module of `adapter` (a forget adapter, or any LoRA adapter),
    streamed into a full model folder as save_pretrained writes it: what PEFT's
    merge_and_unload gives, without holding the model in memory. `options` as for
    moxkit.extrapolate, except that without them no progress bar is shown."""
    options = EngineOptions.of(options or EngineOptions(progress=False), overrides, "merge_adapter")
    base_ckpt = open_checkpoint(base)
    found = open_adapter(adapter)
    held = sum(4 * _factor_elems(m) for m in found.modules.values())
    _check_merge_budget(memory_budget(options.max_memory), held, 0, [found], base_ckpt)
    scales = {name: m.scaling for name, m in found.modules.items()}
    reader = FileReader()
    try:
        _check_against_base(found, base_ckpt, reader)
        combined = _raw_factors(found, reader, scales, options.allow_nonfinite)
    finally:
        reader.close()
    return _merge(base_ckpt, combined, scales, Path(out), "BASE + s·B·A", [found.path], options)


def _merge(
    base: Checkpoint,
    combined: dict[str, _LowRank],
    scale: float | dict[str, float],
    out: Path,
    formula: str,
    inputs: list[Path],
    options: EngineOptions,
) -> AdapterReport:
    """Write BASE's tensors through the engine's output pipeline, adapted weights as
    W + scale·B·A computed in row tiles."""
    out_dtype = parse_dtype(options.dtype)
    shard_limit = parse_size(options.max_shard_size, "max_shard_size")
    gpu_budget = gpu_options(options.max_gpu_memory).get("max_gpu_memory")
    out = check_output(out, force=options.force, inputs=[base.path, *inputs])
    by_weight = {c.module.weight_name: c for c in combined.values()}
    outputs = []
    for name, info in base.tensors.items():
        code = out_dtype if (out_dtype and info.dtype in ARITHMETIC_CODES) else info.dtype
        if name in by_weight and info.dtype not in ARITHMETIC_CODES:
            raise InputError(
                f"{info.file}: tensor {name!r} is {info.dtype}; merging needs F32/F16/BF16"
            )
        outputs.append(OutputTensor(name, code, info.shape, info.numel * SIZES[code]))
    metadata = _merge_metadata(formula, inputs, base)
    plan = plan_output(out, outputs, metadata, base, out_dtype, shard_limit, options)
    report = AdapterReport(
        out=plan.out,
        kind="merged model",
        formula=formula,
        n_modules=len(by_weight),
        rank=max((c.a.shape[0] for c in combined.values()), default=0),
        bytes_written=plan.bytes_written,
        dry_run=options.dry_run,
        n_copied=len(base.tensors) - len(by_weight),
    )
    if options.dry_run:
        return report
    import torch  # the merge's arithmetic; the adapter paths above never import it

    target = torch.device(device_of(options.device, triton=False))
    report.device = target.type
    started = time.perf_counter()
    producer = _LowRankProducer(plan, base, by_weight, scale, target, gpu_budget, report, torch)
    tensor_bytes = sum(t.nbytes for shard in plan.shards for t in shard.tensors)
    write_output(plan, producer, tensor_bytes, desc="merge")  # the bar counts tensor bytes
    report.seconds = time.perf_counter() - started
    return report


class _LowRankProducer:
    """The merge's tensors for write_output, in the plan's order: BASE's tensors copied (or
    converted to the output dtype), adapted weights merged tile by tile (_TileMerge), under
    the engine's non-finite policy."""

    def __init__(
        self,
        plan: OutputPlan,
        base: Checkpoint,
        by_weight: dict[str, _LowRank],
        scale: float | dict[str, float],
        target,  # torch.device
        gpu_budget: int | None,
        report: AdapterReport,
        torch,
    ):
        self.plan, self.base, self.by_weight, self.scale = plan, base, by_weight, scale
        self.target, self.gpu_budget, self.report, self.torch = target, gpu_budget, report, torch

    def __call__(self, writer: ShardWriter, bar: ByteProgress) -> None:
        torch, reader = self.torch, FileReader()
        try:
            with _full_fp32_matmul(torch):
                tile_elems = _tile_elems(self.plan.budget)
                if self.target.type == "cuda" and self.gpu_budget:  # fp32 tile, product, output
                    tile_elems = max(1024, min(tile_elems, self.gpu_budget // 16))
                for t in (t for s in self.plan.shards for t in s.tensors):
                    info = self.base.tensors[t.name]
                    low = self.by_weight.get(t.name)
                    if low is None:
                        _copy_tensor(reader, writer, info, t.dtype, tile_elems, torch)
                    else:
                        scale = self.scale
                        s = scale[low.module.name] if isinstance(scale, dict) else scale
                        transposed = _orientation(low.module, info)
                        merge = _TileMerge(low, s, transposed, self.target, torch)
                        if not merge.run(reader, writer, info, t.dtype, tile_elems):
                            nonfinite(t.name, self.plan.options, self.report.nonfinite_tensors)
                    bar.update(t.nbytes)
        finally:
            reader.close()


@contextlib.contextmanager
def _full_fp32_matmul(torch):
    """True fp32 products on CUDA (no TF32, whatever the process set before)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


def _merge_metadata(formula: str, inputs: list[Path], base: Checkpoint) -> dict[str, str]:
    return {
        "format": "pt",
        "moxkit_version": __version__,
        "moxkit_formula": formula,
        "moxkit_base": str(base.path.resolve()),
        "moxkit_adapters": json.dumps([str(p.resolve()) for p in inputs]),
    }


def _tile_elems(budget: int | None) -> int:
    """Elements per tile: each costs its input bytes, an fp32 copy, the fp32 product and the
    output (≤ 16 bytes), from what the budget leaves after what the process already holds."""
    if budget is None:
        return MAX_TILE_ELEMS
    return fit_elems(budget, 16, MAX_TILE_ELEMS, "max_memory", least=MIN_TILE_ELEMS)


def _read(reader: FileReader, info: TensorInfo, offset: int, buf: memoryview) -> None:
    """BASE's bytes at `offset` of `info`; a failing read names the input, as the engine's do
    (write_output would take an OSError for the output's)."""
    try:
        reader.read_into(info.file, info.start + offset, buf)
    except OSError as exc:
        raise changed_input(info.file, exc) from None


def _load_rows(reader: FileReader, info: TensorInfo, row0: int, rows: int, torch):
    cols = info.numel // info.shape[0] if info.shape and info.shape[0] else 0
    raw = bytearray(rows * cols * info.itemsize)
    _read(reader, info, row0 * cols * info.itemsize, memoryview(raw))
    return torch.frombuffer(raw, dtype=getattr(torch, TABLE[info.dtype].torch)).view(rows, cols)


class _TileMerge:
    """W + scale·(B·A), or W + scale·(B·A)ᵀ, tile by tile of rows, in PEFT's op order: the
    product in fp32, times the scaling, added to W in fp32, then one rounding to the output."""

    def __init__(self, low: _LowRank, scale: float, transposed: bool, target, torch):
        b = torch.from_numpy(low.b).to(target)
        a = torch.from_numpy(low.a).to(target)
        self.left, self.right = (a.T, b.T) if transposed else (b, a)  # (B·A)ᵀ = Aᵀ·Bᵀ
        self.scale, self.target, self.torch = scale, target, torch

    def run(self, reader, writer, info: TensorInfo, out_code: str, tile_elems: int) -> bool:
        """Write the merged tensor; False if any value is non-finite."""
        torch = self.torch
        rows, cols = info.shape
        step = max(1, tile_elems // max(cols, 1))
        out_type = getattr(torch, TABLE[out_code].torch)
        finite = True
        for row0 in range(0, rows, step):
            n = min(step, rows - row0)
            w = _load_rows(reader, info, row0, n, torch).to(self.target, torch.float32)
            delta = self.left[row0 : row0 + n] @ self.right
            delta.mul_(self.scale)
            w.add_(delta)
            del delta
            finite &= bool(torch.isfinite(w).all())
            result = w.to(out_type).cpu().contiguous()
            writer.write(info.name, row0 * cols * SIZES[out_code], _bytes_of(result, torch))
        return finite


def _copy_tensor(reader, writer, info: TensorInfo, out_code: str, tile_elems: int, torch) -> None:
    """Unadapted tensors: bytes copied, or (with a dtype) converted chunk by chunk; a chunk
    costs what a tile may (16 bytes an element)."""
    if out_code == info.dtype:
        chunk = min(COPY_CHUNK_BYTES, 16 * tile_elems)
        for start in range(0, info.nbytes, chunk):
            buf = bytearray(min(chunk, info.nbytes - start))
            _read(reader, info, start, memoryview(buf))
            writer.write(info.name, start, memoryview(buf))
        return
    flat = TensorInfo(info.name, info.dtype, (info.numel, 1), info.file, info.start, info.nbytes)
    out_type = getattr(torch, TABLE[out_code].torch)
    for row0 in range(0, info.numel, tile_elems):
        n = min(tile_elems, info.numel - row0)
        chunk = _load_rows(reader, flat, row0, n, torch).to(out_type).contiguous()
        writer.write(info.name, row0 * SIZES[out_code], _bytes_of(chunk, torch))


def _bytes_of(t, torch) -> memoryview:
    return memoryview(t.view(torch.uint8).numpy()).cast("B")


def _check_merge_budget(
    budget: int | None, held: int, transient: int, found: list[Adapter], base: Checkpoint
) -> None:
    """The merge's budget, checked before any factor is read, the same in a dry run: torch
    (imported first, as the merge needs it), the factors it holds, the larger of reading them
    and the smallest tile (64 Ki elements, 16 bytes each) or copy chunk."""
    if budget is None:
        return
    import torch  # noqa: F401  (what the real merge holds before its first tile)

    scan = _scan_bytes(found, base)
    _check_budget(budget, held + max(transient, scan, 16 * MIN_TILE_ELEMS), "merge the adapter")
