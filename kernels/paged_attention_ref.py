"""Plain-torch references for the paged attention kernels in `kernels.paged_attention`.

Deliberately naive: a Python loop over requests, K/V gathered through the slot tables, GQA by
repeat_interleave, an explicit causal mask and `torch.softmax` in fp32. They are the oracle the
Triton kernels are tested against, so they favour obviousness over speed.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _gather(
    pool: Tensor, table: Tensor, row: int, length: int, num_kv_heads: int, num_heads: int
) -> Tensor:
    """Positions 0..length-1 of one table row -> [length, num_heads, D] in fp32 (GQA expanded)."""
    slots = table[row, :length].long()
    rows = pool[slots].float().view(length, num_kv_heads, -1)
    return rows.repeat_interleave(num_heads // num_kv_heads, dim=1)


def paged_decode_attention_ref(
    q: Tensor,
    pool: Tensor,
    k_table: Tensor,
    v_table: Tensor,
    req_rows: Tensor,
    seq_lens: Tensor,
    scale: float,
) -> Tensor:
    """Reference for `paged_decode_attention`: q [B, H, D] -> [B, H, D] in q's dtype; rows with
    seq_lens[b] == 0 are zeros."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = pool.shape[1] // head_dim
    out = torch.zeros(batch, num_heads, head_dim, dtype=torch.float32, device=q.device)
    for b in range(batch):
        length = int(seq_lens[b])
        if length == 0:
            continue
        row = int(req_rows[b])
        k = _gather(pool, k_table, row, length, num_kv_heads, num_heads)  # [L, H, D]
        v = _gather(pool, v_table, row, length, num_kv_heads, num_heads)
        scores = torch.einsum("hd,lhd->hl", q[b].float(), k) * scale
        probs = torch.softmax(scores, dim=-1)
        out[b] = torch.einsum("hl,lhd->hd", probs, v)
    return out.to(q.dtype)


def paged_prefill_attention_ref(
    q: Tensor,
    pool: Tensor,
    k_table: Tensor,
    v_table: Tensor,
    req_rows: Tensor,
    q_starts: Tensor,
    q_lens: Tensor,
    ctx_lens: Tensor,
    scale: float,
) -> Tensor:
    """Reference for `paged_prefill_attention`: q [T, H, D] -> [T, H, D] in q's dtype. Request
    b's rows q_starts[b] .. q_starts[b]+q_lens[b]-1 sit at positions ctx_lens[b].. and attend
    causally over positions 0..their own. Rows that belong to no request are zeros."""
    tokens, num_heads, head_dim = q.shape
    num_kv_heads = pool.shape[1] // head_dim
    out = torch.zeros(tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
    for b in range(q_lens.shape[0]):
        start, n, ctx = int(q_starts[b]), int(q_lens[b]), int(ctx_lens[b])
        if n == 0:
            continue
        row = int(req_rows[b])
        total = ctx + n
        k = _gather(pool, k_table, row, total, num_kv_heads, num_heads)  # [ctx+n, H, D]
        v = _gather(pool, v_table, row, total, num_kv_heads, num_heads)
        qb = q[start : start + n].float()  # [n, H, D]
        scores = torch.einsum("qhd,khd->hqk", qb, k) * scale
        q_pos = torch.arange(n, device=q.device)[:, None] + ctx
        visible = torch.arange(total, device=q.device)[None, :] <= q_pos  # [n, ctx+n]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start : start + n] = torch.einsum("hqk,khd->qhd", probs, v)
    return out.to(q.dtype)
