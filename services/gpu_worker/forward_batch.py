"""What one forward pass needs: a flat run of tokens from several requests, and where their
KV cache and adapter weights lie in the unified memory pool."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.gpu_worker.adapter_manager import ResidentAdapter


@dataclass
class SeqSpan:
    """One request's rows in the flat batch: rows [start, start + length) are its new tokens,
    which follow `context_len` tokens already cached. k_slots / v_slots list the pool slots of
    all context_len + length tokens."""

    start: int
    length: int
    context_len: int
    k_slots: torch.Tensor
    v_slots: torch.Tensor


@dataclass
class LoraGroup:
    """Rows of the flat batch that use one resident adapter."""

    adapter: ResidentAdapter
    rows: torch.Tensor


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64, absolute position of each token in its request
    spans: list[SeqSpan]
    logits_rows: torch.Tensor  # [B] int64: the row whose logits each request needs
    pool: torch.Tensor  # [num_layers, num_slots, width]: the unified memory pool
    new_k_slots: torch.Tensor  # [T]: where each new token's K goes
    new_v_slots: torch.Tensor  # [T]
    lora_groups: list[LoraGroup] = field(default_factory=list)
