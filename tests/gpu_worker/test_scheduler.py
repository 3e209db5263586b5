"""The scheduler alone, on a real pool, adapter manager and slot tables: FCFS admission by
memory and by the prefill budget, early abort, prefetch, and what a removal gives back.

Numbers are worked out by hand: a token takes 2 KV slots (K and V); each adapter here is rank
4 on q_proj with 64-wide slots, so 4 A rows + 4 B columns = 8 slots.
"""

from __future__ import annotations

import random
import time

import pytest
import torch

from services.common.lora_format import CanonicalAdapter
from services.gpu_worker.engine import scheduler as scheduler_module
from services.gpu_worker.engine.config import PREFETCH_WINDOW, EngineConfig
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.scheduler import ScheduledStep, Scheduler
from services.gpu_worker.engine.sequence import Sequence
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.memory.adapter_manager import AdapterManager
from services.gpu_worker.memory.kv_slot_tables import KvSlotTables
from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool

CPU = torch.device("cpu")
ADAPTER_SLOTS = 8


def _scheduler(
    pool_slots: int = 1000, max_num_seqs: int = 4, budget: int = 4096, admission_batch: int = 1
) -> Scheduler:
    config = EngineConfig(
        max_num_seqs=max_num_seqs,
        max_prefill_tokens=budget,
        max_loras=max_num_seqs + 20,
        admission_batch=admission_batch,
    )
    pool = UnifiedMemoryPool(1, pool_slots, 64, torch.float32, CPU)
    adapters = AdapterManager(pool, config.max_loras, max_adapter_slots=64)
    return Scheduler(config, pool, adapters, KvSlotTables(max_num_seqs, 64, CPU))


def _seq(
    prompt_len: int,
    max_total: int | None = None,
    adapter: CanonicalAdapter | None = None,
    deadline: float | None = None,
) -> Sequence:
    seq = Sequence(
        "r",
        list(range(3, 3 + prompt_len)),
        SamplingOptions(max_new_tokens=4),
        ByteTokenizer(),
        lambda out: None,
        adapter=adapter,
        deadline=deadline,
    )
    seq.max_total_tokens = max_total if max_total is not None else prompt_len + 4
    return seq


def _adapter(adapter_id: str) -> CanonicalAdapter:
    gen = torch.Generator().manual_seed(len(adapter_id))
    adapter = CanonicalAdapter(adapter_id, 4, 8.0, 2.0, "tiny", sha256=adapter_id)
    adapter.lora_a["q_proj"] = torch.randn(1, 4, 64, generator=gen)
    adapter.lora_b["q_proj"] = torch.randn(1, 64, 4, generator=gen)
    return adapter


def _add(sched: Scheduler, *seqs: Sequence) -> None:
    for seq in seqs:
        sched.add(seq)


def _advance(step: ScheduledStep) -> None:
    """What the engine's pass does to the requests' state: each chunk's K/V are cached, and
    a decode caches the token before the one it samples."""
    for seq, n in zip(step.prefill, step.chunks, strict=True):
        seq.num_cached += n
    for seq in step.decode:
        seq.num_cached += 1


def test_the_prefill_budget_admits_in_order_and_chunks_the_prompt_that_overflows():
    sched = _scheduler(budget=10)
    a, b, c, d = _seq(5), _seq(5), _seq(1), _seq(1)
    _add(sched, a, b, c, d)
    step = sched.schedule()
    assert step.prefill == [a, b] and step.chunks == [5, 5] and step.decode == []
    assert list(sched.waiting) == [c, d] and sched.running == [a, b]
    sched2 = _scheduler(budget=10)
    small, big, last = _seq(4), _seq(7), _seq(1)
    _add(sched2, small, big, last)
    first = sched2.schedule()
    # 7 > 6 left: its first 6 tokens run now; nothing behind it is admitted.
    assert first.prefill == [small, big] and first.chunks == [4, 6]
    assert list(sched2.waiting) == [last] and (big.num_allocated, big.num_cached) == (6, 0)
    _advance(first)
    second = sched2.schedule()
    # The part-done prompt goes first, then the next in line; `small` decodes.
    assert second.prefill == [big, last] and second.chunks == [1, 1]
    assert second.decode == [small] and second.q_lens == [1, 1, 1]
    assert second.seqs == [big, last, small]


def test_a_prompt_longer_than_the_budget_runs_in_chunks_over_several_steps():
    sched = _scheduler(budget=4)
    long, short = _seq(11, max_total=14), _seq(1)
    _add(sched, long, short)
    chunks = []
    while long.prefilling:
        step = sched.schedule()
        assert step.prefill[0] is long and sum(step.chunks) <= 4
        chunks.append(step.chunks[0])
        # Slots for a chunk are taken when it runs, out of the promise made at admission.
        assert long.num_allocated == long.num_cached + step.chunks[0]
        promised = 2 * sum(s.max_total_tokens for s in sched.running)
        assert sched.pool.promised + sched.pool.kv_used == promised
        _advance(step)
    assert chunks == [4, 4, 3]
    assert step.prefill == [long, short] and step.chunks == [3, 1]  # the last chunk's leftover


def test_running_requests_decode_and_max_num_seqs_bounds_admission():
    sched = _scheduler(max_num_seqs=2)
    a, b, c = _seq(2), _seq(2), _seq(2)
    _add(sched, a, b, c)
    first = sched.schedule()
    assert first.prefill == [a, b] and list(sched.waiting) == [c]
    for seq in (a, b):
        seq.num_cached = 2
    second = sched.schedule()
    assert second.prefill == [] and second.decode == [a, b]


def test_admission_promises_every_kv_slot_a_request_may_need():
    sched = _scheduler(pool_slots=100)
    a, b, c = _seq(6, max_total=30), _seq(2, max_total=21), _seq(1, max_total=2)
    _add(sched, a, b, c)
    step = sched.schedule()
    # a promises 60 of 100 slots; b would need 42 > 40 left: b waits, and c (4) behind it too.
    assert step.prefill == [a] and list(sched.waiting) == [b, c]
    # Its 6 prompt tokens took 12 of the 60 promised slots.
    assert (sched.pool.promised, sched.pool.kv_used) == (48, 12)
    fits = _seq(1, max_total=20)  # 40 slots: exactly what is left
    sched2 = _scheduler(pool_slots=100)
    _add(sched2, _seq(6, max_total=30), fits)
    assert len(sched2.schedule().prefill) == 2


def test_each_step_takes_its_tokens_slots_out_of_the_promise_and_records_them():
    sched = _scheduler()
    a, b = _seq(3, max_total=10), _seq(2, max_total=10)
    _add(sched, a, b)
    sched.schedule()
    assert (a.num_allocated, b.num_allocated) == (3, 2)
    assert (sched.pool.kv_used, sched.pool.promised) == (10, 40 - 10)
    a.num_cached, b.num_cached = 3, 2
    sched.schedule()  # decode: one token each
    assert (a.num_allocated, b.num_allocated) == (4, 3)
    assert (sched.pool.kv_used, sched.pool.promised) == (14, 26)
    owned = []
    for seq in (a, b):
        n = seq.num_allocated
        owned += sched.kv_tables.k_table[seq.table_row, :n].tolist()
        owned += sched.kv_tables.v_table[seq.table_row, :n].tolist()
    assert len(owned) == 14 and len(set(owned)) == 14  # every token its own K and V slot
    assert a.table_row != b.table_row


def test_nothing_to_allocate_takes_nothing():
    sched = _scheduler()
    step = sched.schedule()
    assert step.empty and step.prefill == [] and step.decode == [] and step.expired == []
    assert (sched.pool.kv_used, sched.pool.promised) == (0, 0)


def test_scheduled_step_is_empty_without_prefill_or_decode():
    seq = _seq(1)
    assert ScheduledStep([], [], [seq]).empty
    assert not ScheduledStep([seq], []).empty and not ScheduledStep([], [seq]).empty


def test_waiting_requests_past_their_deadline_are_dropped_before_admission():
    sched = _scheduler()
    now = time.monotonic()
    late, on_time, patient = _seq(2, deadline=now - 1), _seq(2, deadline=now + 100), _seq(2)
    _add(sched, late, on_time, patient)
    step = sched.schedule()
    assert step.expired == [late] and step.prefill == [on_time, patient]
    assert late.table_row == -1 and sched.pool.promised == 2 * 2 * 6 - 2 * 4


def test_admission_stamps_the_time_and_takes_a_table_row():
    sched = _scheduler()
    seq = _seq(2)
    sched.add(seq)
    before = time.monotonic()
    sched.schedule()
    assert seq.scheduled_at is not None and before <= seq.scheduled_at <= time.monotonic()
    assert 0 <= seq.table_row < 4 and sched.kv_tables.free_rows == 3


def test_an_admitted_request_holds_its_adapter():
    sched = _scheduler()
    adapter = _adapter("a")
    seq = _seq(2, adapter=adapter)
    sched.add(seq)
    sched.schedule()
    assert seq.resident is not None and seq.resident.refs == 1
    assert sched.adapters.is_resident(adapter)


def test_cached_adapters_are_evicted_only_as_far_as_the_request_needs():
    sched = _scheduler(pool_slots=100)
    old, other = _adapter("old"), _adapter("other")
    for adapter in (old, other):
        sched.adapters.release(sched.adapters.acquire(adapter))
    # 84 free slots; 46 tokens need 92: evicting the least recently used (8) is enough.
    seq = _seq(1, max_total=46)
    sched.add(seq)
    assert sched.schedule().prefill == [seq]
    assert sched.adapters.resident_keys() == [other.key]


def test_a_request_never_evicts_its_own_cached_adapter():
    sched = _scheduler(pool_slots=100)
    own = _adapter("own")
    sched.adapters.release(sched.adapters.acquire(own))  # cached: 92 slots left
    too_big = _seq(1, max_total=47, adapter=own)  # 94 > 92, and its own 8 cannot go
    sched.add(too_big)
    assert sched.schedule().prefill == [] and sched.adapters.is_resident(own)
    sched2 = _scheduler(pool_slots=100)
    sched2.adapters.release(sched2.adapters.acquire(own))
    fits = _seq(1, max_total=46, adapter=own)  # 92: fits beside its own adapter
    sched2.add(fits)
    assert sched2.schedule().prefill == [fits] and sched2.adapters.evictions == 0


def test_a_missing_adapter_counts_against_the_pool():
    sched = _scheduler(pool_slots=100)
    seq = _seq(1, max_total=47, adapter=_adapter("new"))  # 94 + 8 > 100
    sched.add(seq)
    assert sched.schedule().prefill == []
    sched2 = _scheduler(pool_slots=100)
    seq2 = _seq(1, max_total=46, adapter=_adapter("new"))  # 92 + 8 = 100
    sched2.add(seq2)
    assert sched2.schedule().prefill == [seq2]


def test_prefetch_loads_waiting_adapters_while_the_pool_has_room():
    sched = _scheduler(pool_slots=100, max_num_seqs=1)
    running = _seq(1, max_total=42)  # promises 84: 16 slots of room, two adapters
    a, b, c = _adapter("a"), _adapter("b"), _adapter("c")
    _add(sched, running, _seq(1, adapter=a), _seq(1, adapter=a), _seq(1), _seq(1, adapter=b))
    sched.add(_seq(1, adapter=c))
    sched.schedule()
    assert sched.adapters.resident_keys() == [a.key, b.key]
    assert sched.adapters.evictable_slots() == 2 * ADAPTER_SLOTS  # prefetched, not held


def test_prefetch_looks_only_at_the_window_of_waiting_requests():
    sched = _scheduler(max_num_seqs=1)
    adapters = [_adapter(f"w{i}") for i in range(PREFETCH_WINDOW + 1)]
    sched.add(_seq(1))
    _add(sched, *(_seq(1, adapter=a) for a in adapters))
    sched.schedule()
    assert sched.adapters.resident_keys() == [a.key for a in adapters[:PREFETCH_WINDOW]]


def test_removing_a_running_request_gives_back_its_slots_promise_row_and_adapter():
    sched = _scheduler(pool_slots=100)
    adapter = _adapter("a")
    seq = _seq(3, max_total=10, adapter=adapter)
    sched.add(seq)
    sched.schedule()
    resident = seq.resident
    assert resident is not None
    assert (sched.pool.kv_used, sched.pool.promised, sched.kv_tables.free_rows) == (6, 14, 3)
    sched.remove(seq)
    assert (sched.pool.kv_used, sched.pool.promised, sched.kv_tables.free_rows) == (0, 0, 4)
    assert sched.pool.free_kv_slots() == 100 - ADAPTER_SLOTS
    assert seq.table_row == -1 and seq.resident is None and resident.refs == 0
    assert sched.running == [] and sched.find(seq.seq_id) is None
    sched.remove(seq)  # a second removal changes nothing
    assert (sched.pool.kv_used, sched.pool.promised, sched.kv_tables.free_rows) == (0, 0, 4)


def test_removing_a_waiting_request_takes_it_out_of_the_queue_only():
    sched = _scheduler(max_num_seqs=1)
    running, waiting = _seq(2), _seq(2)
    _add(sched, running, waiting)
    sched.schedule()
    promised = sched.pool.promised
    sched.remove(waiting)
    assert list(sched.waiting) == [] and sched.running == [running]
    assert sched.pool.promised == promised and sched.kv_tables.free_rows == 0  # one row, held


def test_find_looks_among_running_and_waiting_requests():
    sched = _scheduler(max_num_seqs=1)
    running, waiting = _seq(2), _seq(2)
    _add(sched, running, waiting)
    sched.schedule()
    assert sched.find(running.seq_id) is running and sched.find(waiting.seq_id) is waiting
    assert sched.find(-5) is None


def test_a_request_whose_deadline_is_now_is_dropped(monkeypatch):
    monkeypatch.setattr(scheduler_module.time, "monotonic", lambda: 1000.0)
    sched = _scheduler()
    due = _seq(2, deadline=1000.0)
    sched.add(due)
    assert sched.schedule().expired == [due] and sched.running == []


def test_a_lone_decode_step_takes_its_one_tokens_slots():
    sched = _scheduler()
    seq = _seq(3, max_total=10)
    sched.add(seq)
    sched.schedule()
    seq.num_cached = 3
    sched.schedule()
    assert seq.num_allocated == 4 and sched.pool.kv_used == 8
    assert sched.kv_tables.k_table[seq.table_row, 3] != sched.kv_tables.v_table[seq.table_row, 3]


def test_making_room_spares_the_requests_own_adapter_even_when_it_is_the_oldest():
    sched = _scheduler(pool_slots=100)
    own, other = _adapter("own"), _adapter("other")
    for adapter in (own, other):  # own is the least recently used
        sched.adapters.release(sched.adapters.acquire(adapter))
    # 84 free; 46 tokens need 92: one eviction, and it must be `other`, not `own`.
    seq = _seq(1, max_total=46, adapter=own)
    sched.add(seq)
    assert sched.schedule().prefill == [seq]
    assert sched.adapters.resident_keys() == [own.key]
    # Two misses to cache them, then a hit at admission: `own` was never reloaded.
    assert (sched.adapters.hits, sched.adapters.misses, sched.adapters.evictions) == (1, 2, 1)


def test_aborting_a_request_part_way_through_its_prompt_gives_everything_back():
    sched = _scheduler(pool_slots=100, budget=4)
    adapter = _adapter("a")
    seq = _seq(10, max_total=12, adapter=adapter)
    sched.add(seq)
    _advance(sched.schedule())
    sched.schedule()  # its second chunk has slots, and has not run
    assert seq.prefilling and seq.num_allocated == 8 and sched.pool.kv_used == 16
    resident = seq.resident
    assert resident is not None
    sched.remove(seq)
    assert (sched.pool.kv_used, sched.pool.promised, sched.kv_tables.free_rows) == (0, 0, 4)
    assert sched.pool.free_kv_slots() == 100 - ADAPTER_SLOTS and resident.refs == 0
    assert sched.running == [] and sched.schedule().empty


def test_deadlines_drop_waiting_requests_but_never_one_part_way_through_its_prompt():
    sched = _scheduler(budget=4)
    started, queued = _seq(10), _seq(2)
    _add(sched, started, queued)
    _advance(sched.schedule())
    past = time.monotonic() - 1
    started.deadline = queued.deadline = past
    step = sched.schedule()
    assert step.expired == [queued] and step.prefill == [started] and step.chunks == [4]


def _check_step(sched: Scheduler, step: ScheduledStep, budget: int, partial: list[Sequence]):
    """The step's rules, given the requests part-way through their prompt before it."""
    assert sum(step.chunks) <= budget and all(n >= 1 for n in step.chunks)
    # Every request past its prompt decodes, every step; the part-done prompt goes first.
    assert step.decode == [s for s in sched.running if not s.prefilling]
    assert step.prefill[: len(partial)] == partial and len(partial) <= 1
    # Only the last chunk of a step may stop short of its prompt's end.
    for seq, n in list(zip(step.prefill, step.chunks, strict=True))[:-1]:
        assert seq.num_cached + n == len(seq.prompt_ids)
    # Each running request holds slots for what has run and what runs now, and the promise
    # covers the rest of its prompt + max_new_tokens.
    for seq, n in zip(step.seqs, step.q_lens, strict=True):
        assert seq.num_allocated == seq.num_cached + n
    assert sched.pool.kv_used == 2 * sum(s.num_allocated for s in sched.running)
    promised = 2 * sum(s.max_total_tokens for s in sched.running)
    assert sched.pool.kv_used + sched.pool.promised == promised


@pytest.mark.parametrize("seed", range(12))
def test_random_traffic_keeps_the_budget_order_and_memory(seed: int):
    """Requests arrive at random, with random prompt lengths, and some are aborted while
    waiting, part-way through their prompt or decoding: every step keeps the budget rule,
    FCFS admission and the pool's accounting; everyone else finishes; the pool ends empty."""
    rng = random.Random(seed)
    budget = rng.choice([1, 3, 7, 16])
    pool_slots = rng.choice([60, 150, 1000])
    sched = _scheduler(pool_slots=pool_slots, max_num_seqs=3, budget=budget)
    arrivals = []
    for _ in range(20):
        prompt = rng.randint(1, 20)
        arrivals.append(_seq(prompt, max_total=prompt + rng.randint(1, 5)))
    pending, admitted, finished, aborted = list(arrivals), [], [], []
    for _ in range(1000):
        for _ in range(min(rng.randint(0, 2), len(pending))):
            sched.add(pending.pop(0))
        if rng.random() < 0.1 and (sched.running or sched.waiting):
            victim = rng.choice([*sched.running, *sched.waiting])
            sched.remove(victim)
            aborted.append(victim)
        partial = [s for s in sched.running if s.prefilling and s.num_cached > 0]
        before = list(sched.running)
        step = sched.schedule()
        admitted += [s for s in sched.running if s not in before]
        _check_step(sched, step, budget, partial)
        if sched.waiting and not step.prefill:  # only memory or max_num_seqs holds it back
            held = 2 * sum(s.max_total_tokens for s in sched.running)
            need = 2 * sched.waiting[0].max_total_tokens
            assert len(sched.running) == 3 or need > pool_slots - held
        _advance(step)
        for seq in step.seqs:
            if not seq.prefilling and seq.num_cached + 1 >= seq.max_total_tokens:
                sched.remove(seq)
                finished.append(seq)
        if not pending and not sched.running and not sched.waiting:
            break
    assert not pending and not sched.running and not sched.waiting  # nobody starved
    assert admitted == [s for s in arrivals if s in admitted]  # FCFS
    assert sorted(map(id, finished + aborted)) == sorted(map(id, arrivals))
    assert (sched.pool.kv_used, sched.pool.promised, sched.kv_tables.free_rows) == (0, 0, 3)


def _full_decoding(max_num_seqs: int, admission_batch: int) -> Scheduler:
    """A scheduler whose every running place holds a request past its prompt."""
    sched = _scheduler(4000, max_num_seqs, admission_batch=admission_batch)
    _add(sched, *(_seq(4) for _ in range(max_num_seqs)))
    _advance(sched.schedule())  # nothing decodes yet: all join at once
    assert len(sched.running) == max_num_seqs
    return sched


def test_with_an_admission_batch_prompts_join_only_when_that_many_places_are_free():
    """max_num_seqs 32, batch 4: while 10 wait, finishing requests free places one by one,
    and no prompt joins until 4 can join in one step."""
    sched = _full_decoding(32, admission_batch=4)
    _add(sched, *(_seq(4) for _ in range(10)))
    for freed in range(1, 4):
        sched.remove(sched.running[0])
        step = sched.schedule()
        _advance(step)
        assert step.prefill == [] and len(step.decode) == 32 - freed
    sched.remove(sched.running[0])
    step = sched.schedule()
    assert len(step.prefill) == 4 and len(step.decode) == 28 and len(sched.waiting) == 6


def test_an_admission_batch_never_holds_back_fewer_waiting_requests_than_it():
    """One request waiting and one place free: it joins at once (low load never waits)."""
    sched = _full_decoding(32, admission_batch=4)
    _add(sched, _seq(4))
    sched.remove(sched.running[0])
    assert len(sched.schedule().prefill) == 1


def test_the_admission_batch_is_capped_at_an_eighth_of_max_num_seqs():
    """max_num_seqs 16 caps a batch of 8 at 2: the running batch never drains to refill."""
    sched = _full_decoding(16, admission_batch=8)
    _add(sched, *(_seq(4) for _ in range(8)))
    sched.remove(sched.running[0])
    _advance(step := sched.schedule())
    assert step.prefill == []
    sched.remove(sched.running[0])
    assert len(sched.schedule().prefill) == 2


def test_the_admission_batch_must_be_positive():
    with pytest.raises(ValueError, match="--admission-batch"):
        EngineConfig(admission_batch=0)


def test_a_request_whose_token_in_flight_is_its_last_gets_no_decode():
    """Overlap scheduling: a token of the running step counts toward its request's length, so
    a request whose token in flight is its last (by max_new_tokens, 4 here, or by its context)
    is left out of the next step; one token short of either, it decodes."""
    sched = _scheduler(max_num_seqs=8)
    seqs = {
        "three made": (_seq(3, max_total=20), 3, 0),
        "two made, one in flight": (_seq(3, max_total=20), 2, 1),
        "three made, one in flight": (_seq(3, max_total=20), 3, 1),
        "context of 5, one made, one in flight": (_seq(3, max_total=5), 1, 1),
        "context of 6, one made, one in flight": (_seq(3, max_total=6), 1, 1),
    }
    _add(sched, *(seq for seq, _, _ in seqs.values()))
    sched.schedule()
    for seq, made, in_flight in seqs.values():
        seq.output_ids = list(range(10, 10 + made))
        seq.tokens_in_flight = in_flight
        seq.num_cached = len(seq.prompt_ids) + made + in_flight - 1
    decoding = {name for name, (seq, _, _) in seqs.items() if seq in sched.schedule().decode}
    assert decoding == {
        "three made",
        "two made, one in flight",
        "context of 6, one made, one in flight",
    }
