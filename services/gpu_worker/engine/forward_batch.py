"""What one forward pass needs: a flat run of new tokens from several requests, and the
tables through which kernels find their KV cache and adapter weights in the unified pool.

Per request b (in batch order): its rows of the flat batch are q_starts[b] .. + q_lens[b]-1,
at positions ctx_lens[b] .. ctx_lens[b] + q_lens[b] - 1; its token slots are row req_rows[b]
of k_table / v_table; it uses adapter-table row req_lora[b] (-1: the base model). Device
tensors drive the kernels; the host lists drive the CPU reference path and grid sizes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from services.gpu_worker.memory.adapter_manager import ResidentAdapter


@dataclass
class LoraGroup:
    """Rows of the flat batch that use one resident adapter (for the CPU path)."""

    adapter: ResidentAdapter
    rows: torch.Tensor


@dataclass
class ForwardBatch:
    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] int64
    new_k_slots: torch.Tensor  # [T] int64: where each new token's K goes in the pool
    new_v_slots: torch.Tensor  # [T] int64
    logits_rows: torch.Tensor  # [B] int64: the row whose logits each request needs
    req_rows: torch.Tensor  # [B] int32
    q_starts: torch.Tensor  # [B] int32
    q_lens: torch.Tensor  # [B] int32
    ctx_lens: torch.Tensor  # [B] int32
    seq_lens: torch.Tensor  # [B] int32: ctx_lens + q_lens
    req_lora: torch.Tensor  # [B] int32
    pool: torch.Tensor  # [num_layers, num_slots, width]
    k_table: torch.Tensor  # [max_rows, max_len] int32
    v_table: torch.Tensor  # [max_rows, max_len] int32
    lora_slots: torch.Tensor  # [max_loras, max_adapter_slots] int32
    lora_meta: torch.Tensor  # [max_loras, NUM_PROJ, 3] int32 (see adapter_tables)
    max_rank: int  # largest rank among this batch's adapters (0: no adapter in the batch)
    max_q_len: int
    host_q_lens: list[int]
    host_ctx_lens: list[int]
    token_req: torch.Tensor  # [T] int64: the request (batch index) each row belongs to
    token_idx: torch.Tensor  # [T] int64: its index among that request's new tokens
    lora_groups: list[LoraGroup] = field(default_factory=list)
    lora_backend: str = "kernels"  # or "bmm": S-LoRA's padded-bmm baseline
    # Some adapter of the batch targets an MLP projection (gate, up or down): without one,
    # the MLP's LoRA launches are skipped.
    mlp_lora: bool = True

    @property
    def is_decode(self) -> bool:
        return self.max_q_len == 1
