"""Forget adapters. When θ_mem is a LoRA adapter on a base θ_ref, θ_mem = θ_ref + s·B·A for
every adapted module (s = lora_alpha/r, or lora_alpha/√r with rsLoRA), so the MOX forget model
θ_for = (1+α)·θ_ref − α·θ_mem = θ_ref − α·s·B·A is itself a LoRA adapter on the untouched base,
a few MB that PEFT, vLLM or any multi-LoRA server applies.

The factor −α is folded into the scaling (lora_alpha and alpha_pattern times −α), not into B:
the factor bytes are copied unchanged, so the forget adapter is exact in whatever dtype the
adapter was saved (multiplying a bf16 B by −α would round it again, to 8 bits; even in fp32 it
would add a rounding), and writing it costs one copy of the factors. Momentum and --rank
write the low-rank sums of moxkit.adapters.lowrank; --merge hands them to
moxkit.adapters.merge."""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .. import __version__
from ..atomic import check_output, staged_dir
from ..engine.checkpoint import FileReader, TensorInfo, open_checkpoint
from ..engine.formula import PAPER_ETA, check_alpha, check_eta
from ..engine.options import EngineOptions, alpha_and_out
from ..engine.stream import memory_budget
from ..engine.writer import OutputTensor, ShardWriter, layout
from ..errors import InputError
from .lowrank import (
    AdapterReport,
    _attach_errors,
    _check_budget,
    _check_low_rank,
    _combine,
    _combine_bytes,
    _combine_parts,
    _factor_elems,
    _LowRank,
    _pad_rank,
    _raw_factors,
    _scan_bytes,
)
from .merge import _check_merge_budget, _merge
from .read import (
    CONFIG_NAME,
    COPY_CHUNK_BYTES,
    KEY_PREFIX,
    WEIGHTS_NAME,
    Adapter,
    _check_against_base,
    _folded_config,
    _matchers,
    _read_array,
    _scaling,
    is_adapter_dir,
    open_adapter,
)


def write_forget_adapter(
    source,
    alpha: float,
    out: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    options: EngineOptions | None = None,
    **overrides,
) -> AdapterReport:
    """The forget adapter of a LoRA-trained θ_mem: θ_ref − α·s·B·A, as a PEFT adapter folder.

    `source` is an adapter folder or an in-memory PEFT model (what `train-mem --lora` trains;
    it is saved to a temporary folder first). With `base` (the model the adapter was trained
    on), every adapted weight is checked against it, and adapters carrying full tensors
    (modules_to_save) are accepted when those equal the base; without it they are refused.
    Factors with NaN or inf, or whose product s·B·A (or α·s·B·A) may overflow float32, are
    refused unless `allow_nonfinite`; a dry run reads and checks them as the run does. Of the
    EngineOptions (`options`, or its fields as keywords) it uses max_memory, force, fsync,
    allow_nonfinite and dry_run."""
    options = EngineOptions.of(options, overrides, "write_forget_adapter")
    if hasattr(source, "peft_config") and hasattr(source, "save_pretrained"):
        with tempfile.TemporaryDirectory(prefix="moxkit-adapter-") as tmp:
            source.save_pretrained(tmp, safe_serialization=True)
            return write_forget_adapter(tmp, alpha, out, base=base, options=options)
    alpha = check_alpha(alpha)
    budget = memory_budget(options.max_memory)
    adapter = open_adapter(source)
    out = check_output(out, force=options.force, inputs=[adapter.path] + ([base] if base else []))
    base_ckpt = open_checkpoint(base) if base is not None else None
    _check_budget(budget, _scan_bytes([adapter], base_ckpt), "read and copy the adapter")
    reader = FileReader()
    try:
        if base_ckpt is not None:
            _check_against_base(adapter, base_ckpt, reader)
        elif adapter.full:
            raise InputError(
                f"{adapter.path}: holds full tensors (modules_to_save); give the base model "
                "to check them against"
            )
        config = _folded_config(adapter.config, alpha)
        if not options.allow_nonfinite:
            for m in adapter.modules.values():
                b, a = _read_array(reader, m.b), _read_array(reader, m.a)
                _check_low_rank(adapter.path, m.name, b, a, max(1.0, alpha) * abs(m.scaling))
        report = AdapterReport(
            out=out,
            kind="forget adapter",
            formula=f"BASE − {alpha:g}·s·B·A (the adapter's factors, lora_alpha × −{alpha:g})",
            n_modules=len(adapter.modules),
            rank=max(m.rank for m in adapter.modules.values()),
            bytes_written=adapter.total_bytes,
            dry_run=options.dry_run,
        )
        if options.dry_run:
            return report
        metadata = _provenance(alpha, None, [adapter.path], base, "folded: lora_alpha *= -alpha")
        tensors = list(adapter.checkpoint.tensors.values())
        started = time.perf_counter()
        named = [(t.name, t) for t in tensors]
        report.bytes_written = _write_adapter(out, options, config, metadata, named, reader)
        report.seconds = time.perf_counter() - started
        return report
    finally:
        reader.close()


def momentum_weights(n: int, eta: float) -> list[float]:
    """w_k = η(1−η)^(n−k), k = 1..n (oldest first): unrolling θ_for ← η·[(1+α)θ_ref − αθ_mem^k]
    + (1−η)·θ_for from θ_for⁰ = θ_ref gives θ_for = θ_ref − α·Σ_k w_k·(θ_mem^k − θ_ref)."""
    return [eta * (1.0 - eta) ** (n - k) for k in range(1, n + 1)]


def momentum_forget_adapter(
    snapshots: Sequence[str | os.PathLike],
    alpha: float,
    out: str | os.PathLike,
    *,
    eta: float = PAPER_ETA,
    rank: int | None = None,
    base: str | os.PathLike | None = None,
    options: EngineOptions | None = None,
    **overrides,
) -> AdapterReport:
    """MOX-Mo over adapter snapshots (oldest first): θ_ref − α·Σ_k w_k·s_k·B_k·A_k, one adapter
    of concatenated rank, or of rank `rank` by a truncated SVD (error in the report). Options
    as write_forget_adapter's."""
    options = EngineOptions.of(options, overrides, "momentum_forget_adapter")
    alpha, eta = check_alpha(alpha), check_eta(eta)
    if not snapshots:
        raise InputError("snapshots: no adapter snapshots given", params=("snapshots",))
    adapters = [open_adapter(p) for p in snapshots]
    terms = list(zip(momentum_weights(len(adapters), eta), adapters, strict=True))
    formula = f"BASE − {alpha:g}·Σ_k w_k·s_k·B_k·A_k over {len(adapters)} snapshots, η = {eta:g}"
    inputs = [a.path for a in adapters]
    return _write_combined(terms, alpha, eta, rank, out, base, formula, inputs, options)


def extrapolate_adapter(
    base: str | os.PathLike,
    adapter: str | os.PathLike,
    alpha: float,
    out: str | os.PathLike,
    *,
    prev: str | os.PathLike | None = None,
    eta: float = PAPER_ETA,
    rank: int | None = None,
    merge: bool = False,
    options: EngineOptions | None = None,
    **overrides,
) -> AdapterReport:
    """`moxkit extrapolate BASE ADAPTER`: the forget adapter of a LoRA θ_mem, or with `merge`
    the full forget model streamed out of core.

    With prev=PREV (an earlier forget adapter, or BASE itself for the first tick), OUT =
    η·[(1+α)·BASE − α·θ_mem] + (1−η)·PREV, still low-rank: PREV's factors weighted by 1−η
    beside the new ones weighted by η. `rank` re-compresses the sum by a truncated SVD.
    `options` (EngineOptions, or its fields as keywords) as for moxkit.extrapolate; dtype,
    device, max_gpu_memory, max_shard_size and progress apply to `merge` only."""
    alpha, out = alpha_and_out(alpha, out, "extrapolate_adapter")
    options = EngineOptions.of(options, overrides, "extrapolate_adapter")
    alpha = check_alpha(alpha)
    if prev is None and rank is None and not merge:
        if options.dtype is not None:
            raise InputError(
                "dtype applies to merge=True; a forget adapter keeps the factors' dtype",
                params=("dtype", "merge"),
            )
        return write_forget_adapter(adapter, alpha, out, base=base, options=options)
    budget = memory_budget(options.max_memory)
    new = open_adapter(adapter)
    if prev is None:
        terms, eta_used = [(1.0, new)], None
        formula = f"BASE − {alpha:g}·s·B·A"
    else:
        eta_used = check_eta(eta)
        terms = [(eta_used, new)]
        if Path(prev).resolve() != Path(base).resolve():
            if not is_adapter_dir(prev):
                raise InputError(
                    f"{prev}: with an adapter as MEM, prev must be an earlier "
                    "forget adapter, or BASE itself for the first tick",
                    params=("prev",),
                )
            terms.insert(0, (-(1.0 - eta_used) / alpha, open_adapter(prev)))
        formula = f"{eta_used:g}·[BASE − {alpha:g}·s·B·A] + {1 - eta_used:g}·PREV"
    inputs = [t[1].path for t in terms]
    if not merge:
        if options.dtype is not None:
            raise InputError(
                "dtype applies to merge=True; forget adapters are written in fp32",
                params=("dtype", "merge"),
            )
        return _write_combined(terms, alpha, eta_used, rank, out, base, formula, inputs, options)
    base_ckpt = open_checkpoint(base)
    single = len(terms) == 1 and rank is None  # PEFT's merge of the forget adapter, op for op
    parts = _combine_parts(terms, rank)
    if single:
        held, transient = sum(4 * _factor_elems(m) for m in new.modules.values()), 0
    else:
        held, transient = _combine_bytes(parts, rank)
    _check_merge_budget(budget, held, transient, [t[1] for t in terms], base_ckpt)
    reader = FileReader()
    try:
        for _, found in terms:
            _check_against_base(found, base_ckpt, reader)
        if single:
            folded = _folded_config(new.config, alpha)
            patterns = _matchers(new.path / CONFIG_NAME, folded)
            scale: float | dict[str, float] = {
                n: _scaling(folded, n, patterns) for n in new.modules
            }
            combined, errors = _raw_factors(new, reader, scale, options.allow_nonfinite), {}
        else:
            combined, errors = _combine(parts, alpha, rank, reader, options.allow_nonfinite)
            scale = -alpha
    finally:
        reader.close()
    report = _merge(base_ckpt, combined, scale, Path(out), formula, inputs, options)
    _attach_errors(report, errors)
    return report


def _write_combined(
    terms: list[tuple[float, Adapter]],
    alpha: float,
    eta: float | None,
    rank: int | None,
    out: str | os.PathLike,
    base: str | os.PathLike | None,
    formula: str,
    inputs: list[Path],
    options: EngineOptions,
) -> AdapterReport:
    """θ_ref − α·Σ weight·s·B·A over the terms as one adapter (scaling −α, blocks weighted)."""
    budget = memory_budget(options.max_memory)
    out = check_output(out, force=options.force, inputs=inputs + ([base] if base else []))
    parts = _combine_parts(terms, rank)
    base_ckpt = open_checkpoint(base) if base is not None else None
    held, transient = _combine_bytes(parts, rank)
    scan = _scan_bytes([t[1] for t in terms], base_ckpt)
    _check_budget(budget, held + max(transient, scan), "combine the adapters")
    reader = FileReader()
    try:
        newest = terms[-1][1]
        full = newest.full
        if base_ckpt is not None:
            for _, found in terms:
                _check_against_base(found, base_ckpt, reader)
        elif any(found.full for _, found in terms):
            raise InputError(
                f"{newest.path}: holds full tensors (modules_to_save); give the base model "
                "to check them against"
            )
        combined, errors = _combine(parts, alpha, rank, reader, options.allow_nonfinite)
        out_rank = max(c.a.shape[0] for c in combined.values())
        config = _combined_config(newest.config, combined, out_rank, alpha)
        named: list[tuple[str, TensorInfo | np.ndarray]] = [(k, v) for k, v in full.items()]
        for name, c in sorted(combined.items()):
            b, a = _pad_rank(c.b, c.a, out_rank)
            kind = "lora_embedding_" if c.module.embedding else "lora_"
            suffix = "" if c.module.embedding else ".weight"
            named += [
                (f"{KEY_PREFIX}{name}.{kind}A{suffix}", np.ascontiguousarray(a, np.float32)),
                (f"{KEY_PREFIX}{name}.{kind}B{suffix}", np.ascontiguousarray(b, np.float32)),
            ]
        report = AdapterReport(
            out=out,
            kind="forget adapter",
            formula=formula,
            n_modules=len(combined),
            rank=out_rank,
            bytes_written=sum(_nbytes(v) for _, v in named),
            dry_run=options.dry_run,
        )
        _attach_errors(report, errors)
        if options.dry_run:
            return report
        started = time.perf_counter()
        metadata = _provenance(alpha, eta, inputs, base, formula)
        report.bytes_written = _write_adapter(out, options, config, metadata, named, reader)
        report.seconds = time.perf_counter() - started
        return report
    finally:
        reader.close()


def _combined_config(
    template: dict, combined: dict[str, _LowRank], rank: int, alpha: float
) -> dict:
    """The newest adapter's config with one rank, scaling −α (lora_alpha = −α·r, no rsLoRA),
    and the modules listed by name."""
    config = dict(template)
    config.update(
        r=rank,
        lora_alpha=-alpha * rank,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        target_modules=sorted(combined),
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
    )
    return config


def _provenance(
    alpha: float, eta: float | None, inputs: list[Path], base, how: str
) -> dict[str, str]:
    meta = {
        "format": "pt",
        "moxkit_version": __version__,
        "moxkit_alpha": repr(alpha),
        "moxkit_adapters": json.dumps([str(p.resolve()) for p in inputs]),
        "moxkit_formula": how,
    }
    if base is not None:
        meta["moxkit_base"] = str(Path(base).resolve())
    if eta is not None:
        meta["moxkit_eta"] = repr(eta)
    return meta


def _nbytes(value: TensorInfo | np.ndarray) -> int:
    return value.nbytes


def _write_adapter(
    out: Path,
    options: EngineOptions,
    config: dict,
    metadata: dict[str, str],
    named: list[tuple[str, TensorInfo | np.ndarray]],
    reader: FileReader,
) -> int:
    """adapter_config.json + adapter_model.safetensors; tensors from input byte ranges
    (copied as they are) or fp32 arrays."""
    outputs = [
        OutputTensor(
            name, v.dtype if isinstance(v, TensorInfo) else "F32", tuple(v.shape), v.nbytes
        )
        for name, v in named
    ]
    (shard,) = layout([outputs], metadata, [WEIGHTS_NAME])
    try:  # strict JSON: the checks above leave no NaN or inf in a config moxkit writes
        text = json.dumps(config, indent=2, sort_keys=True, allow_nan=False) + "\n"
    except ValueError as exc:
        raise InputError(f"{out}: the forget adapter's config is not strict JSON ({exc})") from None
    with staged_dir(out, force=options.force, fsync=options.fsync) as tmp:
        writer = ShardWriter([shard], [tmp / shard.filename])
        try:
            for name, value in named:
                if isinstance(value, np.ndarray):
                    writer.write(name, 0, memoryview(value).cast("B"))
                    continue
                for start in range(0, value.nbytes, COPY_CHUNK_BYTES):
                    buf = bytearray(min(COPY_CHUNK_BYTES, value.nbytes - start))
                    reader.read_into(value.file, value.start + start, memoryview(buf))
                    writer.write(name, start, memoryview(buf))
        finally:
            writer.close()
        (tmp / CONFIG_NAME).write_text(text)
    return shard.file_size + len(text.encode())
