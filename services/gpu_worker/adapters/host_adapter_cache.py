"""Canonical adapters held in host memory, least recently used dropped first, bounded by bytes.

Entries are keyed by adapter identity (`AdapterKey`: id, version, sha256), so versions of
one id are separate entries and a re-uploaded adapter is never taken for the old one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from services.common.lora_format import AdapterKey, CanonicalAdapter


def adapter_nbytes(adapter: CanonicalAdapter) -> int:
    tensors = [*adapter.lora_a.values(), *adapter.lora_b.values()]
    return sum(t.numel() * t.element_size() for t in tensors)


class HostAdapterCache:
    """LRU by bytes. Thread-safe, so that the engine thread may read stats while the event
    loop fills it."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self._entries: OrderedDict[AdapterKey, tuple[CanonicalAdapter, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: AdapterKey) -> CanonicalAdapter | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            return entry[0]

    def put(self, key: AdapterKey, adapter: CanonicalAdapter) -> list[AdapterKey]:
        """Keep `adapter`, dropping the least recently used until it fits; the dropped keys.
        One larger than the whole budget is not kept (and nothing is dropped for it)."""
        size = adapter_nbytes(adapter)
        if size > self.max_bytes:
            return []
        evicted: list[AdapterKey] = []
        with self._lock:
            self._remove(key)
            while self._bytes + size > self.max_bytes:
                oldest = next(iter(self._entries))
                self._remove(oldest)
                evicted.append(oldest)
            self._entries[key] = (adapter, size)
            self._bytes += size
        return evicted

    def pop(self, key: AdapterKey) -> None:
        with self._lock:
            self._remove(key)

    def drop(self, adapter_id: str, below_version: int | None = None) -> list[AdapterKey]:
        """Drop every entry of `adapter_id` (only those older than `below_version` when
        given); the dropped keys. Requests running on one keep their own reference."""
        with self._lock:
            doomed = [
                k
                for k in self._entries
                if k.adapter_id == adapter_id
                and (below_version is None or k.version < below_version)
            ]
            for key in doomed:
                self._remove(key)
        return doomed

    def list_keys(self) -> list[AdapterKey]:
        """Least recently used first."""
        with self._lock:
            return list(self._entries)

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def _remove(self, key: AdapterKey) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._bytes -= entry[1]
