"""S-LoRA's padded-bmm LoRA baseline, as a LoRA backend the engine can be built with.

Every pass it gathers each request's A and Bᵀ from the unified pool, zero-padded to the
batch's largest rank, and runs `torch.bmm` over the requests. Inside the decode CUDA graphs
the batch's largest rank is the engine's max rank (the graphs' static shape), so it pads to
that. The serving benchmark's `bmm` variant runs on it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch

from services.gpu_worker.engine.forward_batch import ForwardBatch
from services.gpu_worker.memory.adapter_layout import slots_per_row
from services.gpu_worker.memory.adapter_manager import ResidentAdapter
from services.gpu_worker.model.lora_backend import LoraBackend


@dataclass
class TokenLayout:
    """Where each row of a flat batch sits in [requests, max_q_len]."""

    token_req: torch.Tensor  # [T] int64: the request (batch index) each row belongs to
    token_idx: torch.Tensor  # [T] int64: its index among that request's new tokens


class BmmLoraBackend(LoraBackend):
    def prepare(
        self,
        residents: Sequence[ResidentAdapter | None],
        q_lens: Sequence[int],
        device: torch.device,
    ) -> TokenLayout | None:
        """The token layout of a batch with a prefill; None for a decode batch, whose row b
        is request b (so the decode graphs need no layout)."""
        if max(q_lens, default=1) == 1:
            return None
        token_req = [b for b, n in enumerate(q_lens) for _ in range(n)]
        token_idx = [i for n in q_lens for i in range(n)]
        return TokenLayout(
            torch.tensor(token_req, dtype=torch.long, device=device),
            torch.tensor(token_idx, dtype=torch.long, device=device),
        )

    def apply(
        self,
        x: torch.Tensor,
        out: torch.Tensor,
        batch: ForwardBatch,
        layer: int,
        projs: tuple[int, ...],
        widths: Sequence[int],
    ) -> torch.Tensor:
        pool, x_pad, col = batch.pool[layer], _by_request(x, batch), 0
        for proj, width in zip(projs, widths, strict=True):
            a = _padded(pool, batch, proj, b_side=False, dim=x.shape[1])
            bt = _padded(pool, batch, proj, b_side=True, dim=width)
            y_pad = torch.bmm(x_pad, a.transpose(1, 2))
            out[:, col : col + width] += _by_row(torch.bmm(y_pad, bt), batch)
            col += width
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
    """rows [T, n] laid out as [B, max_q_len, n], zero-padded."""
    if batch.is_decode:
        return rows[:, None, :]
    layout = cast(TokenLayout, batch.lora_plan)
    padded = rows.new_zeros(batch.req_lora.shape[0], batch.max_q_len, rows.shape[1])
    padded[layout.token_req, layout.token_idx] = rows
    return padded


def _by_row(padded: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
    """[B, max_q_len, n] back to the flat batch's rows [T, n]."""
    if batch.is_decode:
        return padded[:, 0]
    layout = cast(TokenLayout, batch.lora_plan)
    return padded[layout.token_req, layout.token_idx]
