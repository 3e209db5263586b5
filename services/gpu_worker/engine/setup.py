"""Building an engine from its config: the one set-up path of the worker and the benchmarks."""

from __future__ import annotations

import logging

import torch

from services.common.base_model import load_hf_config
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer
from services.gpu_worker.model.lora_backend import LoraBackend
from services.gpu_worker.model.model import LlamaForCausalLM
from services.gpu_worker.model.model_config import ModelConfig
from services.gpu_worker.model.weights import build_dummy_model, load_hf_model

logger = logging.getLogger(__name__)
_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_device(config: EngineConfig) -> tuple[torch.device, torch.dtype]:
    """The device and dtype `config` asks for; auto: CUDA when there is one."""
    if config.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(config.device)
    if config.dtype == "auto":
        return device, auto_dtype(device)
    return device, _DTYPES[config.dtype]


def auto_dtype(device: torch.device) -> torch.dtype:
    """bf16 on the GPU, fp32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def build_model(
    model: str, dummy: bool, seed: int, device: torch.device, dtype: torch.dtype
) -> tuple[LlamaForCausalLM, Tokenizer]:
    """The model of a Hugging Face folder or dummy preset `model`, and its tokenizer; with
    `dummy`, random weights drawn from `seed` and a byte-level tokenizer."""
    model_config = ModelConfig.from_hf(load_hf_config(model))
    if dummy:
        on_gpu = device.type == "cuda"
        built = build_dummy_model(model_config, seed, dtype, device, draw_on_device=on_gpu)
    else:
        built = load_hf_model(model, model_config, dtype, device)
    logger.info("model %s on %s in %s (dummy=%s)", model, device, dtype, dummy)
    return built, build_tokenizer(model, dummy, model_config.vocab_size)


def build_tokenizer(model: str, dummy: bool, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer of `model` (a byte-level one for dummy weights), without the model."""
    if not dummy:
        return HFTokenizer(model)
    if vocab_size is None:
        vocab_size = ModelConfig.from_hf(load_hf_config(model)).vocab_size
    return ByteTokenizer(vocab_size)


def build_engine(
    model: LlamaForCausalLM, config: EngineConfig, lora_backend: LoraBackend | None = None
) -> Engine:
    """An engine over `model`, its decode graphs (and prefill graphs) captured when on CUDA
    and asked for; LoRA through `lora_backend` when given (a benchmark's baseline), else the
    device's."""
    engine = Engine(model, config, lora_backend)
    logger.info("memory pool: %d slots (unified=%s)", engine.pool.num_slots, config.unified_pool)
    if engine.device.type == "cuda" and config.cuda_graphs:
        engine.capture_decode_graphs()
        if config.prefill_graphs:
            engine.capture_prefill_graphs()
    return engine
