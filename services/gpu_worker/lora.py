"""LoRA on a batch that mixes adapters of different ranks and rows with no adapter.

Plain torch reference: for each adapter present, gather its A and Bᵀ for this layer from
the pool through its slot table, gather its rows, shrink (x·Aᵀ), expand (·Bᵀ, scaling folded
in) and add back. No padding to the largest rank. The Triton kernels replace this call.
"""

from __future__ import annotations

import torch

from services.gpu_worker.forward_batch import LoraGroup


def add_lora(
    out: torch.Tensor,
    x: torch.Tensor,
    groups: list[LoraGroup],
    pool: torch.Tensor,
    layer: int,
    proj: str,
) -> torch.Tensor:
    """out [T, out_features] += per-row LoRA delta of x [T, in_features]; returns out.

    pool is the unified pool [num_layers, num_slots, width]."""
    layer_pool = pool[layer]
    for group in groups:
        seg = group.adapter.segments.get(proj)
        if seg is None:
            continue
        a_slots, b_slots = group.adapter.proj_slots[proj]
        lora_a = layer_pool.index_select(0, a_slots).view(seg.rank, seg.in_features)
        lora_bt = layer_pool.index_select(0, b_slots).view(seg.rank, seg.out_features)
        shrunk = x.index_select(0, group.rows) @ lora_a.t()
        out.index_add_(0, group.rows, shrunk @ lora_bt)
    return out
