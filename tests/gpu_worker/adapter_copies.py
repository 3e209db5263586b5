"""Counting the adapters copied into a memory pool, for tests that bound those copies."""

from __future__ import annotations

import pytest
import torch

from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool


class AdapterCopies:
    """Adapters copied into `pool` from now on: each copy allocates its slots once."""

    def __init__(self, pool: UnifiedMemoryPool, monkeypatch: pytest.MonkeyPatch):
        self.count = 0
        alloc = pool.alloc_adapter

        def counting_alloc(n: int) -> torch.Tensor:
            self.count += 1
            return alloc(n)

        monkeypatch.setattr(pool, "alloc_adapter", counting_alloc)
