"""The running-request limit when `--max-num-seqs` is 0 (auto): sized from the memory pool.

The scheduler admits a request only when the pool can promise its whole context, so the pool
already bounds how many run at once; the limit bounds the decode batch (and the CUDA graphs
captured for it) and should not bind before the pool does. The rule, on CUDA:

    max_num_seqs = min(256, pool KV tokens // min(context length, 512))

256 is the largest decode-graph bucket (decode_graphs.BUCKETS; larger batches gain little,
and each graph costs capture time and memory). 512 tokens is a typical request: S-LoRA's
traces draw prompts and outputs of 8..512 tokens each, about 520 in all on average. Llama-7B
in bf16 on one H200 pools ~200k tokens: 256. A 24 GB GPU with the same model (~17k tokens):
34. On the CPU the limit is a fixed 64 (the pool is a fixed size there too). Whatever the
device, the limit stays below `--max-loras` minus the prefetch window, as the adapter tables
need (config.py checks the same of a limit given by hand).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import torch

from services.gpu_worker.engine.config import PREFETCH_WINDOW, EngineConfig
from services.gpu_worker.engine.decode_graphs import BUCKETS
from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool

logger = logging.getLogger(__name__)

AUTO_CAP = BUCKETS[-1]  # 256
TYPICAL_REQUEST_TOKENS = 512
CPU_MAX_NUM_SEQS = 64


def auto_max_num_seqs(
    kv_tokens: int, max_model_len: int, max_loras: int, device: torch.device
) -> int:
    """The limit for a pool of `kv_tokens` tokens of KV cache (see the module docstring)."""
    if device.type == "cuda":
        limit = min(AUTO_CAP, kv_tokens // min(max_model_len, TYPICAL_REQUEST_TOKENS))
    else:
        limit = CPU_MAX_NUM_SEQS
    return max(1, min(limit, max_loras - PREFETCH_WINDOW - 1))


def resolve_max_num_seqs(
    config: EngineConfig, pool: UnifiedMemoryPool, max_model_len: int
) -> EngineConfig:
    """`config` as given when it sets `max_num_seqs`; else with the limit sized from `pool`."""
    if config.max_num_seqs:
        return config
    kv_tokens = pool.kv_capacity() // pool.kv_slots_for(1)
    limit = auto_max_num_seqs(kv_tokens, max_model_len, config.max_loras, pool.buffer.device)
    logger.info(
        "max_num_seqs: %d (auto, from %d KV tokens and context %d)",
        limit,
        kv_tokens,
        max_model_len,
    )
    return replace(config, max_num_seqs=limit)
