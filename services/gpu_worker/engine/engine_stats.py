"""What the engine reports about itself, as an immutable snapshot.

The engine thread makes one after each step and while idle (engine_loop.py); the event
loop's readers (GetStats, the heartbeat, the metrics) read that snapshot and never the
scheduler's or the adapter manager's live structures, which the engine thread changes
meanwhile (an OrderedDict iterated while it changes raises).
"""

from __future__ import annotations

from dataclasses import dataclass

from services.gpu_worker.memory.memory_pool import PoolStats


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
    decode_steps: int = 0
    decode_step_seconds: float = 0.0
    prompt_steps: int = 0
    prompt_step_seconds: float = 0.0
    # Of those seconds, the part spent waiting for the device's tokens; and the tokens the
    # steps ran (prompt chunks and decodes).
    decode_step_wait_seconds: float = 0.0
    prompt_step_wait_seconds: float = 0.0
    decode_step_tokens: int = 0
    prompt_step_tokens: int = 0
