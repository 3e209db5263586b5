"""The engine's settings, their defaults and their checks, in one place.

`Engine` and `Scheduler` take an `EngineConfig` whole. The worker's `WorkerConfig` is an
`EngineConfig` plus the serving settings, so that every field here is also a worker flag
(`--max-num-seqs`) and environment variable (`MANYLORA_MAX_NUM_SEQS`) with this default and
help; the benchmarks build one with the settings they change.

A setting that cannot work is refused when the config is made, by a `ConfigError` (a
ValueError) naming its flag, so nothing fails later deep inside the engine.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from services.common.config import ConfigError

PREFETCH_WINDOW = 8  # waiting requests whose adapters may be loaded ahead of their turn
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")


@dataclass(frozen=True)
class EngineConfig:
    device: str = field(default="auto", metadata={"help": "cuda, cuda:N, cpu, or auto"})
    dtype: str = field(
        default="auto", metadata={"help": "bfloat16, float16, float32, or auto (bf16 on GPU)"}
    )
    max_rank: int = field(default=128, metadata={"help": "largest LoRA rank accepted"})
    pool_slots: int = field(
        default=0,
        metadata={
            "help": "slots of the unified memory pool (a token's K or V takes one); "
            "0 = size from --gpu-memory-fraction on a GPU, 32768 on the CPU"
        },
    )
    gpu_memory_fraction: float = field(
        default=0.85, metadata={"help": "share of free GPU memory the pool takes (pool_slots=0)"}
    )
    unified_pool: bool = field(
        default=True,
        metadata={"help": "KV cache and adapters share one pool (off: S-LoRA's no-unify ablation)"},
    )
    adapter_region_fraction: float = field(
        default=0.25, metadata={"help": "share of the pool kept for adapters when not unified"}
    )
    max_num_seqs: int = field(
        default=0,
        metadata={
            "help": "most requests running at once; 0 = auto: min(256, pool tokens / 512) on a "
            "GPU, 64 on the CPU"
        },
    )
    max_loras: int = field(
        default=512, metadata={"help": "most adapters resident in the pool at once"}
    )
    cuda_graphs: bool = field(
        default=True, metadata={"help": "replay decode steps as CUDA graphs (GPU only)"}
    )
    prefill_graphs: bool = field(
        default=True,
        metadata={
            "help": "replay steps of prompt chunks alone as CUDA graphs too, at bucketed token and "
            "request counts up to 2048 tokens (GPU only, with --cuda-graphs)"
        },
    )
    async_output: bool = field(
        default=True,
        metadata={
            "help": "build a step's outputs (detokenize, stop strings, stream) while the "
            "next step runs on the device; off builds them before the next step starts"
        },
    )
    overlap_schedule: bool = field(
        default=True,
        metadata={
            "help": "schedule and launch each step before reading the previous step's tokens "
            "back, its decodes taking their input ids from those tokens on the device, so the "
            "device does not idle while the host prepares a step"
        },
    )
    max_prefill_tokens: int = field(
        default=4096,
        metadata={
            "help": "prompt tokens per step; a longer prompt runs in chunks over several "
            "steps, and the running requests' decode tokens come on top"
        },
    )
    admission_batch: int = field(
        default=1,
        metadata={
            "help": "while requests decode and more wait than can join, new prompts join only "
            "when this many can join at once (at most --max-num-seqs / 8): each step with "
            "prompts costs a fixed eager pass on a GPU, so fewer, larger ones serve more; "
            "1 = each as soon as it fits"
        },
    )
    max_waiting: int = field(
        default=1024, metadata={"help": "waiting-queue bound (RESOURCE_EXHAUSTED beyond it)"}
    )
    max_model_len: int = field(
        default=0, metadata={"help": "context length cap; 0 = the model's own"}
    )

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ConfigError("dtype", f"{self.dtype!r} is not one of {', '.join(DTYPE_CHOICES)}")
        for name in ("max_rank", "max_prefill_tokens", "max_waiting", "admission_batch"):
            _at_least(name, getattr(self, name), 1)
        for name in ("pool_slots", "max_model_len", "max_num_seqs"):
            _at_least(name, getattr(self, name), 0)
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ConfigError("gpu_memory_fraction", f"{self.gpu_memory_fraction} is not in (0, 1]")
        if not 0 < self.adapter_region_fraction < 1:
            raise ConfigError(
                "adapter_region_fraction", f"{self.adapter_region_fraction} is not in (0, 1)"
            )
        # Table rows for every running request's adapter, every prefetched one, and more
        # (an auto limit is sized below max_loras - PREFETCH_WINDOW, but at least 1).
        if self.max_loras <= max(self.max_num_seqs, 1) + PREFETCH_WINDOW:
            raise ConfigError(
                "max_loras",
                f"{self.max_loras} must exceed --max-num-seqs ({self.max_num_seqs or 'auto: 1'}) + "
                f"{PREFETCH_WINDOW} (the prefetch window)",
            )


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(name, f"{value!r} is below the minimum {low!r}")
