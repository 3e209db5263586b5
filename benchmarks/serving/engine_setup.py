"""The engines a serving benchmark compares: the worker's own set-up
(services/gpu_worker/engine/setup.py) with the settings a benchmark changes."""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass

import torch

from benchmarks.baselines.bmm_lora import BmmLoraBackend
from services.gpu_worker.engine import setup
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.model.lora_backend import LoraBackend
from services.gpu_worker.model.model import LlamaForCausalLM

# The worker's waiting bound would refuse requests a slow variant queues up; the benchmark
# wants every request served, however late.
UNBOUNDED_WAITING = 1 << 30


@dataclass(frozen=True)
class EngineVariant:
    """Engine settings that the ablations change."""

    unified_pool: bool = True
    lora_backend: str = "kernels"  # or "bmm": S-LoRA's padded-bmm baseline

    @property
    def label(self) -> str:
        parts = [] if self.unified_pool else ["no-unified-pool"]
        if self.lora_backend != "kernels":
            parts.append(self.lora_backend)
        return "-".join(parts) or "manylora"

    def apply(self, config: EngineConfig) -> EngineConfig:
        """`config` as this variant runs it, without a waiting bound."""
        return dataclasses.replace(
            config, unified_pool=self.unified_pool, max_waiting=UNBOUNDED_WAITING
        )

    def make_lora_backend(self) -> LoraBackend | None:
        """The engine's LoRA backend: the baseline's, or None for the device's own."""
        if self.lora_backend == "bmm":
            return BmmLoraBackend()
        if self.lora_backend != "kernels":
            raise ValueError(f"lora backend {self.lora_backend!r} is not kernels or bmm")
        return None


def build_model(preset: str, device: torch.device, seed: int = 0) -> LlamaForCausalLM:
    """A dummy preset's model with random weights, in the worker's dtype for `device`."""
    model, _ = setup.build_model(preset, True, seed, device, setup.auto_dtype(device))
    return model


def build_engine(model: LlamaForCausalLM, variant: EngineVariant, config: EngineConfig) -> Engine:
    return setup.build_engine(model, variant.apply(config), variant.make_lora_backend())


def free_device_memory() -> None:
    """Return dropped engines' and models' memory, so the next one can size its pool."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
