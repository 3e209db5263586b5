"""LoRA on a batch that mixes adapters of different ranks and rows with no adapter.

Plain torch reference: for each adapter present, gather its rows, shrink (x·Aᵀ), expand
(·Bᵀ, scaling already folded into B) and add back. The Triton kernels replace this call.
"""

from __future__ import annotations

import torch

from services.gpu_worker.forward_batch import LoraGroup


def add_lora(
    out: torch.Tensor, x: torch.Tensor, groups: list[LoraGroup], layer: int, proj: str
) -> torch.Tensor:
    """out [T, out_features] += per-row LoRA delta of x [T, in_features]; returns out."""
    for group in groups:
        lora_a = group.adapter.lora_a.get(proj)
        if lora_a is None:
            continue
        lora_b = group.adapter.lora_b[proj]
        shrunk = x.index_select(0, group.rows) @ lora_a[layer].t()
        out.index_add_(0, group.rows, shrunk @ lora_b[layer].t())
    return out
