"""GPU residency of adapters in the unified pool: load, reference-count, evict, prefetch.

An adapter is resident while its slots hold its weights. Running requests hold references;
an unreferenced resident adapter stays cached until the scheduler needs its slots, and then
the least recently used goes first. Loads for waiting requests (prefetch) copy on a side CUDA
stream so they overlap the engine's compute; a request waits on its adapter's copy only when
it is admitted.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from dataclasses import dataclass

import torch

from services.common.lora_format import CanonicalAdapter
from services.gpu_worker.adapter_layout import ProjSegment, adapter_slot_count, pack_adapter
from services.gpu_worker.adapter_tables import AdapterTables
from services.gpu_worker.memory_pool import UnifiedMemoryPool

logger = logging.getLogger(__name__)


@dataclass
class ResidentAdapter:
    adapter_id: str
    rank: int
    slots: torch.Tensor  # [num_slots] pool indices, on the device
    segments: dict[str, ProjSegment]
    row: int  # its row in the adapter tables
    refs: int = 0
    ready: torch.cuda.Event | None = None  # set while a side-stream copy may be in flight
    staging: torch.Tensor | None = None  # pinned source of that copy, kept alive until done


class AdapterManager:
    def __init__(self, pool: UnifiedMemoryPool, max_loras: int, max_adapter_slots: int):
        self.pool = pool
        self.tables = AdapterTables(max_loras, max_adapter_slots, pool.buffer.device)
        self.device = pool.buffer.device
        self._resident: OrderedDict[int, ResidentAdapter] = OrderedDict()  # LRU first
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.reset_counters()

    def reset_counters(self) -> None:
        """Zero the hit, miss, eviction and load counts (benchmarks exclude their warm-up)."""
        self.hits = self.misses = self.evictions = self.loads = 0

    def slot_count(self, adapter: CanonicalAdapter) -> int:
        return adapter_slot_count(adapter, self.pool.width)

    def is_resident(self, adapter: CanonicalAdapter) -> bool:
        return id(adapter) in self._resident

    def missing_slots(self, adapter: CanonicalAdapter | None) -> int:
        """Slots `adapter` would take if loaded now (0 when resident or None)."""
        if adapter is None or self.is_resident(adapter):
            return 0
        return self.slot_count(adapter)

    def evictable_slots(self, keep: CanonicalAdapter | None = None) -> int:
        return sum(
            r.slots.numel()
            for key, r in self._resident.items()
            if r.refs == 0 and (keep is None or key != id(keep))
        )

    def evict_until_free(self, free_target: int, keep: CanonicalAdapter | None = None) -> None:
        """Evict unreferenced adapters, least recently used first, until the adapter
        allocator has `free_target` free slots (or nothing more can go)."""
        for key in list(self._resident):
            if self.pool.free_adapter_slots() >= free_target:
                return
            resident = self._resident[key]
            if resident.refs == 0 and (keep is None or key != id(keep)):
                self._evict(key)

    def load(self, adapter: CanonicalAdapter, background: bool = False) -> ResidentAdapter:
        """Copy `adapter` into freshly allocated slots (the caller made room)."""
        key = id(adapter)
        if key in self._resident:
            return self._resident[key]
        if self.tables.free_rows == 0:
            self._evict_lru_unreferenced()
        packed = pack_adapter(
            adapter, self.pool.width, self.pool.buffer.dtype, pin=self._side is not None
        )
        slots = self.pool.alloc_adapter(packed.num_slots)
        row = self.tables.add(slots, packed.segments)
        resident = ResidentAdapter(adapter.adapter_id, adapter.rank, slots, packed.segments, row)
        if self._side is not None and background:
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                self._copy_in(packed.data, slots)
                resident.ready = torch.cuda.Event()
                resident.ready.record(self._side)
            resident.staging = packed.data
        else:
            self._copy_in(packed.data, slots)
        self._resident[key] = resident
        self.loads += 1
        logger.info("adapter %s resident in %d slots", adapter.adapter_id, slots.numel())
        return resident

    def _copy_in(self, data: torch.Tensor, slots: torch.Tensor) -> None:
        on_device = data.to(self.device, non_blocking=True)
        self.pool.buffer.index_copy_(1, slots, on_device)

    def acquire(self, adapter: CanonicalAdapter) -> ResidentAdapter:
        """Reference a resident adapter for a request about to run (loading it if needed)."""
        key = id(adapter)
        if key in self._resident:
            self.hits += 1
        else:
            self.misses += 1
            self.load(adapter)
        resident = self._resident[key]
        self._resident.move_to_end(key)
        if resident.ready is not None:  # the compute stream must see the prefetched weights
            torch.cuda.current_stream(self.device).wait_event(resident.ready)
            resident.ready, resident.staging = None, None
        resident.refs += 1
        return resident

    def release(self, resident: ResidentAdapter) -> None:
        resident.refs -= 1

    def _evict_lru_unreferenced(self) -> None:
        for key, resident in self._resident.items():
            if resident.refs == 0:
                self._evict(key)
                return
        raise MemoryError("every adapter-table row is held by a running request")

    def _evict(self, key: int) -> None:
        resident = self._resident.pop(key)
        if resident.ready is not None:
            resident.ready.synchronize()
        self.pool.free_adapter(resident.slots)
        self.tables.remove(resident.row)
        self.evictions += 1
        logger.info("adapter %s evicted", resident.adapter_id)

    def resident_ids(self) -> list[str]:
        return sorted({r.adapter_id for r in self._resident.values()})
