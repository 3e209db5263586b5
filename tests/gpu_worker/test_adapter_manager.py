"""AdapterManager alone: what it loads, what it evicts and in which order, what it keeps.

Each adapter here is rank 4 on q_proj of a 2-layer model whose pool slots are 64 wide: its A
takes 4 rows of 64 and its B 4 columns of 64, so 4 + 4 = 8 slots (by hand).
"""

from __future__ import annotations

import logging

import pytest
import torch

from services.common.lora_format import CanonicalAdapter
from services.gpu_worker.memory.adapter_manager import AdapterManager
from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool

POOL_SLOTS = 512
SLOTS_EACH = 8


def _adapter(adapter_id: str, seed: int = 0, version: int = 1) -> CanonicalAdapter:
    gen = torch.Generator().manual_seed(seed)
    adapter = CanonicalAdapter(adapter_id, 4, 8.0, 2.0, "tiny", version=version, sha256=adapter_id)
    adapter.lora_a["q_proj"] = torch.randn(2, 4, 64, generator=gen)
    adapter.lora_b["q_proj"] = torch.randn(2, 64, 4, generator=gen)
    return adapter


def _manager(max_loras: int = 8) -> AdapterManager:
    pool = UnifiedMemoryPool(2, POOL_SLOTS, 64, torch.float32, torch.device("cpu"))
    return AdapterManager(pool, max_loras=max_loras, max_adapter_slots=64)


def _cached(manager: AdapterManager, *adapters: CanonicalAdapter) -> None:
    """Make each adapter resident and unreferenced, in this order (the LRU order)."""
    for adapter in adapters:
        manager.release(manager.acquire(adapter))


def test_missing_slots_counts_an_adapter_only_until_it_is_resident():
    manager = _manager()
    a = _adapter("a")
    assert manager.missing_slots(None) == 0
    assert manager.slot_count(a) == SLOTS_EACH and manager.missing_slots(a) == SLOTS_EACH
    manager.load(a)
    assert manager.missing_slots(a) == 0
    assert manager.pool.free_adapter_slots() == POOL_SLOTS - SLOTS_EACH
    assert manager.pool.adapter_used == SLOTS_EACH


def test_load_copies_each_layers_a_rows_and_b_columns_into_its_slots():
    manager = _manager()
    a = _adapter("a", seed=3)
    resident = manager.load(a)
    assert resident.slots.numel() == SLOTS_EACH and resident.rank == 4 and resident.refs == 0
    held = manager.pool.buffer[:, resident.slots]  # [layers, 8 slots, 64]
    # The 8 slots hold the 4 rows of A and the 4 columns of B, each a 64-wide vector.
    expected = torch.cat((a.lora_a["q_proj"], a.lora_b["q_proj"].transpose(1, 2)), dim=1)
    for layer in range(2):
        got = sorted(tuple(v) for v in held[layer].tolist())
        assert got == sorted(tuple(v) for v in expected[layer].tolist())
    assert manager.load(a) is resident  # a second load of a resident adapter copies nothing
    assert manager.pool.adapter_used == SLOTS_EACH


def test_evictable_slots_count_only_the_unreferenced_and_spare_the_kept_one():
    manager = _manager()
    a, b, c = _adapter("a"), _adapter("b"), _adapter("c")
    _cached(manager, a, b)
    manager.acquire(c)  # referenced: never evictable
    assert manager.evictable_slots() == 2 * SLOTS_EACH
    assert manager.evictable_slots(keep=a) == SLOTS_EACH
    assert manager.evictable_slots(keep=c) == 2 * SLOTS_EACH


def test_evict_until_free_evicts_least_recently_used_first_and_stops_at_the_target():
    manager = _manager()
    a, b, c, d = (_adapter(n) for n in "abcd")
    _cached(manager, a, b, c)
    manager.release(manager.acquire(a))  # a used again: the order is now b, c, a
    manager.acquire(d)  # referenced, most recent
    free = POOL_SLOTS - 4 * SLOTS_EACH
    assert manager.pool.free_adapter_slots() == free
    manager.evict_until_free(free + 1)  # one eviction is enough: the LRU, b
    assert manager.resident_keys() == [c.key, a.key, d.key]
    assert manager.evictions == 1
    manager.evict_until_free(free + SLOTS_EACH)  # already met: nothing goes
    assert manager.evictions == 1
    manager.evict_until_free(POOL_SLOTS, keep=c)  # c kept, d referenced: only a can go
    assert manager.resident_keys() == [c.key, d.key]
    assert manager.pool.free_adapter_slots() == POOL_SLOTS - 2 * SLOTS_EACH
    assert manager.evictions == 2


def test_a_full_table_evicts_its_least_recently_used_unreferenced_adapter():
    manager = _manager(max_loras=3)
    a, b, c, d = (_adapter(n) for n in "abcd")
    held = manager.acquire(a)  # referenced and oldest: must stay
    _cached(manager, b, c)
    manager.load(d)
    assert manager.resident_keys() == [a.key, c.key, d.key]
    assert manager.evictions == 1 and manager.tables.free_rows == 0
    assert held.refs == 1


def test_a_table_full_of_referenced_adapters_refuses_another():
    manager = _manager(max_loras=2)
    manager.acquire(_adapter("a"))
    manager.acquire(_adapter("b"))
    refusal = r"^every adapter-table row is held by a running request$"
    with pytest.raises(MemoryError, match=refusal):
        manager.load(_adapter("c"))
    assert manager.pool.adapter_used == 2 * SLOTS_EACH  # nothing allocated for the refused one


def test_an_eviction_gives_back_its_slots_and_its_table_row():
    manager = _manager(max_loras=4)
    a = _adapter("a")
    row = manager.load(a).row
    assert manager.tables.free_rows == 3 and manager.tables.meta[row].any()
    manager.evict_until_free(POOL_SLOTS)
    assert not manager.is_resident(a)
    assert manager.tables.free_rows == 4 and not manager.tables.meta[row].any()
    assert manager.pool.free_adapter_slots() == POOL_SLOTS and manager.pool.adapter_used == 0


def test_acquire_counts_hits_and_misses_and_references():
    manager = _manager()
    a = _adapter("a")
    first = manager.acquire(a)
    second = manager.acquire(a)
    assert first is second and first.refs == 2
    assert (manager.hits, manager.misses) == (1, 1)
    manager.release(first)
    assert first.refs == 1 and manager.evictable_slots() == 0
    manager.release(first)
    assert first.refs == 0 and manager.evictable_slots() == SLOTS_EACH
    assert manager.is_resident(a)  # unreferenced adapters stay cached


def test_an_old_version_goes_once_unreferenced_only_when_a_newer_one_is_resident():
    manager = _manager()
    v1, v2, v3 = (_adapter("a", seed=v, version=v) for v in (1, 2, 3))
    other = _adapter("b")
    r1 = manager.acquire(v1)
    r2 = manager.acquire(v2)
    manager.acquire(v3)
    _cached(manager, other)
    manager.release(r2)  # v2 older than v3, unreferenced: goes
    assert [k.version for k in manager.resident_keys() if k.adapter_id == "a"] == [1, 3]
    manager.release(r1)
    assert [k.adapter_id for k in manager.resident_keys()] == ["a", "b"]
    assert manager.evictions == 2 and manager.is_resident(other)


def test_a_newer_version_loaded_evicts_an_unreferenced_older_one_at_once():
    manager = _manager()
    v1, v2 = _adapter("a", seed=1, version=1), _adapter("a", seed=2, version=2)
    _cached(manager, v1)
    manager.load(v2)
    assert manager.resident_keys() == [v2.key] and manager.evictions == 1


def test_a_lone_version_is_kept_when_released():
    manager = _manager()
    v2 = _adapter("a", version=2)
    _cached(manager, v2)
    assert manager.resident_keys() == [v2.key] and manager.evictions == 0


def test_resident_ids_are_sorted_unique_and_follow_loads_and_evictions():
    manager = _manager()
    assert manager.resident_ids() == ()
    manager.acquire(_adapter("b"))
    manager.acquire(_adapter("a", version=1))
    manager.acquire(_adapter("a", version=2))
    assert manager.resident_ids() == ("a", "b")
    _cached(manager, _adapter("c"))
    assert manager.resident_ids() == ("a", "b", "c")
    manager.evict_until_free(POOL_SLOTS)
    assert manager.resident_ids() == ("a", "b")


def test_loads_and_evictions_are_logged_with_id_version_and_slots(caplog):
    manager = _manager()
    caplog.set_level(logging.INFO, logger="services.gpu_worker.memory.adapter_manager")
    _cached(manager, _adapter("a", version=7))
    manager.evict_until_free(POOL_SLOTS)
    assert [r.getMessage() for r in caplog.records] == [
        "adapter a v7 resident in 8 slots",
        "adapter a v7 evicted",
    ]


def test_hits_and_misses_add_up():
    manager = _manager()
    a, b = _adapter("a"), _adapter("b")
    for adapter in (a, a, b, a, b):
        manager.acquire(adapter)
    assert (manager.hits, manager.misses) == (3, 2)


def test_a_released_newest_version_stays_beside_a_referenced_older_one():
    manager = _manager()
    v1, v2 = _adapter("a", seed=1, version=1), _adapter("a", seed=2, version=2)
    manager.acquire(v1)  # a request still runs on v1
    manager.release(manager.acquire(v2))
    assert manager.resident_keys() == [v1.key, v2.key] and manager.evictions == 0


def test_a_background_load_without_a_side_stream_copies_at_once():
    manager = _manager()  # CPU: no side stream, so a prefetch is an ordinary copy
    a = _adapter("a", seed=5)
    resident = manager.load(a, background=True)
    assert resident.ready is None
    held = manager.pool.buffer[0, resident.slots]
    assert sorted(tuple(v) for v in held.tolist()) == sorted(
        tuple(v) for v in torch.cat((a.lora_a["q_proj"][0], a.lora_b["q_proj"][0].T)).tolist()
    )


def test_a_resident_keeps_its_segments():
    resident = _manager().load(_adapter("a"))
    assert set(resident.segments) == {"q_proj"} and resident.segments["q_proj"].rank == 4


def test_a_bfloat16_pool_holds_the_adapter_rounded_to_bfloat16():
    pool = UnifiedMemoryPool(2, POOL_SLOTS, 64, torch.bfloat16, torch.device("cpu"))
    manager = AdapterManager(pool, max_loras=8, max_adapter_slots=64)
    a = _adapter("a", seed=6)
    resident = manager.load(a)
    held = pool.buffer[1, resident.slots].float()
    expected = torch.cat((a.lora_a["q_proj"][1], a.lora_b["q_proj"][1].T)).bfloat16().float()
    assert sorted(tuple(v) for v in held.tolist()) == sorted(tuple(v) for v in expected.tolist())


def test_tables_and_copies_live_on_the_pools_device():
    # The meta device stands for a GPU: tables or weights left on the CPU would be read by
    # the GPU's kernels from the wrong device (index_copy_ refuses a CPU source).
    meta = torch.device("meta")
    pool = UnifiedMemoryPool(2, POOL_SLOTS, 64, torch.float32, meta)
    manager = AdapterManager(pool, max_loras=8, max_adapter_slots=64)
    assert manager.tables.slots.device == meta and manager.tables.meta.device == meta
    resident = manager.load(_adapter("a"))
    assert resident.slots.device == meta and resident.slots.numel() == SLOTS_EACH
