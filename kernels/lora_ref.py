"""Plain-torch reference of the LoRA kernels in `lora.py` (same signature): the oracle.

Adapter weights live in the unified pool (`pool [num_slots, W]` for one layer). A resident
adapter owns row `m` of `lora_slots [M, S]` (its slot list) and of `lora_meta [M, P, 3]`
(contiguous; P projections, 7 in the worker: 0 q, 1 k, 2 v, 3 o, 4 gate, 5 up, 6 down):
`lora_meta[m, p] = (rank, a_start, b_start)`, rank 0 when the adapter leaves p alone; each
projection has its own rank. Each row of A [rank, in] takes ceil(in / W) slots, the last one
zero-padded when in is not a multiple of W, so A lies over the slots
`lora_slots[m, a_start : a_start + rank * ceil(in / W)]` row after row; Bᵀ [rank, out] over
`lora_slots[m, b_start : b_start + rank * ceil(out / W)]` likewise. Request b's rows of the
flat batch are q_starts[b] .. q_starts[b] + q_lens[b] - 1 and use adapter row req_lora[b]
(-1: none).
"""

from __future__ import annotations

import torch


def _weights(
    pool: torch.Tensor, lora_slots: torch.Tensor, meta: torch.Tensor, dim: int, which: int
) -> torch.Tensor:
    """A ([rank, dim], which=1) or Bᵀ ([rank, dim], which=2) of one adapter, one projection."""
    rank, start = int(meta[0]), int(meta[which])
    per_row = -(-dim // pool.shape[1])
    slots = lora_slots[start : start + rank * per_row].long()
    return pool.index_select(0, slots).reshape(rank, -1)[:, :dim]


def lora_apply_ref(
    x: torch.Tensor,
    out: torch.Tensor,
    pool: torch.Tensor,
    lora_slots: torch.Tensor,
    lora_meta: torch.Tensor,
    req_lora: torch.Tensor,
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    projs: tuple[int, ...],
    widths: tuple[int, ...],
) -> torch.Tensor:
    """out[t, cols of projs[i]] += (x[t] @ A_pᵢᵀ) @ Bᵀ_pᵢ for rows with an adapter, in place;
    projs[i] owns out's columns sum(widths[:i]) .. + widths[i]. The shrink's product is
    float32 and is cast to out's dtype before the expand, as the kernels do. Returns out."""
    for b in range(req_lora.shape[0]):
        m = int(req_lora[b])
        if m < 0:
            continue
        rows = slice(int(q_starts[b]), int(q_starts[b]) + int(q_lens[b]))
        col = 0
        for p, width in zip(projs, widths, strict=True):
            if int(lora_meta[m, p, 0]):
                a = _weights(pool, lora_slots[m], lora_meta[m, p], x.shape[1], 1)
                bt = _weights(pool, lora_slots[m], lora_meta[m, p], width, 2)
                y = (x[rows] @ a.t()).float()
                out[rows, col : col + width] += y.to(out.dtype) @ bt
            col += width
    return out
