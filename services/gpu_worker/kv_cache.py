"""KV cache of the v0 engine: one contiguous buffer per request, reserved whole at admission.

Reserving prompt + max_new_tokens up front means a running request never needs more memory,
so the scheduler can never deadlock; the price is fragmentation and over-reservation, which
the unified paged pool removes later.
"""

from __future__ import annotations

import torch


class RequestKVCache:
    """K and V of one request for every layer: [num_layers, capacity, kv_heads, head_dim]."""

    def __init__(
        self,
        num_layers: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        shape = (num_layers, capacity, num_kv_heads, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.capacity = capacity

    def write(
        self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new K/V at [start, start + n) and return views of everything cached so far."""
        end = start + k.shape[0]
        if end > self.capacity:
            raise RuntimeError(f"KV cache overflow: {end} tokens > capacity {self.capacity}")
        self.k[layer, start:end] = k
        self.v[layer, start:end] = v
        return self.k[layer, :end], self.v[layer, :end]


class KVCacheBudget:
    """Counts reserved tokens against a fixed capacity; hands out per-request caches."""

    def __init__(
        self,
        capacity_tokens: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ):
        self.capacity_tokens = capacity_tokens
        self.used_tokens = 0
        self._layout = (num_layers, num_kv_heads, head_dim, dtype, device)

    @property
    def free_tokens(self) -> int:
        return self.capacity_tokens - self.used_tokens

    def allocate(self, tokens: int) -> RequestKVCache:
        if tokens > self.free_tokens:
            raise MemoryError(f"{tokens} KV tokens asked, {self.free_tokens} free")
        layers, kv_heads, head_dim, dtype, device = self._layout
        cache = RequestKVCache(layers, tokens, kv_heads, head_dim, dtype, device)
        self.used_tokens += tokens
        return cache

    def release(self, cache: RequestKVCache) -> None:
        self.used_tokens -= cache.capacity
