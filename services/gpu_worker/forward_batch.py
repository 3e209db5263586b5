"""What one forward pass needs: a flat run of tokens from several requests, and their state."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.common.lora_format import CanonicalAdapter
from services.gpu_worker.kv_cache import RequestKVCache


@dataclass
class SeqSpan:
    """One request's rows in the flat batch: rows [start, start + length) are its new tokens,
    which follow `context_len` tokens already in its KV cache."""

    start: int
    length: int
    context_len: int
    kv: RequestKVCache


@dataclass
class LoraGroup:
    """Rows of the flat batch that use one adapter."""

    adapter: CanonicalAdapter
    rows: torch.Tensor


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute position of each token in its request
    spans: list[SeqSpan]
    logits_rows: torch.Tensor  # [B] int64: the row whose logits each request needs
    lora_groups: list[LoraGroup] = field(default_factory=list)
