"""What the engine reports about itself, as an immutable snapshot.

The engine thread makes one after each step and while idle (engine_loop.py); the event
loop's readers (GetStats, the heartbeat, the metrics) read that snapshot and never the
scheduler's or the adapter manager's live structures, which the engine thread changes
meanwhile (an OrderedDict iterated while it changes raises).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from kernels.compile_watch import Compiles
from services.gpu_worker.memory.memory_pool import PoolStats

if TYPE_CHECKING:
    from services.gpu_worker.engine.inflight_step import StepResult


@dataclass
class StepCounts:
    """Steps the engine launched, the seconds spent in their calls and, of those, waiting for
    the device and the engine thread's CPU time, and the tokens they ran, by kind; and the
    kernels compiled during steps (each stalls its batch); the field names are
    GetStatsResponse's. Host work neither waiting nor on the CPU is time the engine thread
    waited for something else, such as the GIL."""

    decode_steps: int = 0
    decode_step_seconds: float = 0.0
    prompt_steps: int = 0
    prompt_step_seconds: float = 0.0
    decode_step_wait_seconds: float = 0.0
    prompt_step_wait_seconds: float = 0.0
    decode_step_tokens: int = 0
    prompt_step_tokens: int = 0
    kernel_compiles: int = 0
    kernel_compile_seconds: float = 0.0
    decode_step_cpu_seconds: float = 0.0
    prompt_step_cpu_seconds: float = 0.0

    def add(
        self,
        result: StepResult | None,
        seconds: float,
        wait_seconds: float,
        cpu_seconds: float,
        compiles: Compiles,
    ) -> None:
        self.kernel_compiles += compiles.count
        self.kernel_compile_seconds += compiles.seconds
        if result is None:  # nothing launched (nothing to run, or the pass failed)
            return
        if result.prefill_seqs:
            self.prompt_steps += 1
            self.prompt_step_seconds += seconds
            self.prompt_step_wait_seconds += wait_seconds
            self.prompt_step_cpu_seconds += cpu_seconds
            self.prompt_step_tokens += result.tokens
        else:
            self.decode_steps += 1
            self.decode_step_seconds += seconds
            self.decode_step_wait_seconds += wait_seconds
            self.decode_step_cpu_seconds += cpu_seconds
            self.decode_step_tokens += result.tokens


@dataclass(frozen=True)
class EngineStats:
    running_requests: int
    waiting_requests: int
    pool: PoolStats
    resident_adapters: tuple[str, ...]  # ids, sorted
    adapter_cache_hits: int
    adapter_cache_misses: int
    adapter_evictions: int
    # Filled by the engine loop (engine_loop.py), which times each step's call.
    steps: StepCounts = field(default_factory=StepCounts)
