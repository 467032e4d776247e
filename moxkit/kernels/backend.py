"""The CUDA backend of the streaming engine: pinned host buffers, copy streams, the kernel.

One call of `extrapolate` cuts its chunk into pieces and runs them through a ring of device
slots, so the host-to-device copies of piece i+1, the kernel on piece i and the device-to-host
copy of piece i−1 run at the same time on three streams. Device memory is allocated once, in
__init__, from the --max-gpu-memory budget; host buffers are registered (pinned) at their exact
size, not rounded up to a power of two as torch's pinned allocator does, so the engine's
--max-memory accounting holds.
"""

from __future__ import annotations

import torch

from moxkit.engine.formula import Coefficients
from moxkit.errors import ResourceError
from moxkit.units import parse_size

from .extrapolate import BLOCK, NUM_WARPS, launch

DEFAULT_GPU_MEMORY = 4 << 30  # bytes, when --max-gpu-memory is not given (capped by free memory)
SLOTS = 3  # pieces in flight: one being copied in, one computed, one copied out
MIN_PIECE = 1 << 20  # elements; smaller pieces would cost more in launches than they overlap
_ALIGN = 4096  # bytes; page alignment for registration, and at least 16 for vector loads
_MAX_ITEMSIZE = 4  # fp32, the widest operand


class CudaBackend:
    """Triton kernel on one CUDA device. Not thread-safe: one engine thread calls it."""

    name = "cuda"
    maps_inputs = False  # inputs are copied into pinned buffers

    def __init__(
        self,
        device: str | torch.device = "cuda",
        max_gpu_memory: int | str | None = None,
        *,
        block: int = BLOCK,
        num_warps: int = NUM_WARPS,
    ):
        if not torch.cuda.is_available():
            raise ResourceError("device 'cuda': no CUDA device is available (use device='cpu')",
                                params=("device",))  # fmt: skip
        self.device = torch.device(device)
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        if self.device.index >= torch.cuda.device_count():
            raise ResourceError(
                f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)",
                params=("device",),
            )
        self.block, self.num_warps = block, num_warps
        free, _ = torch.cuda.mem_get_info(self.device)
        if max_gpu_memory is None:
            budget = min(DEFAULT_GPU_MEMORY, free // 2)
        else:
            budget = parse_size(max_gpu_memory, "max_gpu_memory")
        # each slot holds up to three inputs and one output of up to 4 bytes per element
        self.slot_elems = budget // (SLOTS * 4 * _MAX_ITEMSIZE) // _ALIGN * _ALIGN
        if self.slot_elems < MIN_PIECE:
            need = SLOTS * 4 * _MAX_ITEMSIZE * MIN_PIECE
            raise ResourceError(
                f"max_gpu_memory {budget} bytes is too small: the CUDA backend "
                f"needs at least {need} bytes ({need >> 20} MiB)",
                params=("max_gpu_memory",),
            )
        region = self.slot_elems * _MAX_ITEMSIZE
        try:
            self._slots = [
                torch.empty(4 * region, dtype=torch.uint8, device=self.device) for _ in range(SLOTS)
            ]
        except torch.cuda.OutOfMemoryError:
            raise ResourceError(
                f"max_gpu_memory {budget} bytes: cannot allocate that much on "
                f"{self.device} ({free >> 20} MiB free)",
                params=("max_gpu_memory",),
            ) from None
        self._region = region
        self._bad = torch.zeros(1, dtype=torch.int32, device=self.device)
        self._h2d = torch.cuda.Stream(self.device)
        self._compute = torch.cuda.Stream(self.device)
        self._d2h = torch.cuda.Stream(self.device)
        self._slot_free: list[torch.cuda.Event | None] = [None] * SLOTS
        self._pinned: list[torch.Tensor] = []

    def allocate_host(self, nbytes: int) -> torch.Tensor:
        """A page-aligned uint8 host buffer of exactly `nbytes`, pinned until close()."""
        if nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        base = torch.empty(nbytes + 2 * _ALIGN, dtype=torch.uint8)
        offset = -base.data_ptr() % _ALIGN
        span = -(-nbytes // _ALIGN) * _ALIGN
        ptr = base.data_ptr() + offset
        torch.cuda.check_error(torch.cuda.cudart().cudaHostRegister(ptr, span, 0))
        self._pinned.append(base)
        return base[offset : offset + nbytes]

    def _view(self, slot: int, index: int, dtype: torch.dtype, k: int) -> torch.Tensor:
        start = index * self._region
        return self._slots[slot][start : start + k * dtype.itemsize].view(dtype)

    def extrapolate(
        self,
        out: torch.Tensor,
        ref: torch.Tensor,
        mem: torch.Tensor,
        prev: torch.Tensor | None,
        coeffs: Coefficients,
    ) -> bool:
        """Same contract as CpuBackend.extrapolate: 1-D host tensors (pinned for overlap), result
        in `out`, False if any output value is not finite. Returns when `out` is written."""
        n = out.numel()
        if ref.numel() != n or mem.numel() != n or (prev is not None and prev.numel() != n):
            raise ValueError("extrapolate: operands differ in length")
        if coeffs.momentum and prev is None:
            raise ValueError("extrapolate: momentum needs prev")
        inputs = [ref, mem] + ([prev] if coeffs.momentum else [])
        piece = min(self.slot_elems, max(MIN_PIECE, -(-n // SLOTS)))
        with torch.cuda.device(self.device):
            with torch.cuda.stream(self._compute):
                self._bad.zero_()
            for i, start in enumerate(range(0, n, piece)):
                stop = min(n, start + piece)
                k, s = stop - start, i % SLOTS
                with torch.cuda.stream(self._h2d):
                    if self._slot_free[s] is not None:
                        self._h2d.wait_event(self._slot_free[s])
                    dev_in = []
                    for j, t in enumerate(inputs):
                        d = self._view(s, j, t.dtype, k)
                        d.copy_(t[start:stop], non_blocking=True)
                        dev_in.append(d)
                    copied = self._h2d.record_event()
                dev_out = self._view(s, 3, out.dtype, k)
                self._compute.wait_event(copied)
                with torch.cuda.stream(self._compute):
                    launch(
                        dev_out,
                        dev_in[0],
                        dev_in[1],
                        dev_in[2] if coeffs.momentum else None,
                        coeffs,
                        self._bad,
                        block=self.block,
                        num_warps=self.num_warps,
                    )
                    computed = self._compute.record_event()
                self._d2h.wait_event(computed)
                with torch.cuda.stream(self._d2h):
                    out[start:stop].copy_(dev_out, non_blocking=True)
                    self._slot_free[s] = self._d2h.record_event()
            self._d2h.synchronize()
            self._compute.synchronize()
            return int(self._bad.item()) == 0

    def close(self) -> None:
        """Wait for the device, free its buffers and unpin the host buffers."""
        torch.cuda.synchronize(self.device)
        for base in self._pinned:
            offset = -base.data_ptr() % _ALIGN
            torch.cuda.check_error(torch.cuda.cudart().cudaHostUnregister(base.data_ptr() + offset))
        self._pinned = []
        self._slots = []
        self._slot_free = [None] * SLOTS
