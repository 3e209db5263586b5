"""Causal attention of each request's new tokens over its K/V in the unified pool, as an
object chosen once when the model is built (see `backends.ModelBackends.for_device`).

The new K/V are scattered into their slots first; then each request attends over its whole
context through its row of the slot tables: with the paged Triton kernels (the decode form
when every request brings one token, the prefill form otherwise), or with a plain-torch loop
over requests (the reference, the CPU's path).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from services.gpu_worker.engine.forward_batch import ForwardBatch


def causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, context_len: int
) -> torch.Tensor:
    """q [n, H, D] at positions context_len.. over k, v [context_len + n, KVH, D] -> [n, H, D]."""
    n, num_heads, _ = q.shape
    group = num_heads // k.shape[1]
    if group > 1:
        k = k.repeat_interleave(group, dim=1)
        v = v.repeat_interleave(group, dim=1)
    mask = None
    if n > 1:
        q_pos = torch.arange(n, device=q.device)[:, None] + context_len
        mask = torch.arange(k.shape[0], device=q.device)[None, :] <= q_pos
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask
    )
    return out.transpose(0, 1)


class PagedAttention(ABC):
    def attend(
        self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
    ) -> torch.Tensor:
        """Store this pass's k, v [T, KVH, D] in the pool; attend q [T, H, D] -> [T, H, D]."""
        tokens, kv_heads, head_dim = k.shape
        pool = batch.pool[layer]
        pool.index_copy_(0, batch.new_k_slots, k.reshape(tokens, -1))
        pool.index_copy_(0, batch.new_v_slots, v.reshape(tokens, -1))
        return self.over_pool(q, pool, batch, kv_heads, head_dim)

    @abstractmethod
    def over_pool(
        self,
        q: torch.Tensor,
        pool: torch.Tensor,
        batch: ForwardBatch,
        kv_heads: int,
        head_dim: int,
    ) -> torch.Tensor:
        """q [T, H, D] over each request's K/V in one layer's pool [num_slots, KVH * D]."""


class TorchPagedAttention(PagedAttention):
    """One request at a time, its K/V gathered from the pool (reads the host lengths)."""

    def over_pool(
        self,
        q: torch.Tensor,
        pool: torch.Tensor,
        batch: ForwardBatch,
        kv_heads: int,
        head_dim: int,
    ) -> torch.Tensor:
        out = torch.empty_like(q)
        start = 0
        for b, (n, ctx) in enumerate(zip(batch.host_q_lens, batch.host_ctx_lens, strict=True)):
            row = batch.req_rows[b]
            k_all = pool.index_select(0, batch.k_table[row, : ctx + n].long())
            v_all = pool.index_select(0, batch.v_table[row, : ctx + n].long())
            out[start : start + n] = causal_attention(
                q[start : start + n],
                k_all.view(-1, kv_heads, head_dim),
                v_all.view(-1, kv_heads, head_dim),
                ctx,
            )
            start += n
        return out


class TritonPagedAttention(PagedAttention):
    """The paged kernels of kernels/paged_attention.py, reading the device tables only."""

    def __init__(self) -> None:
        # Imported here, not at module load: Triton reads TRITON_INTERPRET when a kernel is
        # defined, and a CPU worker never needs it.
        from kernels.paged_attention import paged_decode_attention, paged_prefill_attention

        self._decode, self._prefill = paged_decode_attention, paged_prefill_attention

    def over_pool(
        self,
        q: torch.Tensor,
        pool: torch.Tensor,
        batch: ForwardBatch,
        kv_heads: int,
        head_dim: int,
    ) -> torch.Tensor:
        scale = 1.0 / math.sqrt(head_dim)
        tables = (pool, batch.k_table, batch.v_table, batch.req_rows)
        if batch.is_decode:
            return self._decode(q, *tables, batch.seq_lens, scale)
        # Requests that bring one token take the decode kernel even in a mixed step: in the
        # prefill kernel each would fill a whole tile of query rows for one real row.
        tail = batch.decode_tail
        if tail == 0:
            return self._prefill(
                q, *tables, batch.q_starts, batch.q_lens, batch.ctx_lens, scale, batch.max_q_len
            )
        heads, rows = len(batch.host_q_lens) - tail, q.shape[0] - tail
        out = torch.empty_like(q)
        self._prefill(
            q[:rows],
            pool,
            batch.k_table,
            batch.v_table,
            batch.req_rows[:heads],
            batch.q_starts[:heads],
            batch.q_lens[:heads],
            batch.ctx_lens[:heads],
            scale,
            batch.max_q_len,
            out=out[:rows],
        )
        decode_tables = (pool, batch.k_table, batch.v_table, batch.req_rows[heads:])
        self._decode(q[rows:], *decode_tables, batch.seq_lens[heads:], scale, out=out[rows:])
        return out
