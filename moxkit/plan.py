"""Pair the tensors of REF, MEM (and PREV) by name, validate them, and cut the work into chunks
that fit the memory budget.

Everything a run could trip over in the inputs is checked here, before the first output byte:
missing or extra tensors, shape and dtype mismatches, unsupported dtypes. Tensors are matched by
name through each checkpoint's own index, so the inputs' shard layouts may differ.
"""

from __future__ import annotations

from dataclasses import dataclass

from .checkpoint import ARITHMETIC_CODES, DTYPE_SIZES, Checkpoint, TensorInfo
from .errors import MoxError
from .writer import OutputTensor

DTYPE_ALIASES = {
    "bf16": "BF16",
    "bfloat16": "BF16",
    "fp16": "F16",
    "float16": "F16",
    "half": "F16",
    "fp32": "F32",
    "float32": "F32",
    "float": "F32",
}
CONFIG_DTYPE_NAMES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}


@dataclass(frozen=True)
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
        return self.numel * DTYPE_SIZES[self.out_dtype]

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


def parse_dtype(dtype: str | None) -> str | None:
    if dtype is None:
        return None
    code = DTYPE_ALIASES.get(dtype.lower())
    if code is None:
        raise MoxError(f"--dtype {dtype!r}: expected one of bf16, fp16, fp32")
    return code


def pair_tensors(
    ref: Checkpoint, mem: Checkpoint, prev: Checkpoint | None, out_dtype: str | None
) -> list[TensorPlan]:
    """Validate the inputs against each other; the output has REF's tensors in REF's order."""
    if not ref.tensors:
        raise MoxError(f"{ref.path}: holds no tensors")
    others = [("MEM", mem)] + ([("PREV", prev)] if prev is not None else [])
    for label, other in others:
        missing = [n for n in ref.tensors if n not in other.tensors]
        extra = [n for n in other.tensors if n not in ref.tensors]
        if missing:
            raise MoxError(
                f"{other.path}: {label} lacks tensor {missing[0]!r} that REF has"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
            )
        if extra:
            raise MoxError(
                f"{other.path}: {label} has tensor {extra[0]!r} that REF lacks"
                + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                + (
                    "; tied embeddings in one model but not the other?"
                    if "lm_head" in extra[0]
                    else ""
                )
            )
    plans = []
    for name, r in ref.tensors.items():
        m = mem.tensors[name]
        p = prev.tensors[name] if prev is not None else None
        for label, t in (("MEM", m), ("PREV", p)):
            if t is not None and t.shape != r.shape:
                raise MoxError(
                    f"{t.file}: tensor {name!r} has shape {list(t.shape)} in {label} "
                    f"but {list(r.shape)} in REF"
                )
        if not r.is_float:
            for label, t in (("MEM", m), ("PREV", p)):
                if t is not None and t.dtype != r.dtype:
                    raise MoxError(
                        f"{t.file}: tensor {name!r} is {t.dtype} in {label} but {r.dtype} in REF"
                    )
            plans.append(TensorPlan(name, r.shape, r.dtype, r, None, None))
            continue
        for label, t in (("REF", r), ("MEM", m), ("PREV", p)):
            if t is not None and t.dtype not in ARITHMETIC_CODES:
                raise MoxError(
                    f"{t.file}: tensor {name!r} in {label} is {t.dtype}; moxkit computes on "
                    "F32, F16 and BF16 tensors"
                )
        plans.append(TensorPlan(name, r.shape, out_dtype or r.dtype, r, m, p))
    return plans


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
            sizes["out"] = max(sizes["out"], DTYPE_SIZES[p.out_dtype])
        if p.prev is not None:
            sizes["prev"] = max(sizes["prev"], p.prev.itemsize)
    return sizes
