"""Low-rank sums over adapters: each module's Σ weight·s·B·A as one pair of fp32 factors
B_cat·A_cat, optionally re-compressed by a truncated SVD, with the checks (non-finite factors,
products past float32's range) and the memory budgets of computing them, checked before any
factor is read, the same way in a dry run.

Momentum (MOX-Mo) over K snapshots, θ_for = θ_ref − α·Σ_k w_k·s_k·B_k·A_k with
w_k = η(1−η)^(K−k), is such a sum: one adapter of concatenated rank, whose blocks w_k·s_k·B_k
are computed in fp64 and rounded once to fp32; optionally re-compressed to rank r by a
truncated SVD (QR of the stacked factors, SVD of the small core), with the approximation error
reported (Eckart–Young: the best rank-r error, in Frobenius norm)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from threadpoolctl import threadpool_limits

from ..engine.checkpoint import Checkpoint, FileReader
from ..engine.stream import RESERVED_BYTES  # the engine's slack, shared
from ..errors import InputError, MismatchError, ResourceError
from ..units import format_bytes, resident_bytes
from .read import COPY_CHUNK_BYTES, KEY_PREFIX, Adapter, LoraModule, _read_array

FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass
class AdapterReport:
    """What a run did (or, for a dry run, would do)."""

    out: Path
    kind: str  # "forget adapter" or "merged model"
    formula: str
    n_modules: int
    rank: int
    bytes_written: int
    seconds: float = 0.0
    dry_run: bool = False
    device: str = "cpu"
    n_copied: int = 0
    relative_errors: dict[str, float] = field(default_factory=dict)  # per module, with rank=
    overall_error: float | None = None  # ‖ΔW − ΔW_r‖_F / ‖ΔW‖_F over all modules together
    nonfinite_tensors: list[str] = field(default_factory=list)

    def summary(self) -> str:
        what = f"{self.n_modules} modules, rank {self.rank}"
        if self.kind == "merged model":
            what = f"{self.n_modules} weights merged, {self.n_copied} copied, on {self.device}"
        if self.dry_run:
            return f"dry run: would write {self.kind} {self.out} ({what}); nothing written"
        text = (
            f"wrote {self.kind} {self.out} ({what}): {format_bytes(self.bytes_written)} "
            f"in {self.seconds:.2f} s"
        )
        if self.overall_error is not None:
            worst = max(self.relative_errors.values(), default=0.0)
            text += (
                f"; rank-{self.rank} approximation error {self.overall_error:.3g} overall "
                f"(relative Frobenius), worst module {worst:.3g}"
            )
        return text

    def plan_text(self) -> str:
        return "\n".join(
            [
                f"OUT = {self.formula}",
                f"{self.kind}: {self.n_modules} adapted modules, rank {self.rank}",
                f"write {format_bytes(self.bytes_written)}",
            ]
        )


@dataclass
class _LowRank:
    """ΔW = scale·B·A for one module, factors in fp32 (B's blocks already weighted)."""

    module: LoraModule  # the newest input's module: names, kind, orientation
    b: np.ndarray
    a: np.ndarray


_Parts = dict[str, list[tuple[float, "LoraModule", Path]]]


def _combine_parts(terms: list[tuple[float, Adapter]], rank: int | None) -> _Parts:
    """module -> [(weight, module of one input, that input's folder)], the terms' modules
    checked to agree in kind and shape; no factor read yet."""
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise InputError(f"rank {rank!r}: must be a positive integer", params=("rank",))
    parts: _Parts = {}
    for weight, found in terms:
        for name, module in found.modules.items():
            known = parts.setdefault(name, [(weight, module, found.path)])[0][1]
            if known is not module and (
                known.embedding != module.embedding
                or (known.b.shape[0], known.a.shape[1]) != (module.b.shape[0], module.a.shape[1])
            ):
                raise MismatchError(
                    f"{found.path}: module {name!r} differs in kind or shape from the other "
                    "adapters'"
                )
            if known is not module:
                parts[name].append((weight, module, found.path))
    return parts


def _combine(
    parts: _Parts, alpha: float, rank: int | None, reader: FileReader, allow_nonfinite: bool
) -> tuple[dict[str, _LowRank], dict[str, tuple[float, float]]]:
    """Σ_parts weight·s·B·A per module as B_cat·A_cat (the caller's scaling −α outside):
    blocks weight·s·B computed in fp64 and rounded once to fp32. With `rank`, each sum is
    replaced by its best rank-`rank` approximation (fp64 from the fp32 blocks); errors maps
    module -> (‖ΔW−ΔW_r‖_F², ‖ΔW‖_F²). Non-finite blocks, or a sum −α·B·A that may overflow
    float32, are refused unless `allow_nonfinite`; with `rank` non-finite blocks always are."""
    combined, errors = {}, {}
    for name, items in parts.items():
        newest = items[-1][1]
        total = sum(m.rank for _, m, _ in items)
        b = np.empty((newest.b.shape[0], total), np.float32)
        a = np.empty((total, newest.a.shape[1]), np.float32)
        col = 0
        for weight, m, _ in items:  # each block: fp64 product, one rounding into place
            block = slice(col, col + m.rank)
            factor = weight * m.scaling
            with np.errstate(over="ignore", invalid="ignore"):  # inf is checked below
                np.multiply(_read_array(reader, m.b), factor, out=b[:, block], dtype=np.float64)
            a[block] = _read_array(reader, m.a)
            col += m.rank
        where = items[-1][2]
        if not allow_nonfinite:
            _check_low_rank(where, name, b, a, alpha, "weighted factors w·s·B, A")
        if rank is not None and not (np.isfinite(b).all() and np.isfinite(a).all()):
            raise InputError(
                f"{where}: module {name!r}: the weighted factors have non-finite values (NaN or "
                "inf); rank cannot re-compress them",
                params=("rank",),
            )
        if rank is not None:
            with threadpool_limits(1):  # 48-wide panels: BLAS threads only add spinning
                b64, a64, errors[name] = _truncate(b.astype(np.float64), a.astype(np.float64), rank)
            b, a = b64.astype(np.float32), a64.astype(np.float32)
        combined[name] = _LowRank(newest, b, a)
    return combined, errors


def _raw_factors(
    adapter: Adapter, reader: FileReader, scale: dict[str, float], allow_nonfinite: bool
) -> dict[str, _LowRank]:
    """Each module's factors as they are (fp32), checked as write_forget_adapter checks them."""
    found = {}
    for name, m in adapter.modules.items():
        b, a = _read_array(reader, m.b), _read_array(reader, m.a)
        if not allow_nonfinite:
            _check_low_rank(adapter.path, name, b, a, abs(scale[name]))
        found[name] = _LowRank(m, b, a)
    return found


def _factor_elems(m: LoraModule) -> int:
    return m.a.numel + m.b.numel


def _check_low_rank(
    where: Path, name: str, b: np.ndarray, a: np.ndarray, scale: float, what: str = "factors"
) -> None:
    """InputError if B or A holds NaN/inf, or if scale·B·A may leave float32's range: its entries
    are at most |scale| · (largest row sum of |B|) · (largest |A|), bounded in fp64."""
    why = f"non-finite {what} (NaN or inf"
    why += "; lora_alpha/r too large for float32?)" if what != "factors" else ")"
    if np.isfinite(b).all() and np.isfinite(a).all():
        if not b.size or not a.size:
            return
        row = float(np.abs(b).sum(axis=1, dtype=np.float64).max())
        bound = abs(scale) * row * float(np.abs(a).max())
        if bound <= FLOAT32_MAX:
            return
        why = f"a product that may overflow float32 to non-finite values (up to {bound:.3g})"
    raise InputError(
        f"{where}: module {name!r} has {why}; pass allow_nonfinite=True to keep them",
        params=("allow_nonfinite",),
    )


def _check_budget(budget: int | None, extra: int, doing: str) -> None:
    """Refuse before any work when what a stage will allocate, beside what the process holds
    and RESERVED_BYTES of slack, does not fit under max_memory."""
    if budget is None:
        return
    resident = resident_bytes()
    need = extra + RESERVED_BYTES
    if resident + need > budget:
        raise ResourceError(
            f"max_memory {format_bytes(budget)} is too small to {doing}: it needs about "
            f"{format_bytes(need)} beside the {format_bytes(resident)} this process holds; "
            f"allow at least {format_bytes(resident + need)}",
            params=("max_memory",),
        )


def _scan_bytes(found: list[Adapter], base: Checkpoint | None) -> int:
    """What reading one module's factors (raw bytes, widened to fp32, the checks' temporaries:
    16 bytes an element) or comparing and copying tensors in chunks costs at once."""
    scan = max((16 * _factor_elems(m) for f in found for m in f.modules.values()), default=0)
    largest = max((i.nbytes for f in found for i in f.checkpoint.tensors.values()), default=0)
    if base is not None:
        largest = max([largest, *(base.tensors[n].nbytes for f in found for n in _full_names(f)
                                  if n in base.tensors)])  # fmt: skip
    return max(scan, 2 * min(COPY_CHUNK_BYTES, largest))


def _full_names(found: Adapter) -> list[str]:
    return [k[len(KEY_PREFIX) :].replace(".base_layer.", ".") for k in found.full]


def _combine_bytes(parts: _Parts, rank: int | None) -> tuple[int, int]:
    """(held, transient) bytes of _combine and of writing its result: every module's fp32
    factors (and their copies padded to one rank) are held; one module at a time needs its
    fp32 blocks and, with `rank`, their fp64 copies, both QR factorizations, the core's SVD."""
    ranks = {}
    for name, items in parts.items():
        m = items[-1][1]
        total = sum(i[1].rank for i in items)
        ranks[name] = min(rank, total, m.b.shape[0], m.a.shape[1]) if rank else total
    out_rank = max(ranks.values(), default=0)
    held = transient = 0
    for name, items in parts.items():
        m = items[-1][1]
        rows_cols = m.b.shape[0] + m.a.shape[1]
        held += 4 * rows_cols * (ranks[name] + out_rank)
        total = sum(i[1].rank for i in items)
        need = 4 * rows_cols * total + max(16 * _factor_elems(i[1]) for i in items)
        if rank:
            need += 8 * (3 * rows_cols * total + 5 * total * total)
        transient = max(transient, need)
    return held, transient


def _truncate(
    b: np.ndarray, a: np.ndarray, rank: int
) -> tuple[np.ndarray, np.ndarray, tuple[float, float]]:
    """Best rank-`rank` factors of B·A (fp64): B = Q_B·R_B, Aᵀ = Q_A·R_A, SVD of the small
    core R_B·R_Aᵀ = U·S·Vᵀ, then B' = Q_B·U_r·√S_r, A' = √S_r·V_rᵀ·Q_Aᵀ. The discarded
    singular values give the error exactly (Eckart–Young)."""
    try:
        q_b, r_b = np.linalg.qr(b)
        q_a, r_a = np.linalg.qr(a.T)
        u, s, vt = np.linalg.svd(r_b @ r_a.T)
    except np.linalg.LinAlgError as exc:  # finite input converges; kept as a one-line error
        raise InputError(
            f"rank {rank}: the truncated SVD failed ({exc})", params=("rank",)
        ) from None
    k = min(rank, len(s))
    root = np.sqrt(s[:k])
    new_b = (q_b @ u[:, :k]) * root
    new_a = (root[:, None] * vt[:k]) @ q_a.T
    return new_b, new_a, (float(np.sum(s[k:] ** 2)), float(np.sum(s**2)))


def _pad_rank(b: np.ndarray, a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Zero columns of B and rows of A up to `rank`: exact, and one rank for every module
    (vLLM ignores rank_pattern, PEFT needs the config's r to match the tensors)."""
    missing = rank - a.shape[0]
    if missing == 0:
        return b, a
    return (
        np.concatenate([b, np.zeros((b.shape[0], missing), b.dtype)], axis=1),
        np.concatenate([a, np.zeros((missing, a.shape[1]), a.dtype)], axis=0),
    )


def _attach_errors(report: AdapterReport, errors: dict[str, tuple[float, float]]) -> None:
    if not errors:
        return
    report.relative_errors = {
        name: math.sqrt(lost / total) if total else 0.0 for name, (lost, total) in errors.items()
    }
    lost = sum(e[0] for e in errors.values())
    total = sum(e[1] for e in errors.values())
    report.overall_error = math.sqrt(lost / total) if total else 0.0
