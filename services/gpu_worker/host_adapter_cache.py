"""Canonical adapters held in host memory, least recently used dropped first, bounded by bytes."""

from __future__ import annotations

import threading
from collections import OrderedDict

from services.common.lora_format import CanonicalAdapter


def adapter_nbytes(adapter: CanonicalAdapter) -> int:
    tensors = [*adapter.lora_a.values(), *adapter.lora_b.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


class HostAdapterCache:
    """LRU by bytes. Thread-safe, so that the engine thread may read stats while the event
    loop fills it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[str, tuple[CanonicalAdapter, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, adapter_id: str) -> CanonicalAdapter | None:
        with self._lock:
            entry = self._entries.get(adapter_id)
            if entry is None:
                return None
            self._entries.move_to_end(adapter_id)
            return entry[0]

    def put(self, adapter_id: str, adapter: CanonicalAdapter) -> list[str]:
        """Keep `adapter`, dropping the least recently used until it fits; the dropped ids.
        One larger than the whole budget is not kept (and nothing is dropped for it)."""
        size = adapter_nbytes(adapter)
        if size > self.max_bytes:
            return []
        evicted: list[str] = []
        with self._lock:
            self._remove(adapter_id)
            while self._bytes + size > self.max_bytes:
                oldest = next(iter(self._entries))
                self._remove(oldest)
                evicted.append(oldest)
            self._entries[adapter_id] = (adapter, size)
            self._bytes += size
        return evicted

    def pop(self, adapter_id: str) -> None:
        with self._lock:
            self._remove(adapter_id)

    def ids(self) -> list[str]:
        """Least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def _remove(self, adapter_id: str) -> None:
        entry = self._entries.pop(adapter_id, None)
        if entry is not None:
            self._bytes -= entry[1]
