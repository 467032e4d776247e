"""Pair the tensors of REF, MEM (and PREV) by name, validate them, and cut the work into chunks
that fit the memory budget.

Everything a run could trip over in the inputs is checked here, before the first output byte:
missing or extra tensors, shape and dtype mismatches, unsupported dtypes. Tensors are matched by
name through each checkpoint's own index, so the inputs' shard layouts may differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError, MismatchError
from ..sources import shown
from ..units import check_headroom
from .checkpoint import BUDGET_CHECK_EVERY, Checkpoint, TensorInfo, gc_paused
from .dtypes import ARITHMETIC_CODES, FLOAT_CODES, SIZES
from .writer import OutputTensor

PLAN_BYTES_PER_TENSOR = 100  # a TensorPlan (slotted, 6 fields) and its list slot


@dataclass(slots=True, eq=False)
class TensorPlan:
    """One output tensor: extrapolated from ref/mem(/prev), or copied from ref."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    ref: TensorInfo
    mem: TensorInfo | None  # None: copied from ref (integer buffers, bool masks)
    prev: TensorInfo | None

    @property
    def numel(self) -> int:
        return self.ref.numel

    @property
    def out_nbytes(self) -> int:
        return self.numel * SIZES[self.out_dtype]

    @property
    def is_copy(self) -> bool:
        return self.mem is None

    @property
    def output(self) -> OutputTensor:
        return OutputTensor(self.name, self.out_dtype, self.shape, self.out_nbytes)


@dataclass(frozen=True)
class Chunk:
    """A contiguous range of elements of one tensor: the unit of reading, arithmetic, writing."""

    tensor: TensorPlan
    start: int  # first element
    count: int


def pair_tensors(
    ref: Checkpoint,
    mem: Checkpoint,
    prev: Checkpoint | None,
    out_dtype: str | None,
    budget: int | None = None,
) -> list[TensorPlan]:
    """Validate the inputs against each other; the output has REF's tensors in REF's order.
    With a memory `budget` (bytes, whole process), the plan's size is checked first, so a
    model of millions of tensors that cannot fit stops now rather than half-way."""
    if not ref.tensors:
        raise InputError(f"{shown(ref.path)}: holds no tensors")
    others = [("MEM", mem)] + ([("PREV", prev)] if prev is not None else [])
    for label, other in others:
        _check_same_names(ref, label, other)
    what = f"planning {len(ref.tensors):,} tensors"
    check_headroom(budget, len(ref.tensors) * PLAN_BYTES_PER_TENSOR, what)
    mem_tensors = mem.tensors
    prev_tensors = prev.tensors if prev is not None else None
    plans = []
    append = plans.append
    with gc_paused():
        for name, r in ref.tensors.items():
            m = mem_tensors[name]
            p = prev_tensors[name] if prev_tensors is not None else None
            if m.shape != r.shape or (p is not None and p.shape != r.shape):
                _refuse_shapes(name, r, m, p)
            if r.dtype not in FLOAT_CODES:
                if m.dtype != r.dtype or (p is not None and p.dtype != r.dtype):
                    _refuse_integer_dtypes(name, r, m, p)
                append(TensorPlan(name, r.shape, r.dtype, r, None, None))
            elif (
                r.dtype in ARITHMETIC_CODES
                and m.dtype in ARITHMETIC_CODES
                and (p is None or p.dtype in ARITHMETIC_CODES)
            ):
                append(TensorPlan(name, r.shape, out_dtype or r.dtype, r, m, p))
            else:
                _refuse_float_dtypes(name, r, m, p)
            if not len(plans) % BUDGET_CHECK_EVERY:
                check_headroom(budget, 0, what)
    return plans


def _check_same_names(ref: Checkpoint, label: str, other: Checkpoint) -> None:
    if len(other.tensors) == len(ref.tensors) and all(n in other.tensors for n in ref.tensors):
        return
    missing = [n for n in ref.tensors if n not in other.tensors]
    extra = [n for n in other.tensors if n not in ref.tensors]
    hint = _prefix_hint(label, missing, extra)
    if missing:
        raise MismatchError(
            f"{shown(other.path)}: {label} lacks tensor {missing[0]!r} that REF has"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            + hint
        )
    raise MismatchError(
        f"{shown(other.path)}: {label} has tensor {extra[0]!r} that REF lacks"
        + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
        + (hint or ("; tied embeddings in one model but not the other?" * ("lm_head" in extra[0])))
    )


def _prefix_hint(label: str, missing: list[str], extra: list[str]) -> str:
    """When every name one side has and the other lacks is the other's name with a prefix
    added (GPT-2's legacy `h.0...` against `transformer.h.0...`), say so: the same model
    saved in two key layouts, not two different models."""
    if not missing or not extra:
        return ""
    for longer, shorter, who in ((extra, missing, label), (missing, extra, "REF")):
        shorter_set = set(shorter)
        probe = longer[0]
        cut = probe.find(".")
        while cut != -1:
            prefix = probe[: cut + 1]
            if all(n.startswith(prefix) and n[len(prefix) :] in shorter_set for n in longer):
                other = "REF" if who == label else label
                return (
                    f"; {who}'s names carry the prefix {prefix!r} that {other}'s lack "
                    f"({longer[0][len(prefix) :]!r} vs {longer[0]!r}): the same model saved "
                    "in two key layouts?"
                )
            cut = probe.find(".", cut + 1)
    return ""


def _refuse_shapes(name: str, r: TensorInfo, m: TensorInfo, p: TensorInfo | None) -> None:
    for label, t in (("MEM", m), ("PREV", p)):
        if t is not None and t.shape != r.shape:
            raise MismatchError(
                f"{t.file}: tensor {name!r} has shape {list(t.shape)} in {label} "
                f"but {list(r.shape)} in REF"
            )


def _refuse_integer_dtypes(name: str, r: TensorInfo, m: TensorInfo, p: TensorInfo | None) -> None:
    for label, t in (("MEM", m), ("PREV", p)):
        if t is not None and t.dtype != r.dtype:
            raise MismatchError(
                f"{t.file}: tensor {name!r} is {t.dtype} in {label} but {r.dtype} in REF"
            )


def _refuse_float_dtypes(name: str, r: TensorInfo, m: TensorInfo, p: TensorInfo | None) -> None:
    for label, t in (("REF", r), ("MEM", m), ("PREV", p)):
        if t is not None and t.dtype not in ARITHMETIC_CODES:
            raise InputError(
                f"{t.file}: tensor {name!r} in {label} is {t.dtype}; moxkit computes on "
                "F32, F16 and BF16 tensors"
            )


def cut_chunks(plans: list[TensorPlan], chunk_elems: int) -> list[Chunk]:
    """Cut every tensor into ranges of at most chunk_elems elements; a tensor larger than the
    memory budget (a 128k-vocabulary embedding) becomes several chunks."""
    chunks = []
    for plan in plans:
        n = plan.numel
        if n == 0:
            continue
        for start in range(0, n, chunk_elems):
            chunks.append(Chunk(plan, start, min(chunk_elems, n - start)))
    return chunks


def buffer_itemsizes(plans: list[TensorPlan]) -> dict[str, int]:
    """Bytes per element each buffer role (ref, mem, prev, out) needs, worst case over all
    tensors: one set of buffers serves every chunk. Copied tensors are written straight from
    the ref buffer."""
    sizes = {"ref": 0, "mem": 0, "prev": 0, "out": 0}
    for p in plans:
        sizes["ref"] = max(sizes["ref"], p.ref.itemsize)
        if p.mem is not None:
            sizes["mem"] = max(sizes["mem"], p.mem.itemsize)
            sizes["out"] = max(sizes["out"], SIZES[p.out_dtype])
        if p.prev is not None:
            sizes["prev"] = max(sizes["prev"], p.prev.itemsize)
    return sizes
