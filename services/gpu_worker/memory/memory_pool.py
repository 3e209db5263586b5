"""S-LoRA's unified memory pool: KV cache and adapter weights in one set of fixed-width slots.

Each layer has a buffer of `num_slots` slots of `width` = num_kv_heads * head_dim elements
(the width of one token's K or V). A token takes two slot indices (its K and its V); an
adapter takes the slots its A rows and B columns cover (see `adapter_layout`). One index
means the same slot in every layer, so one index table serves the whole model. Nothing is
ever allocated contiguously, so nothing fragments, and KV cache and adapters compete for the
same slots. With `unified=False` (the benchmark's "no-unified-pool" ablation) the slots are
split into two fixed regions, one for KV and one for adapters.

The pool also keeps the ledger of promised KV slots (taken by admitted requests as their
tokens arrive, and by nothing else) and answers the fit questions the engine asks: can a
request ever fit, does it fit now, how much adapter memory must be freed for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from services.gpu_worker.memory.slot_allocator import SlotAllocator

CPU_DEFAULT_SLOTS = 32768  # a laptop-sized pool when no GPU memory can be measured
KV_SLOTS_PER_TOKEN = 2  # a token's K and its V


@dataclass(frozen=True)
class PoolStats:
    total_slots: int
    free_slots: int
    kv_slots: int
    adapter_slots: int
    # KV slots promised to admitted requests and not allocated yet: what admission counts
    # as taken beyond `kv_slots` (prompt + max_new_tokens of each running request).
    promised_slots: int = 0


class UnifiedMemoryPool:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        unified: bool = True,
        adapter_region_slots: int = 0,
    ):
        self.buffer = torch.zeros(num_layers, num_slots, width, dtype=dtype, device=device)
        self.num_slots, self.width, self.unified = num_slots, width, unified
        if unified:
            self._kv = self._adapters = SlotAllocator(num_slots, device)
        else:
            if not 0 < adapter_region_slots < num_slots:
                raise ValueError("a split pool needs 0 < adapter_region_slots < num_slots")
            kv_count = num_slots - adapter_region_slots
            self._kv = SlotAllocator(kv_count, device)
            self._adapters = SlotAllocator(adapter_region_slots, device, start=kv_count)
        self.kv_used = 0
        self.adapter_used = 0
        self.promised = 0  # KV slots promised to admitted requests and not yet allocated
        self._scratch = 0

    @classmethod
    def slots_for_memory(cls, num_layers: int, width: int, dtype: torch.dtype, nbytes: int) -> int:
        per_slot = num_layers * width * torch.empty((), dtype=dtype).element_size()
        return max(nbytes // per_slot, 0)

    @classmethod
    def default_slots(
        cls, num_layers: int, width: int, dtype: torch.dtype, device: torch.device, fraction: float
    ) -> int:
        """Slots for `fraction` of the device's free memory now (a fixed count on the CPU)."""
        if device.type != "cuda":
            return CPU_DEFAULT_SLOTS
        free, _ = torch.cuda.mem_get_info(device)
        return cls.slots_for_memory(num_layers, width, dtype, int(free * fraction))

    @staticmethod
    def kv_slots_for(tokens: int) -> int:
        """KV slots `tokens` tokens take."""
        return KV_SLOTS_PER_TOKEN * tokens

    def can_ever_fit(self, kv_slots: int, adapter_slots: int) -> bool:
        """Whether a request needing these slots fits the pool when nothing else is in it."""
        if self.unified:
            return kv_slots + adapter_slots <= self.num_slots
        return kv_slots <= self.kv_capacity() and adapter_slots <= self.adapter_capacity()

    def can_fit_now(self, kv_slots: int, adapter_slots: int, evictable: int) -> bool:
        """Whether these slots can be promised and allocated now, without breaking any promise,
        once the `evictable` adapter slots are evicted."""
        if self.unified:
            return kv_slots + adapter_slots <= self.kv_headroom() + evictable
        fits_kv = kv_slots <= self.kv_headroom()
        return fits_kv and adapter_slots <= self.free_adapter_slots() + evictable

    def adapter_free_target(self, kv_slots: int, adapter_slots: int) -> int:
        """Free slots the adapter allocator must have (evicting if need be) to take these
        slots on top of every promise."""
        if self.unified:
            return self.promised + kv_slots + adapter_slots
        return adapter_slots

    def prefetch_room(self) -> int:
        """Adapter slots a prefetch may fill now without touching any promise."""
        return self.kv_headroom() if self.unified else self.free_adapter_slots()

    def kv_headroom(self) -> int:
        """KV slots free and not promised to anyone."""
        return self.free_kv_slots() - self.promised

    def promise_kv(self, n: int) -> None:
        self.promised += n

    def alloc_promised_kv(self, n: int) -> torch.Tensor:
        """n of the promised KV slots, allocated now."""
        slots = self.alloc_kv(n)
        self.promised -= n
        return slots

    def drop_promise(self, n: int) -> None:
        """Forget n promised slots (a request ended before it took them)."""
        self.promised -= n

    def free_kv_slots(self) -> int:
        return self._kv.num_free

    def free_adapter_slots(self) -> int:
        return self._adapters.num_free

    def kv_capacity(self) -> int:
        return self._kv.capacity - self._scratch

    def reserve_scratch(self, n: int) -> list[int]:
        """Take n slots out of service for good (padding rows of CUDA graphs write there)."""
        slots = self._kv.alloc(n)
        self._scratch += n
        self.num_slots -= n
        return [int(s) for s in slots.tolist()]

    def adapter_capacity(self) -> int:
        return self._adapters.capacity

    def alloc_kv(self, n: int) -> torch.Tensor:
        slots = self._kv.alloc(n)
        self.kv_used += n
        return slots

    def free_kv(self, slots: torch.Tensor) -> None:
        self._kv.free(slots)
        self.kv_used -= slots.numel()

    def alloc_adapter(self, n: int) -> torch.Tensor:
        slots = self._adapters.alloc(n)
        self.adapter_used += n
        return slots

    def free_adapter(self, slots: torch.Tensor) -> None:
        self._adapters.free(slots)
        self.adapter_used -= slots.numel()

    def stats(self) -> PoolStats:
        free = self._kv.num_free + (0 if self.unified else self._adapters.num_free)
        return PoolStats(self.num_slots, free, self.kv_used, self.adapter_used, self.promised)
