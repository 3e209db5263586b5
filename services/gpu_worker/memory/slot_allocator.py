"""Hands out slot indices of the memory pool: any free slots, never contiguous ranges.

The free slots live in a stack on the pool's device; `alloc` and `free` move many slots at
once with one slice or one copy, so the hot path has no per-slot Python work.
"""

from __future__ import annotations

import torch


class SlotAllocator:
    """Free-list of the slot indices [start, start + count)."""

    def __init__(self, count: int, device: torch.device, start: int = 0):
        self.capacity = count
        self._stack = torch.arange(start, start + count, dtype=torch.int64, device=device)
        self._top = count  # free slots are _stack[:_top]

    @property
    def num_free(self) -> int:
        return self._top

    def alloc(self, n: int) -> torch.Tensor:
        """n free slot indices (int64, on the pool's device); MemoryError when fewer are free."""
        if n > self._top:
            raise MemoryError(f"{n} slots asked, {self._top} free")
        self._top -= n
        return self._stack[self._top : self._top + n].clone()

    def free(self, slots: torch.Tensor) -> None:
        n = slots.numel()
        if self._top + n > self.capacity:
            raise RuntimeError(f"freeing {n} slots overfills the pool: a slot was freed twice")
        self._stack[self._top : self._top + n] = slots.reshape(-1)
        self._top += n
