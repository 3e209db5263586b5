"""LoRA on a batch that mixes adapters of different ranks and rows with no adapter.

One call, two paths, both reading each adapter's A and Bᵀ from the unified pool, with no
padding to the largest rank: the Triton kernels on CUDA (through the adapter tables), and on
the CPU plain torch, one matrix product per adapter present (through its slot list).

A third path, `lora_backend="bmm"`, is S-LoRA's baseline for the benchmarks: every step it
gathers each request's weights padded to the batch's largest rank and runs `torch.bmm`.
"""

from __future__ import annotations

import torch

from services.gpu_worker.engine.forward_batch import ForwardBatch
from services.gpu_worker.memory.adapter_layout import slots_per_row
from services.gpu_worker.memory.adapter_manager import ResidentAdapter
from services.gpu_worker.memory.adapter_tables import PROJ_INDEX

_PROJ_NAME = {i: name for name, i in PROJ_INDEX.items()}
# Run the Triton kernels whatever the device: tests set it to check the engine's kernel path
# on the CPU, under Triton's interpreter.
KERNELS_ON_CPU = False


def _use_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda or KERNELS_ON_CPU


def _weight(pool: torch.Tensor, adapter: ResidentAdapter, proj: int, b_side: bool) -> torch.Tensor:
    """A [rank, in] (or Bᵀ [rank, out]) of one adapter for one layer's pool [num_slots, W]."""
    seg = adapter.segments[_PROJ_NAME[proj]]
    start, length = (seg.b_start, seg.b_len) if b_side else (seg.a_start, seg.a_len)
    dim = seg.out_features if b_side else seg.in_features
    rows = pool.index_select(0, adapter.slots[start : start + length]).view(seg.rank, -1)
    return rows[:, :dim]  # each row's last slot is padded when dim is not a multiple of W


def shrink(
    x: torch.Tensor, batch: ForwardBatch, layer: int, projs: tuple[int, ...]
) -> torch.Tensor:
    """y [T, len(projs), max_rank] = x @ Aᵀ of each row's adapter, for the projections given
    (q, k, v share x, and so do gate and up: each group shrinks in one launch)."""
    pool = batch.pool[layer]
    if batch.lora_backend == "bmm":
        return _bmm_shrink(x, pool, batch, projs)
    if _use_kernels(x):
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
    if batch.lora_backend == "bmm":
        return _bmm_expand(out, y, y_index, pool, batch, proj)
    if _use_kernels(out):
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


def _padded(
    pool: torch.Tensor, batch: ForwardBatch, proj: int, b_side: bool, dim: int
) -> torch.Tensor:
    """Each request's A [R, dim] (or Bᵀ) gathered from the pool and zero-padded to the batch's
    largest rank R: [B, R, dim]. Rows of requests without an adapter are all zeros."""
    rank_cap, width = batch.max_rank, pool.shape[1]
    has = batch.req_lora >= 0
    rows = batch.req_lora.clamp(min=0).long()
    meta = batch.lora_meta[rows, proj]  # [B, 3]: rank, a_start, b_start
    rank = torch.where(has, meta[:, 0], 0)
    per_rank_row = slots_per_row(dim, width)
    offsets = torch.arange(rank_cap * per_rank_row, device=pool.device)
    cols = (meta[:, 2 if b_side else 1, None] + offsets[None, :]).clamp(
        max=batch.lora_slots.shape[1] - 1
    )
    slots = batch.lora_slots[rows[:, None], cols].long()  # [B, R * ceil(dim / W)]
    weights = pool[slots].view(rows.shape[0], rank_cap, per_rank_row * width)[:, :, :dim]
    keep = torch.arange(rank_cap, device=pool.device)[None, :] < rank[:, None]
    return weights * keep[:, :, None]


def _by_request(rows: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
    """rows [T, n] laid out as [B, max_q_len, n], zero-padded (the bmm baseline's tokens)."""
    padded = rows.new_zeros(batch.req_lora.shape[0], batch.max_q_len, rows.shape[1])
    padded[batch.token_req, batch.token_idx] = rows
    return padded


def _bmm_shrink(
    x: torch.Tensor, pool: torch.Tensor, batch: ForwardBatch, projs: tuple[int, ...]
) -> torch.Tensor:
    x_pad = _by_request(x, batch)
    y = torch.zeros(x.shape[0], len(projs), batch.max_rank, dtype=torch.float32, device=x.device)
    for i, proj in enumerate(projs):
        a = _padded(pool, batch, proj, b_side=False, dim=x.shape[1])
        y[:, i] = torch.bmm(x_pad, a.transpose(1, 2))[batch.token_req, batch.token_idx].float()
    return y


def _bmm_expand(
    out: torch.Tensor, y: torch.Tensor, y_index: int, pool: torch.Tensor, batch: ForwardBatch,
    proj: int,
) -> torch.Tensor:  # fmt: skip
    bt = _padded(pool, batch, proj, b_side=True, dim=out.shape[1])
    y_pad = _by_request(y[:, y_index].to(out.dtype), batch)
    out += torch.bmm(y_pad, bt)[batch.token_req, batch.token_idx]
    return out
