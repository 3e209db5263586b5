"""The slot allocator under random interleavings of alloc and free (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gpu_worker.memory_pool import UnifiedMemoryPool
from services.gpu_worker.slot_allocator import SlotAllocator

CAPACITY = 64
ops = st.lists(
    st.tuples(st.sampled_from(["alloc", "free"]), st.integers(0, 24), st.integers(0, 10**6)),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_never_hands_out_a_slot_twice_never_loses_one(script):
    allocator = SlotAllocator(CAPACITY, torch.device("cpu"), start=100)
    held: list[torch.Tensor] = []
    for op, n, pick in script:
        if op == "alloc":
            if n > allocator.num_free:
                with pytest.raises(MemoryError):
                    allocator.alloc(n)
                continue
            held.append(allocator.alloc(n))
        elif held:
            allocator.free(held.pop(pick % len(held)))
        taken = torch.cat(held).tolist() if held else []
        assert len(taken) == len(set(taken)), "a slot was handed out twice"
        assert all(100 <= s < 100 + CAPACITY for s in taken)
        assert allocator.num_free + len(taken) == CAPACITY, "a slot was lost"
    for block in held:
        allocator.free(block)
    assert allocator.num_free == CAPACITY
    assert sorted(allocator.alloc(CAPACITY).tolist()) == list(range(100, 100 + CAPACITY))


def test_double_free_is_detected():
    allocator = SlotAllocator(8, torch.device("cpu"))
    block = allocator.alloc(8)
    allocator.free(block)
    with pytest.raises(RuntimeError, match="freed twice"):
        allocator.free(block[:1])


def test_split_pool_keeps_kv_and_adapters_in_their_regions():
    pool = UnifiedMemoryPool(
        2, 100, 8, torch.float32, torch.device("cpu"), unified=False, adapter_region_slots=30
    )
    kv, adapters = pool.alloc_kv(70), pool.alloc_adapter(30)
    assert kv.max() < 70 <= adapters.min()
    with pytest.raises(MemoryError):
        pool.alloc_kv(1)
    assert pool.stats().free_slots == 0
    pool.free_kv(kv)
    pool.free_adapter(adapters)
    assert pool.stats().free_slots == 100
