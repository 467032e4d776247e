"""The engine's one output pipeline, and its extrapolation producer.

Every model the engine writes goes through write_output: the layout planned before any work
(plan_output: shards, headers, provenance, the source's files to carry), a staged directory or
file renamed into place when complete, one ShardWriter, the index, the carried files and the
model card, one progress bar, and an OSError turned into one line. Its tensors come from a
producer, which writes each tensor's bytes through the writer: _run_pipeline here (tensors
copied from REF, or extrapolated), or the LoRA merge's low-rank producer
(moxkit.adapters.merge).

The extrapolation: read -> arithmetic -> write, overlapped, in bounded memory.

A fixed ring of slots is sized once from the memory budget. While the backend computes chunk
i in one slot, a reader thread loads chunk i+1 into the next (a read-only mapping of the input
bytes for the CPU backend, which computes on the page cache in place; a pread into pinned
buffers for CUDA) and a writer thread drains chunk i-1 (pwrite into the output shards, whose
headers were written first), then releases the slot. The CPU backend writes its results
itself, from a cache-sized block straight into the output file (Backend.writes_files): no
output buffer, no second pass over the result; the writer thread then only writes tensors
copied from REF and releases slots. The output is assembled in a temporary
directory beside OUT and renamed into place only when complete: an error, Ctrl-C or SIGTERM
leaves no OUT and no temporary (moxkit.atomic).

Nothing a worker can still touch is released early: on any exit the backend is closed first
(it waits for its threads and device), then the reader and writer threads are joined, and
only then are the input windows unmapped and the buffers dropped.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import check_output, reached, shielded, staged_dir, staged_file
from ..errors import InputError, MoxError, OutputError, ResourceError
from ..progress import ByteProgress
from ..sources import ModelFile
from ..units import format_bytes, parse_size, resident_bytes
from .backends import Backend, get_backend
from .checkpoint import Checkpoint, FileReader, open_checkpoint
from .dtypes import SIZES, TABLE, dtype_name, numpy_view, parse_dtype
from .formula import PAPER_ETA, Coefficients
from .options import EngineOptions, alpha_and_out
from .plan import Chunk, TensorPlan, buffer_itemsizes, cut_chunks, pair_tensors
from .provenance import carried_files, carry_files, model_card, provenance
from .writer import OutputTensor, Shard, ShardWriter, layout, split_shards, write_index

N_SLOTS = 3  # one being read, one being computed, one being written
MAX_CHUNK_ELEMS = 8 * 2**20  # larger chunks stop paying for themselves and hurt the overlap
RESERVED_BYTES = 64 * 2**20  # Python objects, thread stacks, progress bar: outside the buffers
DEFAULT_BUFFER_BYTES = 384 * 2**20  # buffer ring when the caller sets no process budget


@dataclass
class ExtrapolationReport:
    """What a run did (or, for a dry run, would do)."""

    out: Path
    alpha: float
    eta: float | None
    device: str
    n_extrapolated: int
    n_copied: int
    shards: list[tuple[str, int]]  # (file name, file size)
    bytes_read: int
    bytes_written: int
    chunk_elems: int
    buffer_bytes: int
    seconds: float = 0.0
    dry_run: bool = False
    nonfinite_tensors: list[str] = field(default_factory=list)
    carried_files: list[str] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return (self.bytes_read + self.bytes_written) / self.seconds / 1e9 if self.seconds else 0.0

    def summary(self) -> str:
        tensors = f"{self.n_extrapolated} tensors extrapolated, {self.n_copied} copied"
        shards = f"{len(self.shards)} shard{'s' if len(self.shards) != 1 else ''}"
        if self.dry_run:
            return f"dry run: would write {self.out} ({tensors}, {shards}); nothing written"
        return (
            f"wrote {self.out} ({tensors}, {shards}): read {format_bytes(self.bytes_read)}, "
            f"wrote {format_bytes(self.bytes_written)} in {self.seconds:.1f} s "
            f"({self.gb_per_s:.2f} GB/s)"
        )

    def plan_text(self) -> str:
        formula = f"(1+{self.alpha:g})·REF − {self.alpha:g}·MEM"
        if self.eta is not None:
            formula = f"{self.eta:g}·[{formula}] + {1 - self.eta:g}·PREV"
        lines = [
            f"OUT = {formula}",
            f"tensors: {self.n_extrapolated} extrapolated, {self.n_copied} copied from REF",
            f"read {format_bytes(self.bytes_read)}, write {format_bytes(self.bytes_written)}",
            f"device {self.device}; {N_SLOTS} buffer slots of up to {self.chunk_elems:,} elements "
            f"({format_bytes(self.buffer_bytes)} of buffers)",
        ]
        lines += [f"  {name}  {format_bytes(size)}" for name, size in self.shards]
        return "\n".join(lines)


@dataclass(frozen=True)
class OutputPlan:
    """OUT, decided and checked before any work: where it goes, its shards and headers, and
    what it carries besides the weights."""

    out: Path  # where OUT goes (a link already followed)
    single_file: bool  # OUT is one .safetensors file, not a model folder
    shards: list[Shard]
    metadata: dict[str, str]  # provenance: every shard's __metadata__, and the model card
    source: Path | None  # the model folder whose files OUT carries (REF's, BASE's)
    out_dtype: str | None  # None: each tensor keeps its source's dtype
    options: EngineOptions
    carried: list[ModelFile] = field(default_factory=list)  # source's files OUT carries, checked
    budget: int | None = None  # options.max_memory in bytes (None: unchecked)

    @property
    def bytes_written(self) -> int:
        return sum(s.file_size for s in self.shards)


@dataclass(frozen=True)
class ExtrapolationJob:
    """One run, decided and checked before any output byte is written: the inputs paired
    tensor by tensor, the output's plan, the coefficients."""

    output: OutputPlan
    ref: Checkpoint
    plans: list[TensorPlan]
    coeffs: Coefficients

    @property
    def bytes_read(self) -> int:
        return sum(
            p.ref.nbytes + (p.mem.nbytes if p.mem else 0) + (p.prev.nbytes if p.prev else 0)
            for p in self.plans
        )


def extrapolate(
    ref: str | os.PathLike,
    mem: str | os.PathLike,
    alpha: float,
    out: str | os.PathLike,
    *,
    prev: str | os.PathLike | None = None,
    eta: float = PAPER_ETA,
    options: EngineOptions | None = None,
    momentum: str | os.PathLike | None = None,
    **overrides,
) -> ExtrapolationReport:
    """OUT = (1+α)·REF − α·MEM, or with prev=PREV: η·[(1+α)·REF − α·MEM] + (1−η)·PREV.

    Inputs are .safetensors files or Hugging Face model directories (sharded or not); OUT is a
    model directory as save_pretrained writes it, or a single file if it ends in .safetensors.
    Arithmetic is fp32 with one round-to-nearest-even to the output dtype (REF's, or the
    options' dtype). How OUT is written (dtype, memory and GPU budgets, shard size, device,
    force, fsync, non-finite policy, dry run, progress) is `options` (EngineOptions), or its
    fields given as keywords (max_memory="4GiB", ...). Peak resident memory of the whole
    process stays under max_memory whatever the model size; max_memory=None, for callers
    embedding the engine in a process that holds other things (a trainer, an evaluation),
    bounds only the engine's own buffers (DEFAULT_BUFFER_BYTES) and leaves the rest of the
    process alone. fsync=True makes OUT durable before it is reported written (it survives a
    power loss). `momentum=` is the old name of `prev=`. Bad arguments raise MoxError naming
    them."""
    alpha, out = alpha_and_out(alpha, out, "extrapolate")
    options = EngineOptions.of(options, overrides, "extrapolate")
    if momentum is not None:
        warnings.warn(
            "extrapolate(momentum=...) is deprecated: pass prev=...", DeprecationWarning, 2
        )
        if prev is not None:
            raise InputError("prev and momentum name the same checkpoint: pass only prev",
                             params=("prev", "momentum"))  # fmt: skip
        prev = momentum
    return run(prepare(ref, mem, alpha, out, prev=prev, eta=eta, options=options))


def prepare(
    ref: str | os.PathLike,
    mem: str | os.PathLike,
    alpha: float,
    out: str | os.PathLike,
    *,
    prev: str | os.PathLike | None = None,
    eta: float = PAPER_ETA,
    options: EngineOptions | None = None,
    **overrides,
) -> ExtrapolationJob:
    """Open and validate the inputs against each other and OUT, and fix the output layout:
    everything that can be refused is refused here, before any work."""
    alpha, out = alpha_and_out(alpha, out, "prepare")
    options = EngineOptions.of(options, overrides, "prepare")
    coeffs = Coefficients(alpha, eta if prev is not None else None)
    out_dtype = parse_dtype(dtype_name(options.dtype))
    shard_limit = parse_size(options.max_shard_size, "max_shard_size")
    budget = memory_budget(options.max_memory)
    ref_ckpt = open_checkpoint(ref, budget=budget)
    mem_ckpt = open_checkpoint(mem, budget=budget)
    prev_ckpt = open_checkpoint(prev, budget=budget) if prev is not None else None
    inputs = [c for c in (ref_ckpt, mem_ckpt, prev_ckpt) if c is not None]
    out_path = check_output(out, force=options.force, inputs=_input_paths(inputs))
    plans = pair_tensors(ref_ckpt, mem_ckpt, prev_ckpt, out_dtype, budget)
    metadata = provenance(ref_ckpt, mem_ckpt, prev_ckpt, coeffs)
    outputs = [p.output for p in plans]
    output = plan_output(out_path, outputs, metadata, ref_ckpt, out_dtype, shard_limit, options)
    return ExtrapolationJob(output, ref_ckpt, plans, coeffs)


def plan_output(
    out: Path,
    tensors: list[OutputTensor],
    metadata: dict[str, str],
    source: Checkpoint,
    out_dtype: str | None,
    shard_limit: int,
    options: EngineOptions,
) -> OutputPlan:
    """The layout of OUT (an output path check_output accepted) for `tensors` in this order:
    one file if OUT ends in .safetensors, else shards of at most `shard_limit` bytes, the
    index, and `source`'s model files (checked now, before any work), with `metadata` as
    provenance."""
    budget = memory_budget(options.max_memory)
    single_file = out.suffix == ".safetensors"
    groups = [tensors] if single_file else split_shards(tensors, shard_limit)
    shards = layout(groups, metadata, [out.name] if single_file else None, budget)
    folder = None if single_file else source.directory
    carried = carried_files(folder, budget) if folder is not None else []
    return OutputPlan(
        out, single_file, shards, metadata, folder, out_dtype, options, carried, budget
    )


def write_output(
    plan: OutputPlan,
    produce: Callable[[ShardWriter, ByteProgress], None],
    total: int,
    desc: str = "extrapolate",
) -> list[str]:
    """Write OUT as `plan` lays it out, its tensors from `produce` (which writes every
    tensor's bytes through the writer and advances the bar, `total` bytes in all): staged
    beside OUT and renamed into place only when complete, with the index, the carried files
    and the model card. An OSError ends in one line naming OUT. Returns the carried names."""
    options = plan.options
    bar = ByteProgress(total, enabled=options.progress, desc=desc)
    stage = staged_file if plan.single_file else staged_dir
    carried: list[str] = []
    try:
        with stage(plan.out, force=options.force, fsync=options.fsync) as tmp:
            paths = [tmp] if plan.single_file else [tmp / s.filename for s in plan.shards]
            writer = ShardWriter(plan.shards, paths)
            try:
                produce(writer, bar)
            finally:
                writer.close()
            if not plan.single_file:
                write_index(tmp, plan.shards)
                if plan.source is not None:
                    carried = carry_files(
                        plan.source, tmp, plan.out_dtype, plan.carried, plan.budget
                    )
                (tmp / "README.md").write_text(model_card(plan.metadata))
    except OSError as exc:
        raise OutputError(f"{plan.out}: cannot write output: {exc.strerror or exc}") from None
    finally:
        bar.close()
    return carried


def run(job: ExtrapolationJob) -> ExtrapolationReport:
    """Run a prepared job (or, with the options' dry_run, report what it would do)."""
    output, options = job.output, job.output.options
    backend = get_backend(options.device, **gpu_options(options.max_gpu_memory))
    try:
        sizes = buffer_itemsizes(job.plans)
        largest = max(p.numel for p in job.plans)  # no buffer larger than the largest tensor
        chunk_elems = min(
            _chunk_elems(output.budget, sum(sizes.values())), -(-largest // 1024) * 1024
        )
        report = ExtrapolationReport(
            out=output.out,
            alpha=job.coeffs.alpha,
            eta=job.coeffs.eta,
            device=backend.name,
            n_extrapolated=sum(not p.is_copy for p in job.plans),
            n_copied=sum(p.is_copy for p in job.plans),
            shards=[(s.filename, s.file_size) for s in output.shards],
            bytes_read=job.bytes_read,
            bytes_written=output.bytes_written,
            chunk_elems=chunk_elems,
            buffer_bytes=N_SLOTS * chunk_elems * sum(sizes.values()),
            dry_run=options.dry_run,
        )
        if options.dry_run:
            return report
        started = time.perf_counter()
        total = report.bytes_read + sum(p.out_nbytes for p in job.plans)
        report.carried_files = write_output(
            output,
            lambda writer, bar: _run_pipeline(job, backend, writer, chunk_elems, report, bar),
            total,
        )
        report.seconds = time.perf_counter() - started
        return report
    finally:
        backend.close()


def memory_budget(max_memory: str | int | None) -> int | None:
    return parse_size(max_memory, "max_memory") if max_memory is not None else None


def gpu_options(max_gpu_memory: str | int | None) -> dict:
    """The backend's keyword for a GPU budget, when one is set."""
    gpu_budget = parse_size(max_gpu_memory, "max_gpu_memory") if max_gpu_memory else None
    return {"max_gpu_memory": gpu_budget} if gpu_budget else {}


def _chunk_elems(budget: int | None, bytes_per_elem: int) -> int:
    """The largest chunk whose buffer ring fits the budget left after what the process
    already holds (interpreter, torch, headers), measured now rather than guessed."""
    if budget is None:
        return (
            min(MAX_CHUNK_ELEMS, DEFAULT_BUFFER_BYTES // (N_SLOTS * bytes_per_elem)) // 1024 * 1024
        )
    return fit_elems(budget, N_SLOTS * bytes_per_elem, MAX_CHUNK_ELEMS, "max_memory", align=1024)


def fit_elems(
    budget: int,
    bytes_per_elem: int,
    most: int,
    name: str,
    *,
    align: int = 1,
    least: int = 64 * 1024,
) -> int:
    """The most elements (at most `most`, a multiple of `align`) whose buffers, bytes_per_elem
    each, fit what `budget` leaves after what the process holds now and RESERVED_BYTES: the
    one sizing rule of the engine's chunks and the LoRA merge's tiles. MoxError naming `name`
    (the caller's word for the budget) when fewer than `least` fit."""
    resident = resident_bytes()
    elems = min(most, (budget - resident - RESERVED_BYTES) // bytes_per_elem)
    elems -= elems % align
    if elems < least:
        raise ResourceError(
            f"{name} {format_bytes(budget)} is too small: this process already holds "
            f"{format_bytes(resident)}; allow at least "
            f"{format_bytes(resident + RESERVED_BYTES + bytes_per_elem * least)}",
            params=(name,),
        )
    return elems


def _input_paths(inputs: list[Checkpoint]) -> list[Path]:
    """Every file and folder the output must not touch."""
    paths = []
    for ckpt in inputs:
        paths += [ckpt.path, *ckpt.files] + ([ckpt.directory] if ckpt.directory else [])
    return paths


class _Slot:
    """One chunk in flight: its inputs, either mapped from the input files (CPU backend: the
    arithmetic reads the page cache directly, no copy) or read into preallocated buffers (CUDA
    backend: pinned memory the GPU can copy from), and an output buffer unless the backend
    writes the output file itself."""

    def __init__(self, backend, chunk_elems: int, sizes: dict[str, int], reader: FileReader):
        self.maps_inputs = getattr(backend, "maps_inputs", False)
        owned = set() if self.maps_inputs else {"ref", "mem", "prev"}
        if not getattr(backend, "writes_files", False):
            owned.add("out")
        self.raw = {
            role: backend.allocate_host(chunk_elems * size)
            for role, size in sizes.items()
            if size and role in owned
        }
        self._bytes = {
            role: memoryview(raw if isinstance(raw, np.ndarray) else raw.numpy())
            for role, raw in self.raw.items()
        }
        self._maps: dict[str, tuple] = {}
        self._reader = reader

    def load(self, role: str, file: Path, offset: int, nbytes: int) -> None:
        if self.maps_inputs:
            self._maps[role] = self._reader.map_range(file, offset, nbytes)
        else:
            self._reader.read_into(file, offset, self._bytes[role][:nbytes])

    def bytes(self, role: str, nbytes: int) -> memoryview:
        if role in self._maps:
            return self._maps[role][1][:nbytes]
        return self._bytes[role][:nbytes]

    def view(self, role: str, dtype: str, count: int):
        nbytes = count * SIZES[dtype]
        if role in self._maps or isinstance(self.raw[role], np.ndarray):
            return np.frombuffer(self.bytes(role, nbytes), dtype=numpy_view(dtype))
        import torch

        return self.raw[role][:nbytes].view(getattr(torch, TABLE[dtype].torch))

    def release(self) -> None:
        """Unmap this chunk's inputs (they count towards resident memory while mapped). A
        window still viewed (an interrupted call's frame holds an array of it) stays mapped
        until the last view goes: Python refuses to unmap memory that is referenced."""
        maps, self._maps = self._maps, {}
        for mapping, window in maps.values():
            window.release()
            with contextlib.suppress(BufferError):
                mapping.close()


def _run_pipeline(
    job: ExtrapolationJob,
    backend: Backend,
    writer: ShardWriter,
    chunk_elems: int,
    report: ExtrapolationReport,
    bar: ByteProgress,
) -> None:
    chunks = cut_chunks(job.plans, chunk_elems)
    sizes = buffer_itemsizes(job.plans)
    writes_files = getattr(backend, "writes_files", False)
    reader = FileReader()
    slots: list[_Slot] = []
    read_pool = ThreadPoolExecutor(1, thread_name_prefix="moxkit-read")
    write_pool = ThreadPoolExecutor(1, thread_name_prefix="moxkit-write")
    reads: dict[int, Future] = {}
    writes: dict[int, Future] = {}

    def read(chunk: Chunk, slot: _Slot) -> None:
        t = chunk.tensor
        for role, info in (("ref", t.ref), ("mem", t.mem), ("prev", t.prev)):
            if info is not None:
                size = info.itemsize
                try:
                    slot.load(role, info.file, info.start + chunk.start * size, chunk.count * size)
                except (OSError, ValueError) as exc:
                    raise changed_input(info.file, exc) from None
        reached("read")

    def compute(chunk: Chunk, slot: _Slot) -> bool:
        """The arithmetic on one chunk, into the slot's output buffer or (writes_files)
        straight into the output file."""
        t = chunk.tensor
        inputs = (
            slot.view("ref", t.ref.dtype, chunk.count),
            slot.view("mem", t.mem.dtype, chunk.count),
            slot.view("prev", t.prev.dtype, chunk.count) if t.prev else None,
        )
        if not writes_files:
            out = slot.view("out", t.out_dtype, chunk.count)
            return backend.extrapolate(out, *inputs, job.coeffs)
        with writer.target(t.name, chunk.start * SIZES[t.out_dtype]) as (fd, offset):
            return backend.extrapolate_to_file(fd, offset, t.out_dtype, *inputs, job.coeffs)

    def write(chunk: Chunk, slot: _Slot) -> None:
        t = chunk.tensor
        size = SIZES[t.out_dtype]
        if t.is_copy or not writes_files:
            data = slot.bytes("ref" if t.is_copy else "out", chunk.count * size)
            try:
                writer.write(t.name, chunk.start * size, data)
            except OSError as exc:
                if exc.errno == errno.EFAULT:  # the mapped input shrank under us
                    raise changed_input(t.ref.file, exc) from None
                raise
            del data
        slot.release()
        reached("write")
        in_bytes = chunk.count * sum(i.itemsize for i in (t.ref, t.mem, t.prev) if i is not None)
        bar.update(in_bytes + chunk.count * size)

    def schedule_read(i: int) -> None:
        if i < len(chunks):
            previous_user = i - N_SLOTS  # the chunk that last used this slot must be written
            if previous_user in writes:
                writes.pop(previous_user).result()
            reads[i] = read_pool.submit(read, chunks[i], slots[i % N_SLOTS])

    try:
        slots += [_Slot(backend, chunk_elems, sizes, reader) for _ in range(N_SLOTS)]
        schedule_read(0)
        for i, chunk in enumerate(chunks):
            reads.pop(i).result()
            schedule_read(i + 1)
            slot = slots[i % N_SLOTS]
            t = chunk.tensor
            if not t.is_copy:
                reached("compute")
                try:
                    finite = compute(chunk, slot)
                except MoxError as exc:  # the backend knows no names: say which tensor, files
                    files = ", ".join(sorted({str(i.file) for i in (t.ref, t.mem, t.prev) if i}))
                    raise type(exc)(
                        f"tensor {t.name!r} ({files}): {exc}", params=exc.params
                    ) from None
                reached("computed")
                if not finite:
                    nonfinite(t.name, job.output.options, report.nonfinite_tensors)
            writes[i] = write_pool.submit(write, chunk, slot)
        for i in sorted(writes):
            writes.pop(i).result()
    finally:
        # In this order, whatever happens (a second signal is held): nothing is unmapped or
        # freed while the backend's threads or device, or our own threads, may still use it.
        with shielded():
            reached("cleanup")
            for fut in [*reads.values(), *writes.values()]:
                fut.cancel()
            backend.close()
            read_pool.shutdown(wait=True, cancel_futures=True)
            write_pool.shutdown(wait=True, cancel_futures=True)
            for slot in slots:
                slot.release()
            reader.close()


def nonfinite(name: str, options: EngineOptions, kept: list[str]) -> None:
    """The engine's non-finite policy, for an output tensor holding NaN or inf: refused
    unless allow_nonfinite, else noted once in `kept` (the report's list)."""
    if name in kept:
        return
    if not options.allow_nonfinite:
        raise InputError(
            f"tensor {name!r}: the result has non-finite values (NaN or inf); "
            "check the inputs, or pass allow_nonfinite=True to keep them",
            params=("allow_nonfinite",),
        )
    kept.append(name)


def changed_input(file: Path, exc: Exception) -> MoxError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return InputError(f"{file}: cannot read ({reason}); was it changed or truncated meanwhile?")
