"""What the worker's gRPC process and its engine process (`--engine-process`) send each other
over their pipe, as picklable values.

gRPC process to engine process, in lists of what was queued at once (one read for the engine
thread between two steps), in the order they must act:
- `("adapter_file", AdapterKey, path)`: an adapter's weights (`CanonicalAdapter.to_file`)
  in a file in shared memory that the engine process reads and removes (adapter_handoff.py),
  sent before the first request that runs on it; `("adapter", AdapterKey, blob)`: its
  `CanonicalAdapter.to_bytes` in the message, when no such file can be written;
- `("forget", AdapterKey)`: the engine process may drop its copy (requests already holding
  it keep it until they end);
- `("submit", Submit)`, `("abort", seq_id)`, `("stop",)`.

Engine process to gRPC process:
- `("ready", EngineInfo)` once the engine is built, or `("failed", message)`;
- `("outputs", [(seq_id, StepOutput), ...], (EngineStats, settled) | None)` after each step:
  its outputs, and now and then the stats with the count of requests the engine has taken in
  or refused by then (`settled`), which the waiting-queue bound counts against.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.common.base_model import BaseModelShape
from services.common.lora_format import AdapterKey
from services.gpu_worker.engine.engine_stats import EngineStats
from services.gpu_worker.engine.request_limits import RequestLimits
from services.gpu_worker.engine.sampling import SamplingOptions


@dataclass(frozen=True)
class EngineInfo:
    """What the gRPC process needs to know of the engine it serves."""

    limits: RequestLimits
    dtype: str  # torch's name without the prefix: "bfloat16"
    shape: BaseModelShape
    max_waiting: int
    stats: EngineStats


@dataclass(frozen=True)
class Submit:
    """One request, as the engine process rebuilds its `Sequence`."""

    seq_id: int  # the gRPC process's: outputs and aborts name the request by it
    request_id: str
    prompt_ids: list[int]
    options: SamplingOptions
    adapter: AdapterKey | None
    deadline: float | None  # time.monotonic(), the same clock in both processes
    arrival: float
