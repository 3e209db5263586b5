"""Causal attention of each request's new tokens over its K/V in the unified pool.

Reference path: one scatter of the new K/V into their slots, then a loop over requests that
gathers each one's K/V through its slot table and runs torch SDPA. The paged Triton kernels
replace `attend` behind the same signature.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from services.gpu_worker.forward_batch import ForwardBatch


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


def attend(
    layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: ForwardBatch
) -> torch.Tensor:
    """Store this pass's k, v [T, KVH, D] in the pool; attend q [T, H, D] -> [T, H, D]."""
    tokens, kv_heads, head_dim = k.shape
    pool = batch.pool[layer]
    pool.index_copy_(0, batch.new_k_slots, k.reshape(tokens, -1))
    pool.index_copy_(0, batch.new_v_slots, v.reshape(tokens, -1))
    out = torch.empty_like(q)
    for span in batch.spans:
        rows = slice(span.start, span.start + span.length)
        k_all = pool.index_select(0, span.k_slots).view(-1, kv_heads, head_dim)
        v_all = pool.index_select(0, span.v_slots).view(-1, kv_heads, head_dim)
        out[rows] = causal_attention(q[rows], k_all, v_all, span.context_len)
    return out
