"""Causal attention of each request's new tokens over its cached and new K/V.

Reference path (a loop over requests with torch SDPA); the paged Triton kernels replace
`attend` behind the same signature.
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
    """Write this pass's k, v [T, KVH, D] into each request's cache; attend q [T, H, D]."""
    out = torch.empty_like(q)
    for span in batch.spans:
        rows = slice(span.start, span.start + span.length)
        k_all, v_all = span.kv.write(layer, span.context_len, k[rows], v[rows])
        out[rows] = causal_attention(q[rows], k_all, v_all, span.context_len)
    return out
