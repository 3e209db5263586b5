"""FCFS scheduler of the v0 engine: admission by reserved KV tokens, bounded waiting queue.

A request is admitted only when its whole KV reservation (prompt + tokens to come) fits, so
running requests never run out of memory and nothing ever needs preempting.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from services.common.errors import ResourceExhausted
from services.gpu_worker.kv_cache import KVCacheBudget
from services.gpu_worker.sequence import SeqStatus, Sequence


@dataclass
class ScheduledStep:
    prefill: list[Sequence]
    decode: list[Sequence]

    @property
    def empty(self) -> bool:
        return not self.prefill and not self.decode


class Scheduler:
    def __init__(
        self, kv: KVCacheBudget, max_num_seqs: int, max_prefill_tokens: int, max_waiting: int
    ):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.max_waiting = max_waiting
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        if len(self.waiting) >= self.max_waiting:
            raise ResourceExhausted(f"waiting queue full ({self.max_waiting}); retry later")
        self.waiting.append(seq)

    def schedule(self) -> ScheduledStep:
        decode = list(self.running)
        prefill: list[Sequence] = []
        budget = self.max_prefill_tokens
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            # The first prefill of a step may exceed the token budget, so no prompt starves.
            if prefill and len(seq.prompt_ids) > budget:
                break
            if seq.max_total_tokens > self.kv.free_tokens:
                break
            self.waiting.popleft()
            seq.kv = self.kv.allocate(seq.max_total_tokens)
            seq.status = SeqStatus.RUNNING
            self.running.append(seq)
            prefill.append(seq)
            budget -= len(seq.prompt_ids)
        return ScheduledStep(prefill=prefill, decode=decode)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted request out and release its KV reservation."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        if seq.kv is not None:
            self.kv.release(seq.kv)
            seq.kv = None

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None
