"""Reusable host buffers for the copies to and from the device.

Pinned (page-locked) memory is what lets a host-to-device copy run asynchronously, beside the
kernels of the previous batch; allocating it costs far more than the copy itself (a
``cudaHostAlloc`` per request would serialise the worker), so buffers are kept and reused.

A buffer is a flat uint8 tensor; a batch takes the smallest idle one that is large enough and
views its first bytes in the shape it needs, so a handful of buffers serve every bucket and
batch size. A buffer is lent out until the batch that used it has finished on the device,
and the idle pool is capped, so memory stays bounded whatever sizes clients send.
"""

from __future__ import annotations

import math
import threading

import torch

# Allocation granularity: sizes round up to this, so near-equal batches share buffers.
_CHUNK = 1 << 20


class HostBuffers:
    def __init__(self, pinned: bool, max_idle: int = 8) -> None:
        self.pinned = pinned
        self.max_idle = max_idle
        self._idle: list[torch.Tensor] = []
        self._lent: dict[int, torch.Tensor] = {}  # data_ptr of a lent view -> its buffer
        self._lock = threading.Lock()
        self.allocations = 0
        """How many buffers were ever allocated (the rest of the takes were reuses)."""

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        """A uint8 tensor of ``shape`` (contents undefined), lent until ``give``."""
        nbytes = math.prod(shape)
        with self._lock:
            # The idle list is sorted largest first: the last one that fits is the smallest.
            fits = [i for i, b in enumerate(self._idle) if b.numel() >= nbytes]
            flat = self._idle.pop(fits[-1]) if fits else None
        if flat is None:
            size = max(_CHUNK, -(-nbytes // _CHUNK) * _CHUNK)
            # A normal tensor even when called under inference_mode (the pool outlives it).
            with torch.inference_mode(False):
                flat = torch.empty(size, dtype=torch.uint8, pin_memory=self.pinned)
            self.allocations += 1
        view = flat[:nbytes].view(shape)
        with self._lock:
            self._lent[view.data_ptr()] = flat
        return view

    def give(self, *tensors: torch.Tensor) -> None:
        """Return tensors from ``take`` once nothing (no pending copy) reads them any more."""
        with self._lock:
            for t in tensors:
                self._idle.append(self._lent.pop(t.data_ptr()))
            # Keep the largest: they serve every smaller request.
            self._idle.sort(key=torch.Tensor.numel, reverse=True)
            del self._idle[self.max_idle :]

    @property
    def idle_bytes(self) -> int:
        with self._lock:
            return sum(b.numel() for b in self._idle)
