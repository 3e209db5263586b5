"""LoRA on a batch that mixes adapters of different ranks and rows with no adapter.

One call, two paths, both reading each adapter's A and Bᵀ from the unified pool, with no
padding to the largest rank: the Triton kernels on CUDA (through the adapter tables), and on
the CPU plain torch, one matrix product per adapter present (through its slot list).
"""

from __future__ import annotations

import torch

from services.gpu_worker.adapter_manager import ResidentAdapter
from services.gpu_worker.adapter_tables import PROJ_INDEX
from services.gpu_worker.forward_batch import ForwardBatch

_PROJ_NAME = {i: name for name, i in PROJ_INDEX.items()}


def _weight(pool: torch.Tensor, adapter: ResidentAdapter, proj: int, b_side: bool) -> torch.Tensor:
    """A [rank, in] (or Bᵀ [rank, out]) of one adapter for one layer's pool [num_slots, W]."""
    seg = adapter.segments[_PROJ_NAME[proj]]
    start, length = (seg.b_start, seg.b_len) if b_side else (seg.a_start, seg.a_len)
    dim = seg.out_features if b_side else seg.in_features
    return pool.index_select(0, adapter.slots[start : start + length]).view(seg.rank, dim)


def shrink(
    x: torch.Tensor, batch: ForwardBatch, layer: int, projs: tuple[int, ...]
) -> torch.Tensor:
    """y [T, len(projs), max_rank] = x @ Aᵀ of each row's adapter, for the projections given
    (q, k, v share x, so they shrink in one launch)."""
    pool = batch.pool[layer]
    if x.is_cuda:
        from kernels.lora import lora_shrink

        return lora_shrink(x, pool, batch.lora_slots, batch.lora_meta, batch.req_lora,
                           batch.q_starts, batch.q_lens, projs, batch.max_rank,
                           batch.max_q_len)  # fmt: skip
    y = torch.zeros(x.shape[0], len(projs), batch.max_rank, dtype=x.dtype)
    for group in batch.lora_groups:
        rows = x.index_select(0, group.rows)
        for i, proj in enumerate(projs):
            if _PROJ_NAME[proj] in group.adapter.segments:
                a = _weight(pool, group.adapter, proj, b_side=False)
                y[group.rows, i, : a.shape[0]] = rows @ a.t()
    return y


def expand(
    out: torch.Tensor, y: torch.Tensor, y_index: int, batch: ForwardBatch, layer: int, proj: int
) -> torch.Tensor:
    """out [T, out_features] += y[:, y_index] @ Bᵀ of each row's adapter, in place."""
    pool = batch.pool[layer]
    if out.is_cuda:
        from kernels.lora import lora_expand

        return lora_expand(y, y_index, out, pool, batch.lora_slots, batch.lora_meta,
                           batch.req_lora, batch.q_starts, batch.q_lens, proj,
                           batch.max_q_len)  # fmt: skip
    for group in batch.lora_groups:
        if _PROJ_NAME[proj] in group.adapter.segments:
            bt = _weight(pool, group.adapter, proj, b_side=True)
            shrunk = y.index_select(0, group.rows)[:, y_index, : bt.shape[0]]
            out.index_add_(0, group.rows, shrunk @ bt)
    return out
