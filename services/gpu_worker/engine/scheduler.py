"""FCFS scheduler over the unified pool: admission by memory, chunked prefill under a per-step
token budget, early abort.

A request is admitted when the pool can promise it every KV slot it may ever need (prompt +
tokens to come) plus its adapter's slots, evicting unreferenced adapters if that makes room
(the pool answers what fits: memory_pool.py). Promised slots are taken as tokens run, and
nothing else may take them, so a running request never runs out of memory: no preemption is
ever needed and the engine cannot deadlock. A request that could never fit is refused at
submission; one that does not fit now waits its turn (FCFS, so nothing behind it starves
it); the waiting queue's bound is the engine loop's, at submission.

Each step carries every running request that has finished its prompt (one decode token
each) and prompt tokens up to `max_prefill_tokens`: the rule is that a step's prompt tokens
never exceed the budget, and only the decode batch (at most `max_num_seqs` tokens) comes on
top. A prompt longer than what is left of the budget runs as a chunk now and the rest in
later steps, its earlier chunks' K/V already in the pool. Prompts are served in admission
order: a partially prefilled request continues before any new one is admitted, so at most
one request is ever part-way through its prompt, and every step with a prompt to run makes
progress on the oldest one (no starvation). Only the chunk that ends a prompt samples a token.

With overlap scheduling (engine.py) a step is scheduled while the previous one runs: a
request's token of that step is in flight (`Sequence.tokens_in_flight`), and its `num_cached`
already counts it. A request whose token in flight is its last by length gets no decode: it
ends when that token is read back, and this step would only waste its row.

Waiting requests whose deadline has passed are dropped before they cost any compute (S-LoRA's
early abort); an admitted request, even part-way through its prompt, is never dropped so: it
has taken compute and memory already, and finishing its prompt is the shortest way to give
them back. Adapters of the requests next in line are loaded ahead of their turn when the pool
has room to spare.
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
    """One step's work: prompt chunks (`prefill[i]` runs its next `chunks[i]` prompt tokens),
    then one decode token for each request in `decode`."""

    prefill: list[Sequence]
    decode: list[Sequence]
    expired: list[Sequence] = field(default_factory=list)
    chunks: list[int] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode

    @property
    def seqs(self) -> list[Sequence]:
        """The requests of the pass, in batch order."""
        return self.prefill + self.decode

    @property
    def q_lens(self) -> list[int]:
        """Each request's new tokens in this pass, in batch order."""
        return self.chunks + [1] * len(self.decode)


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
        step = ScheduledStep(prefill=[], decode=[], expired=self._expire())
        budget = self.config.max_prefill_tokens
        for seq in self.running:  # admission order: a part-done prompt goes first
            if not seq.prefilling:
                if not seq.reaches_length(seq.next_token_index):
                    step.decode.append(seq)
            elif budget > 0:
                budget -= self._chunk(step, seq, budget)
        admitting = self._admission_open(len(step.decode))
        while (
            admitting
            and budget > 0
            and self.waiting
            and len(self.running) < self.config.max_num_seqs
        ):
            seq = self.waiting[0]
            if not self._make_room(seq):
                break
            self.waiting.popleft()
            self._admit(seq)
            budget -= self._chunk(step, seq, budget)
        self._prefetch()
        self._allocate(step.seqs, step.q_lens)
        return step

    def _admission_open(self, decoding: int) -> bool:
        """Whether waiting requests may join this step. With requests decoding, they join only
        when `admission_batch` of them (fewer if fewer wait; at most an eighth of
        max_num_seqs, so the batch never drains to refill) have running places: on a GPU a
        step with prompts pays a fixed eager pass however few it brings."""
        limit = self.config.max_num_seqs
        want = min(self.config.admission_batch, len(self.waiting), max(1, limit // 8))
        return decoding == 0 or limit - len(self.running) >= want

    @staticmethod
    def _chunk(step: ScheduledStep, seq: Sequence, budget: int) -> int:
        """Put as much of `seq`'s remaining prompt as `budget` allows into `step`."""
        n = min(len(seq.prompt_ids) - seq.num_cached, budget)
        step.prefill.append(seq)
        step.chunks.append(n)
        return n

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

    def _allocate(self, seqs: list[Sequence], counts: list[int]) -> None:
        """Take the slots of this step's tokens (`counts[i]` for `seqs[i]`) out of the
        requests' promises, for all of them at once."""
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
