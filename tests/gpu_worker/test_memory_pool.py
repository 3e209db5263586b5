"""The unified memory pool's sizing, buffer and bookkeeping, checked by hand arithmetic.

The fit questions themselves are in test_slot_allocator.py; these cover what they lean on.
"""

from __future__ import annotations

import pytest
import torch

from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool

CPU = torch.device("cpu")


def test_slots_for_memory_divides_the_bytes_by_one_slot_across_every_layer():
    # One slot: 4 layers x 16 elements x 2 bytes (bfloat16) = 128 bytes.
    assert UnifiedMemoryPool.slots_for_memory(4, 16, torch.bfloat16, 128 * 10 + 127) == 10
    assert UnifiedMemoryPool.slots_for_memory(4, 16, torch.float32, 256 * 3) == 3
    assert UnifiedMemoryPool.slots_for_memory(4, 16, torch.bfloat16, 127) == 0
    assert UnifiedMemoryPool.slots_for_memory(4, 16, torch.bfloat16, -1) == 0


def test_default_slots_on_the_cpu_is_the_fixed_laptop_pool():
    assert UnifiedMemoryPool.default_slots(4, 16, torch.float32, CPU, 0.5) == 32768


def test_buffer_holds_every_layers_slots_in_the_pools_dtype():
    pool = UnifiedMemoryPool(3, 50, 8, torch.bfloat16, CPU)
    assert tuple(pool.buffer.shape) == (3, 50, 8)
    assert pool.buffer.dtype == torch.bfloat16 and pool.buffer.device == CPU
    assert not pool.buffer.any()
    assert (pool.num_slots, pool.width, pool.unified) == (50, 8, True)
    assert (pool.kv_used, pool.adapter_used, pool.promised) == (0, 0, 0)
    assert pool.kv_capacity() == 50 and pool.adapter_capacity() == 50


@pytest.mark.parametrize("adapter_region", [0, 100, 101, -1])
def test_a_split_pool_refuses_a_region_that_leaves_either_side_empty(adapter_region):
    with pytest.raises(ValueError, match=r"^a split pool needs 0 < adapter_region_slots"):
        UnifiedMemoryPool(1, 100, 8, torch.float32, CPU, False, adapter_region)


def test_a_split_pool_of_one_adapter_slot_or_one_kv_slot_is_accepted():
    low = UnifiedMemoryPool(1, 100, 8, torch.float32, CPU, False, 1)
    assert (low.kv_capacity(), low.adapter_capacity()) == (99, 1)
    high = UnifiedMemoryPool(1, 100, 8, torch.float32, CPU, False, 99)
    assert (high.kv_capacity(), high.adapter_capacity()) == (1, 99)
    assert high.alloc_adapter(99).min().item() == 1  # the adapter region follows the KV one


def test_stats_of_a_unified_pool_count_the_shared_free_slots_once():
    pool = UnifiedMemoryPool(1, 100, 8, torch.float32, CPU)
    kv = pool.alloc_kv(30)
    adapter = pool.alloc_adapter(20)
    stats = pool.stats()
    assert (stats.total_slots, stats.free_slots, stats.kv_slots, stats.adapter_slots) == (
        100,
        50,
        30,
        20,
    )
    pool.free_kv(kv[:10])
    pool.free_adapter(adapter[:5])
    assert pool.stats().free_slots == 65
    assert (pool.kv_used, pool.adapter_used) == (20, 15)
    assert (pool.free_kv_slots(), pool.free_adapter_slots()) == (65, 65)


def test_stats_of_a_split_pool_add_both_regions_free_slots():
    pool = UnifiedMemoryPool(1, 100, 8, torch.float32, CPU, False, 30)
    pool.alloc_kv(60)
    pool.alloc_adapter(25)
    stats = pool.stats()
    assert (stats.total_slots, stats.free_slots, stats.kv_slots, stats.adapter_slots) == (
        100,
        15,
        60,
        25,
    )
    assert (pool.free_kv_slots(), pool.free_adapter_slots()) == (10, 5)


def test_promises_are_kept_apart_from_the_free_count():
    pool = UnifiedMemoryPool(1, 100, 8, torch.float32, CPU)
    pool.promise_kv(40)
    pool.promise_kv(5)
    assert pool.promised == 45 and pool.kv_headroom() == 55 and pool.free_kv_slots() == 100
    slots = pool.alloc_promised_kv(15)
    assert slots.numel() == 15
    assert (pool.promised, pool.kv_used, pool.free_kv_slots(), pool.kv_headroom()) == (
        30,
        15,
        85,
        55,
    )
    pool.drop_promise(30)
    assert pool.promised == 0 and pool.kv_headroom() == 85


def test_scratch_slots_leave_the_kv_capacity_and_the_pools_size():
    pool = UnifiedMemoryPool(1, 100, 8, torch.float32, CPU)
    scratch = pool.reserve_scratch(3)
    assert len(scratch) == 3 and all(type(s) is int for s in scratch)
    assert (pool.num_slots, pool.kv_capacity(), pool.free_kv_slots()) == (97, 97, 97)
    assert pool.kv_used == 0 and pool.stats().total_slots == 97
    assert pool.can_ever_fit(97, 0) and not pool.can_ever_fit(98, 0)


def test_a_split_pool_needs_its_adapter_region_named():
    with pytest.raises(ValueError, match=r"^a split pool needs"):
        UnifiedMemoryPool(1, 100, 8, torch.float32, CPU, unified=False)


@pytest.mark.parametrize("unified", [True, False])
def test_buffer_and_slots_live_on_the_pools_device(unified):
    # The meta device stands for a GPU: a buffer or a slot stack left on the CPU would be
    # indexed from the GPU's kernels.
    meta = torch.device("meta")
    pool = UnifiedMemoryPool(2, 100, 8, torch.float32, meta, unified, 0 if unified else 30)
    assert pool.buffer.device == meta
    assert pool.alloc_kv(3).device == meta and pool.alloc_adapter(3).device == meta


def test_default_slots_on_a_gpu_take_the_fraction_of_its_free_memory(monkeypatch):
    asked: list[torch.device] = []

    def mem_get_info(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return 1_000_000, 8_000_000  # free, total

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    gpu = torch.device("cuda", 1)
    # Half of 1,000,000 free bytes over 3 layers x 16 elements x 2 bytes = 96 bytes a slot.
    slots = UnifiedMemoryPool.default_slots(3, 16, torch.bfloat16, gpu, 0.5)
    assert slots == 500_000 // 96 and asked == [gpu]


def test_used_counts_add_up_over_many_allocations():
    pool = UnifiedMemoryPool(1, 100, 8, torch.float32, CPU)
    pool.alloc_kv(4)
    pool.alloc_kv(6)
    pool.alloc_adapter(5)
    pool.alloc_adapter(7)
    assert (pool.kv_used, pool.adapter_used) == (10, 12)
    pool.reserve_scratch(2)
    pool.reserve_scratch(3)
    assert (pool.num_slots, pool.kv_capacity()) == (95, 95)
