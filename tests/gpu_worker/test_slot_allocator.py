"""The slot allocator under random interleavings of alloc and free (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool
from services.gpu_worker.memory.slot_allocator import SlotAllocator

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


@pytest.mark.parametrize("unified", [True, False])
def test_reserved_scratch_slots_leave_service_for_good(unified):
    """reserve_scratch (CUDA graphs' padding rows write there) takes exactly n slots out of
    the pool: the totals shrink by n and the allocator never hands those slots out again."""
    total, adapter_region, scratch_n = 40, 10, 3
    pool = UnifiedMemoryPool(
        2,
        total,
        8,
        torch.float32,
        torch.device("cpu"),
        unified=unified,
        adapter_region_slots=0 if unified else adapter_region,
    )
    kv_before = total if unified else total - adapter_region
    scratch = pool.reserve_scratch(scratch_n)
    assert len(set(scratch)) == scratch_n
    assert all(0 <= s < kv_before for s in scratch), "scratch comes from the KV slots"
    stats = pool.stats()
    assert stats.total_slots == pool.num_slots == total - scratch_n
    assert stats.free_slots == total - scratch_n
    assert pool.kv_capacity() == kv_before - scratch_n
    assert pool.free_kv_slots() == kv_before - scratch_n
    # The accounting identity the engine's admission relies on holds with scratch taken out.
    assert stats.free_slots + stats.kv_slots + stats.adapter_slots == stats.total_slots

    # Drain everything the pool will still give: never a scratch slot, and exactly the rest.
    handed_out: list[int] = []
    if not unified:
        handed_out += pool.alloc_adapter(adapter_region).tolist()
    handed_out += pool.alloc_kv(kv_before - scratch_n).tolist()
    with pytest.raises(MemoryError):
        pool.alloc_kv(1)
    assert not set(handed_out) & set(scratch)
    assert sorted(handed_out + scratch) == list(range(total))
    stats = pool.stats()
    assert stats.free_slots == 0
    assert stats.free_slots + stats.kv_slots + stats.adapter_slots == stats.total_slots


def test_fit_questions_of_a_unified_pool_by_hand():
    """100 slots shared by KV and adapters; numbers worked out by hand."""
    pool = UnifiedMemoryPool(2, 100, 8, torch.float32, torch.device("cpu"))
    assert pool.kv_slots_for(30) == 60  # a token's K and its V
    assert pool.can_ever_fit(90, 10) and not pool.can_ever_fit(91, 10)
    pool.promise_kv(30)
    adapter = pool.alloc_adapter(20)  # 50 slots free and unpromised
    assert pool.kv_headroom() == 50 and pool.prefetch_room() == 50
    assert pool.can_fit_now(40, 10, evictable=0) and not pool.can_fit_now(41, 10, evictable=0)
    assert pool.can_fit_now(41, 10, evictable=1)
    # The adapter allocator (the same slots) must keep every promise and the new request.
    assert pool.adapter_free_target(40, 10) == 30 + 40 + 10
    taken = pool.alloc_promised_kv(12)
    assert pool.promised == 18 and pool.kv_used == 12 and pool.kv_headroom() == 50
    pool.drop_promise(18)
    pool.free_kv(taken)
    pool.free_adapter(adapter)
    assert pool.promised == 0 and pool.kv_headroom() == 100


def test_fit_questions_of_a_split_pool_by_hand():
    """70 KV slots and 30 adapter slots: each side answers for itself."""
    pool = UnifiedMemoryPool(
        2, 100, 8, torch.float32, torch.device("cpu"), unified=False, adapter_region_slots=30
    )
    assert pool.can_ever_fit(70, 30)
    assert not pool.can_ever_fit(71, 0) and not pool.can_ever_fit(0, 31)
    pool.promise_kv(20)
    adapter = pool.alloc_adapter(25)
    assert pool.kv_headroom() == 50 and pool.prefetch_room() == 5
    assert pool.can_fit_now(50, 5, evictable=0) and not pool.can_fit_now(51, 0, evictable=25)
    assert not pool.can_fit_now(0, 6, evictable=0) and pool.can_fit_now(0, 30, evictable=25)
    assert pool.adapter_free_target(50, 6) == 6  # KV promises live in the other region
    pool.free_adapter(adapter)


def test_slots_are_int64_on_the_pools_device():
    # The meta device stands for a GPU here: a stack built anywhere else would hand out
    # indices on the wrong device, and index_select/scatter in the kernels would refuse them.
    allocator = SlotAllocator(8, torch.device("meta"), start=3)
    slots = allocator.alloc(5)
    assert (slots.device.type, slots.dtype, tuple(slots.shape)) == ("meta", torch.int64, (5,))


def test_refusal_says_how_many_were_asked_and_how_many_are_free():
    allocator = SlotAllocator(8, torch.device("cpu"))
    allocator.alloc(5)
    with pytest.raises(MemoryError, match=r"^6 slots asked, 3 free$"):
        allocator.alloc(6)
