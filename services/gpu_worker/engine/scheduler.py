"""FCFS scheduler over the unified pool: admission by memory, early abort.

A request is admitted when the pool can promise it every KV slot it may ever need (prompt +
tokens to come) plus its adapter's slots, evicting unreferenced adapters if that makes room
(the pool answers what fits: memory_pool.py). Promised slots are taken as tokens arrive, and
nothing else may take them, so a running request never runs out of memory: no preemption is
ever needed and the engine cannot deadlock. A request that could never fit is refused at
submission; one that does not fit now waits its turn (FCFS, so nothing behind it starves
it); the waiting queue's bound is the engine loop's, at submission. Waiting requests whose
deadline has passed are dropped before they cost any compute (S-LoRA's early abort).
Adapters of the requests next in line are loaded ahead of their turn when the pool has room
to spare.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from services.gpu_worker.engine.config import PREFETCH_WINDOW, EngineConfig
from services.gpu_worker.engine.sequence import Sequence
from services.gpu_worker.memory.adapter_manager import AdapterManager
from services.gpu_worker.memory.kv_slot_tables import KvSlotTables
from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool


@dataclass
class ScheduledStep:
    prefill: list[Sequence]
    decode: list[Sequence]
    expired: list[Sequence] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(
        self,
        config: EngineConfig,
        pool: UnifiedMemoryPool,
        adapters: AdapterManager,
        kv_tables: KvSlotTables,
    ):
        self.config = config
        self.pool, self.adapters, self.kv_tables = pool, adapters, kv_tables
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledStep:
        step = ScheduledStep(prefill=[], decode=list(self.running), expired=self._expire())
        budget = self.config.max_prefill_tokens
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            # The first prefill of a step may exceed the token budget, so no prompt starves.
            if (step.prefill and len(seq.prompt_ids) > budget) or not self._make_room(seq):
                break
            self.waiting.popleft()
            self._admit(seq)
            step.prefill.append(seq)
            budget -= len(seq.prompt_ids)
        self._prefetch()
        self._allocate(step.prefill + step.decode)
        return step

    def _make_room(self, seq: Sequence) -> bool:
        kv_need = self.pool.kv_slots_for(seq.max_total_tokens)
        ad_need = self.adapters.missing_slots(seq.adapter)
        evictable = self.adapters.evictable_slots(keep=seq.adapter)
        if not self.pool.can_fit_now(kv_need, ad_need, evictable):
            return False
        target = self.pool.adapter_free_target(kv_need, ad_need)
        self.adapters.evict_until_free(target, keep=seq.adapter)
        return True

    def _admit(self, seq: Sequence) -> None:
        self.pool.promise_kv(self.pool.kv_slots_for(seq.max_total_tokens))
        seq.table_row = self.kv_tables.take_row()
        if seq.adapter is not None:
            seq.resident = self.adapters.acquire(seq.adapter)
        seq.scheduled_at = time.monotonic()
        self.running.append(seq)

    def _allocate(self, seqs: list[Sequence]) -> None:
        """Take this step's slots out of the requests' promises, for all of them at once."""
        counts = [(len(s.prompt_ids) if s.num_cached == 0 else 1) for s in seqs]
        total = sum(counts)
        if total == 0:
            return
        slots = self.pool.alloc_promised_kv(self.pool.kv_slots_for(total)).to(torch.int32)
        starts = [s.num_allocated for s in seqs]
        self.kv_tables.write([s.table_row for s in seqs], starts, counts, slots)
        for seq, n in zip(seqs, counts, strict=True):
            seq.num_allocated += n

    def _prefetch(self) -> None:
        spare = self.pool.prefetch_room()
        for seq in list(self.waiting)[:PREFETCH_WINDOW]:
            need = self.adapters.missing_slots(seq.adapter)
            if need and need <= spare and seq.adapter is not None:
                self.adapters.load(seq.adapter, background=True)
                spare -= need

    def _expire(self) -> list[Sequence]:
        now = time.monotonic()
        expired = [s for s in self.waiting if s.deadline is not None and s.deadline <= now]
        for seq in expired:
            self.waiting.remove(seq)
        return expired

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted request out; return its slots and its promise."""
        if seq in self.waiting:
            self.waiting.remove(seq)
            return
        if seq not in self.running:
            return
        self.running.remove(seq)
        n = seq.num_allocated
        slots = self.kv_tables.release_row(seq.table_row, n)
        if n:
            self.pool.free_kv(slots)
        self.pool.drop_promise(self.pool.kv_slots_for(seq.max_total_tokens - n))
        seq.table_row = -1
        if seq.resident is not None:
            self.adapters.release(seq.resident)
            seq.resident = None

    def find(self, seq_id: int) -> Sequence | None:
        """The request with this internal id (`Sequence.seq_id`), running or waiting."""
        for seq in (*self.running, *self.waiting):
            if seq.seq_id == seq_id:
                return seq
        return None
