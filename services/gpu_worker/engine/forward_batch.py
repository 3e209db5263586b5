"""What one forward pass needs: a flat run of new tokens from several requests, and the
tables through which kernels find their KV cache and adapter weights in the unified pool.

Per request b (in batch order): its rows of the flat batch are q_starts[b] .. + q_lens[b]-1,
at positions ctx_lens[b] .. ctx_lens[b] + q_lens[b] - 1; its token slots are row req_rows[b]
of k_table / v_table; it uses adapter-table row req_lora[b] (-1: the base model). Device
tensors drive the kernels; the host lists drive the CPU reference path and grid sizes.
LoRA runs through `lora_backend`, the engine's, with what it prepared for this batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from services.gpu_worker.model.lora_backend import LoraBackend


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
    lora_backend: LoraBackend
    lora_plan: object = None  # what lora_backend.prepare built for this batch
    # Some adapter of the batch targets an MLP projection (gate, up or down): without one,
    # the MLP's LoRA launches are skipped.
    mlp_lora: bool = True

    @property
    def is_decode(self) -> bool:
        return self.max_q_len == 1

    @cached_property
    def decode_tail(self) -> int:
        """How many requests at the end of the batch bring one new token each."""
        count = 0
        for q_len in reversed(self.host_q_lens):
            if q_len != 1:
                break
            count += 1
        return count
