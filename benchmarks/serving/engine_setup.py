"""The engines a serving benchmark compares, built the way the worker builds them."""

from __future__ import annotations

import gc
from dataclasses import dataclass

import torch

from benchmarks.baselines.bmm_lora import BmmLoraBackend
from services.common.base_model import load_hf_config
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool
from services.gpu_worker.model.lora_backend import LoraBackend
from services.gpu_worker.model.model import LlamaForCausalLM
from services.gpu_worker.model.model_config import ModelConfig
from services.gpu_worker.model.weights import build_dummy_model


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

    def make_lora_backend(self) -> LoraBackend | None:
        """The engine's LoRA backend: the baseline's, or None for the device's own."""
        if self.lora_backend == "bmm":
            return BmmLoraBackend()
        if self.lora_backend != "kernels":
            raise ValueError(f"lora backend {self.lora_backend!r} is not kernels or bmm")
        return None


@dataclass(frozen=True)
class EngineSettings:
    max_num_seqs: int = 64
    max_loras: int = 512
    max_rank: int = 0  # 0: the trace's largest (see runs.settings_for)
    pool_slots: int = 0  # 0: sized as the worker sizes it (UnifiedMemoryPool.default_slots)
    gpu_memory_fraction: float = 0.85
    adapter_region_fraction: float = 0.25
    cuda_graphs: bool = True


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def model_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_model(preset: str, device: torch.device, seed: int = 0) -> LlamaForCausalLM:
    config = ModelConfig.from_hf(load_hf_config(preset))
    on_gpu = device.type == "cuda"
    return build_dummy_model(config, seed, model_dtype(device), device, draw_on_device=on_gpu)


def pool_slots(model: LlamaForCausalLM, settings: EngineSettings) -> int:
    if settings.pool_slots:
        return settings.pool_slots
    config, weight = model.config, model.lm_head.weight
    width = config.num_kv_heads * config.head_dim
    return UnifiedMemoryPool.default_slots(
        config.num_layers, width, weight.dtype, weight.device, settings.gpu_memory_fraction
    )


def build_engine(
    model: LlamaForCausalLM, variant: EngineVariant, settings: EngineSettings
) -> Engine:
    slots = pool_slots(model, settings)
    region = 0 if variant.unified_pool else int(slots * settings.adapter_region_fraction)
    engine = Engine(
        model,
        pool_slots=slots,
        max_num_seqs=settings.max_num_seqs,
        # The worker's waiting bound would refuse requests a slow variant queues up; the
        # benchmark wants every request served, however late.
        max_waiting=1 << 30,
        unified_pool=variant.unified_pool,
        adapter_region_slots=region,
        max_rank=settings.max_rank,
        max_loras=settings.max_loras,
        lora_backend=variant.make_lora_backend(),
    )
    if model.lm_head.weight.is_cuda and settings.cuda_graphs:
        engine.capture_decode_graphs()
    return engine


def free_device_memory() -> None:
    """Return dropped engines' and models' memory, so the next one can size its pool."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
