"""GPU residency of adapters in the unified pool: load, reference-count, evict, prefetch.

An adapter is resident while its slots hold its weights. Running requests hold references;
an unreferenced resident adapter stays cached until the scheduler needs its slots, and then
the least recently used goes first. Loads for waiting requests (prefetch) copy on a side CUDA
stream so they overlap the engine's compute; a request waits on its adapter's copy only when
it is admitted.

Residency is keyed by the adapter's identity, `CanonicalAdapter.key` (id, version, sha256):
a value, never the Python object, since a worker may fetch one adapter many times as new
objects, and a freed object's address goes to the next one made. One identity has one
resident copy. An older version of an id is evicted as soon as nothing references it while a
newer version of that id is resident.
"""

from __future__ import annotations

import logging
from collections import Counter, OrderedDict
from dataclasses import dataclass

import torch

from services.common.lora_format import AdapterKey, CanonicalAdapter
from services.gpu_worker.memory.adapter_layout import (
    ProjSegment,
    adapter_slot_count,
    segments_of,
    slots_of,
    write_adapter,
)
from services.gpu_worker.memory.adapter_tables import AdapterTables
from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool

logger = logging.getLogger(__name__)


@dataclass
class ResidentAdapter:
    key: AdapterKey
    rank: int
    slots: torch.Tensor  # [num_slots] pool indices, on the device
    segments: dict[str, ProjSegment]
    row: int  # its row in the adapter tables
    refs: int = 0
    ready: torch.cuda.Event | None = None  # set while a side-stream copy may be in flight

    @property
    def adapter_id(self) -> str:
        return self.key.adapter_id


class AdapterManager:
    def __init__(self, pool: UnifiedMemoryPool, max_loras: int, max_adapter_slots: int):
        self.pool = pool
        self.tables = AdapterTables(max_loras, max_adapter_slots, pool.buffer.device)
        self.device = pool.buffer.device
        self._resident: OrderedDict[AdapterKey, ResidentAdapter] = OrderedDict()  # LRU first
        self._copies_of: Counter[str] = Counter()  # resident versions per adapter id
        self._ids: tuple[str, ...] | None = None  # resident_ids, until residency changes
        self._side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.hits = self.misses = self.evictions = 0  # since it was made

    def slot_count(self, adapter: CanonicalAdapter) -> int:
        return adapter_slot_count(adapter, self.pool.width)

    def is_resident(self, adapter: CanonicalAdapter) -> bool:
        return adapter.key in self._resident

    def missing_slots(self, adapter: CanonicalAdapter | None) -> int:
        """Slots `adapter` would take if loaded now (0 when resident or None)."""
        if adapter is None or self.is_resident(adapter):
            return 0
        return self.slot_count(adapter)

    def evictable_slots(self, keep: CanonicalAdapter | None = None) -> int:
        return sum(
            r.slots.numel()
            for key, r in self._resident.items()
            if r.refs == 0 and (keep is None or key != keep.key)
        )

    def evict_until_free(self, free_target: int, keep: CanonicalAdapter | None = None) -> None:
        """Evict unreferenced adapters, least recently used first, until the adapter
        allocator has `free_target` free slots (or nothing more can go)."""
        for key in list(self._resident):
            if self.pool.free_adapter_slots() >= free_target:
                return
            resident = self._resident[key]
            if resident.refs == 0 and (keep is None or key != keep.key):
                self._evict(key)

    def load(self, adapter: CanonicalAdapter, background: bool = False) -> ResidentAdapter:
        """Copy `adapter` into freshly allocated slots (the caller made room)."""
        key = adapter.key
        if key in self._resident:
            return self._resident[key]
        if self.tables.free_rows == 0:
            self._evict_lru_unreferenced()
        segments = segments_of(adapter, self.pool.width)
        slots = self.pool.alloc_adapter(slots_of(segments))
        try:
            row = self.tables.add(slots, segments)
        except ValueError:  # an adapter the tables cannot hold must not keep its slots
            self.pool.free_adapter(slots)
            raise
        resident = ResidentAdapter(key, adapter.rank, slots, segments, row)
        if self._side is not None and background:
            self._side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._side):
                write_adapter(self.pool.buffer, slots, adapter, segments)
                resident.ready = torch.cuda.Event()
                resident.ready.record(self._side)
        else:
            write_adapter(self.pool.buffer, slots, adapter, segments)
        self._resident[key] = resident
        self._copies_of[key.adapter_id] += 1
        self._ids = None
        logger.info(
            "adapter %s v%d resident in %d slots", key.adapter_id, key.version, slots.numel()
        )
        self._evict_superseded(key.adapter_id, keep=key)
        return resident

    def acquire(self, adapter: CanonicalAdapter) -> ResidentAdapter:
        """Reference a resident adapter for a request about to run (loading it if needed)."""
        key = adapter.key
        if key in self._resident:
            self.hits += 1
        else:
            self.misses += 1
            self.load(adapter)
        resident = self._resident[key]
        self._resident.move_to_end(key)
        if resident.ready is not None:  # the compute stream must see the prefetched weights
            torch.cuda.current_stream(self.device).wait_event(resident.ready)
            resident.ready = None
        resident.refs += 1
        return resident

    def release(self, resident: ResidentAdapter) -> None:
        resident.refs -= 1
        if resident.refs == 0:
            self._evict_superseded(resident.adapter_id)

    def _evict_superseded(self, adapter_id: str, keep: AdapterKey | None = None) -> None:
        """Evict the unreferenced versions of `adapter_id` older than its newest resident one
        (but `keep`, just loaded for a request pinned to it): new requests for the id run on
        the newest, so the old slots would only sit idle."""
        if self._copies_of[adapter_id] < 2:  # the common case, without a scan
            return
        versions = [k for k in self._resident if k.adapter_id == adapter_id]
        newest = max(k.version for k in versions)
        for key in versions:
            if key.version < newest and key != keep and self._resident[key].refs == 0:
                self._evict(key)

    def _evict_lru_unreferenced(self) -> None:
        for key, resident in self._resident.items():
            if resident.refs == 0:
                self._evict(key)
                return
        raise MemoryError("every adapter-table row is held by a running request")

    def _evict(self, key: AdapterKey) -> None:
        resident = self._resident.pop(key)
        self._copies_of[key.adapter_id] -= 1
        self._ids = None
        if not self._copies_of[key.adapter_id]:
            del self._copies_of[key.adapter_id]
        if resident.ready is not None:
            resident.ready.synchronize()
        self.pool.free_adapter(resident.slots)
        self.tables.remove(resident.row)
        self.evictions += 1
        logger.info("adapter %s v%d evicted", key.adapter_id, key.version)

    def resident_keys(self) -> list[AdapterKey]:
        """Identities of the resident adapters, least recently used first."""
        return list(self._resident)

    def resident_ids(self) -> tuple[str, ...]:
        """Ids of the resident adapters, sorted; kept between loads and evictions, since the
        engine asks after every step."""
        if self._ids is None:
            self._ids = tuple(sorted({r.adapter_id for r in self._resident.values()}))
        return self._ids
