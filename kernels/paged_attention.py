"""Attention over a paged KV cache that lives in the unified memory pool (Triton).

Layout (fixed by the pool, services/gpu_worker/memory/memory_pool.py): `pool [num_slots, W]` with
W = KVH * D holds one token's K (or V) of one layer per slot, as [KVH, D] flattened. Request
rows of the int32 tables `k_table, v_table [max_rows, max_len]` map a token position to its
slot. Slots are arbitrary, so
every K/V row is gathered through the table: `pool + slot * W + kv_head * D + arange(D)`.

Two kernels:
- `paged_decode_attention`: one query per request. A program handles one (request, kv head)
  and the whole group of query heads that share it, so each K/V row is read once per group.
  With few (request, kv head) pairs the keys are also split across programs (flash-decoding)
  and a second small kernel merges the partial results through their log-sum-exps.
- `paged_prefill_attention`: the flat new tokens of several requests of different lengths,
  causal over each request's cached context plus its own new tokens, in one launch.

Both walk the keys in blocks with one shared step, `_attend_key_block`: an online softmax with
fp32 accumulators, in base 2 (exp2 is the native instruction; the scale is folded with
log2(e)). References: `kernels.paged_attention_ref`.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from kernels.host_math import ceil_div, next_power_of_2

_LOG2E = 1.4426950408889634

# tl.dot needs at least 16 rows; smaller query-head groups are padded up to this.
_MIN_DOT_ROWS = 16


@triton.jit
def _attend_key_block(
    q,
    acc,
    m_i,
    l_i,
    start,
    hi,
    q_pos,
    pool_ptr,
    k_row_ptr,
    v_row_ptr,
    col,
    stride_pool,
    qk_scale,
    BLOCK_N: tl.constexpr,
    MASK_KEYS: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One step of the online softmax, shared by the decode and prefill kernels: the keys
    start .. start+BLOCK_N-1 of one request, gathered through its table rows, folded into the
    running (acc, m_i, l_i) of the query rows q.

    q [R, D] (R query rows of one kv head); acc [R, D], m_i [R], l_i [R] fp32, in base 2 (the
    scores are multiplied by qk_scale = softmax scale * log2(e)); col [D] is the kv head's
    columns of a pool row. MASK_KEYS hides keys at or past `hi` (else every key of the block
    must be valid, and nothing is masked: the cheaper form for blocks wholly inside the
    context); CAUSAL also hides key n from a query at position q_pos[r] < n. The caller
    guarantees every row sees at least one key of the block, so the new maximum is finite.
    Both products go through tl.dot, which needs R >= 16 (callers pad the rows).

    Torch reference of one step (s masked to -inf where hidden):
        s = (q @ k.T) * qk_scale;  m_new = max(m_i, s.max(1))
        p = exp2(s - m_new[:, None]);  alpha = exp2(m_i - m_new)
        l_i = l_i * alpha + p.sum(1);  acc = acc * alpha[:, None] + p @ v
    Returns the new (acc, m_i, l_i).
    """
    offs_n = start + tl.arange(0, BLOCK_N)
    if MASK_KEYS:
        n_mask = offs_n < hi
        k_slots = tl.load(k_row_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(
            pool_ptr + k_slots[:, None] * stride_pool + col[None, :],
            mask=n_mask[:, None],
            other=0.0,
        )
    else:
        k_slots = tl.load(k_row_ptr + offs_n).to(tl.int64)
        k = tl.load(pool_ptr + k_slots[:, None] * stride_pool + col[None, :])
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
    s = s * qk_scale
    if MASK_KEYS:
        visible = n_mask[None, :]
        if CAUSAL:
            visible = visible & (offs_n[None, :] <= q_pos[:, None])
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)

    if MASK_KEYS:
        v_slots = tl.load(v_row_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
        v = tl.load(
            pool_ptr + v_slots[:, None] * stride_pool + col[None, :],
            mask=n_mask[:, None],
            other=0.0,
        )
    else:
        v_slots = tl.load(v_row_ptr + offs_n).to(tl.int64)
        v = tl.load(pool_ptr + v_slots[:, None] * stride_pool + col[None, :])
    pv = tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc * alpha[:, None] + pv, m_new, l_i


@triton.jit
def _decode_kernel(
    q_ptr: tl.tensor,
    pool_ptr: tl.tensor,
    k_table_ptr: tl.tensor,
    v_table_ptr: tl.tensor,
    req_rows_ptr: tl.tensor,
    seq_lens_ptr: tl.tensor,
    out_ptr: tl.tensor,
    part_out_ptr: tl.tensor,
    part_lse_ptr: tl.tensor,
    qk_scale: tl.tensor,
    stride_qb: tl.tensor,
    stride_qh: tl.tensor,
    stride_pool: tl.tensor,
    stride_kt: tl.tensor,
    stride_vt: tl.tensor,
    stride_ob: tl.tensor,
    stride_oh: tl.tensor,
    num_heads: tl.tensor,
    NUM_SPLITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    """Grid (B, KVH, NUM_SPLITS): request b, kv head `kv_head`, its split `split` of the keys.

    q [B, H, D] (strided), pool [num_slots, KVH * D], tables int32 [rows, max_len],
    req_rows and seq_lens int32 [B]. The GROUP query heads of the kv head attend together
    (padded to BLOCK_G rows). NUM_SPLITS == 1 writes out [B, H, D]; else each split writes
    its normalised partial output part_out [B, H, NUM_SPLITS, D] and its base-2
    log-sum-exp part_lse [B, H, NUM_SPLITS] (fp32) for `_decode_reduce_kernel`.
    Reference: `kernels.paged_attention_ref.paged_decode_attention_ref`.
    """
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(seq_lens_ptr + b)
    row = tl.load(req_rows_ptr + b).to(tl.int64)
    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, HEAD_DIM)
    g_mask = offs_g < GROUP
    heads = kv_head * GROUP + offs_g

    q = tl.load(
        q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
        mask=g_mask[:, None],
        other=0.0,
    )

    # Every split gets an equal, BLOCK_N-aligned share of this request's keys; the share is
    # computed here from seq_len so the launch never needs the lengths on the host.
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seq_len)

    k_row_ptr = k_table_ptr + row * stride_kt
    v_row_ptr = v_table_ptr + row * stride_vt
    col = kv_head * HEAD_DIM + offs_d

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    for start in range(lo, hi, BLOCK_N):
        # Each block has at least one valid key, so every row's maximum stays finite.
        acc, m_i, l_i = _attend_key_block(
            q,
            acc,
            m_i,
            l_i,
            start,
            hi,
            0,
            pool_ptr,
            k_row_ptr,
            v_row_ptr,
            col,
            stride_pool,
            qk_scale,
            BLOCK_N,
            MASK_KEYS=True,
            CAUSAL=False,
            DOT_PRECISION=DOT_PRECISION,
        )

    # l_i == 0 only for a padding row (seq_len 0) or an empty split: its output is zeros.
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=g_mask[:, None],
        )
    else:
        part = (b * num_heads + heads) * NUM_SPLITS + split  # [BLOCK_G] into [B, H, S]
        tl.store(
            part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=g_mask[:, None]
        )
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse, mask=g_mask)


@triton.jit
def _decode_reduce_kernel(
    part_out_ptr: tl.tensor,
    part_lse_ptr: tl.tensor,
    out_ptr: tl.tensor,
    stride_ob: tl.tensor,
    stride_oh: tl.tensor,
    num_heads: tl.tensor,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
) -> None:
    """Grid (B, H): merges the NUM_SPLITS partial outputs of one (request, head),
    out[b, h] = sum_s w_s * part_out[b, h, s] / sum_s w_s with w_s = exp2(part_lse[b, h, s] -
    max_s part_lse[b, h, s]); all splits empty (a padding row) gives zeros.
    """
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < NUM_SPLITS
    part = (b * num_heads + h) * NUM_SPLITS + offs_s
    lse = tl.load(part_lse_ptr + part, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    # All splits empty (a padding row): keep the weights at exp2(-inf) = 0, not NaN.
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    total = tl.sum(w, axis=0)
    parts = tl.load(
        part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None], other=0.0
    )
    out = tl.sum(w[:, None] * parts, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


@triton.jit
def _prefill_kernel(
    q_ptr: tl.tensor,
    pool_ptr: tl.tensor,
    k_table_ptr: tl.tensor,
    v_table_ptr: tl.tensor,
    req_rows_ptr: tl.tensor,
    q_starts_ptr: tl.tensor,
    q_lens_ptr: tl.tensor,
    ctx_lens_ptr: tl.tensor,
    out_ptr: tl.tensor,
    qk_scale: tl.tensor,
    stride_qt: tl.tensor,
    stride_qh: tl.tensor,
    stride_pool: tl.tensor,
    stride_kt: tl.tensor,
    stride_vt: tl.tensor,
    stride_ot: tl.tensor,
    stride_oh: tl.tensor,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
) -> None:
    """Grid (cdiv(max_q_len, BLOCK_M), B, H): BLOCK_M new tokens of request b, query head h.

    q [T, H, D] and out [T, H, D] (strided, flat tokens); request b's rows start at
    q_starts[b], q_lens[b] of them at positions ctx_lens[b] + i; pool and tables as in the
    decode kernel. Causal: the query at position p sees keys 0..p of its own table row.
    Reference: `kernels.paged_attention_ref.paged_prefill_attention_ref`.
    """
    m_block = tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2)

    q_len = tl.load(q_lens_ptr + b)
    # The grid is sized for the longest request; shorter ones leave programs with nothing to do.
    if m_block * BLOCK_M >= q_len:
        return
    ctx_len = tl.load(ctx_lens_ptr + b)
    q_start = tl.load(q_starts_ptr + b).to(tl.int64)
    row = tl.load(req_rows_ptr + b).to(tl.int64)
    kv_head = h // GROUP

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM)
    m_mask = offs_m < q_len
    q_rows = q_start + offs_m
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
        mask=m_mask[:, None],
        other=0.0,
    )
    q_pos = ctx_len + offs_m

    k_row_ptr = k_table_ptr + row * stride_kt
    v_row_ptr = v_table_ptr + row * stride_vt
    col = kv_head * HEAD_DIM + offs_d

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)

    # Keys before the block's first query position are visible to every row of the block: no
    # causal mask there. Only the last few key blocks (the diagonal) need it.
    first_pos = ctx_len + m_block * BLOCK_M
    full_end = (first_pos // BLOCK_N) * BLOCK_N
    hi = tl.minimum(first_pos + BLOCK_M, ctx_len + q_len)
    for start in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = _attend_key_block(
            q,
            acc,
            m_i,
            l_i,
            start,
            full_end,
            q_pos,
            pool_ptr,
            k_row_ptr,
            v_row_ptr,
            col,
            stride_pool,
            qk_scale,
            BLOCK_N,
            MASK_KEYS=False,
            CAUSAL=False,
            DOT_PRECISION=DOT_PRECISION,
        )
    # Key 0 is visible to every row (also the out-of-range ones past q_len), so no row is
    # all -inf and the maxima stay finite.
    for start in range(full_end, hi, BLOCK_N):
        acc, m_i, l_i = _attend_key_block(
            q,
            acc,
            m_i,
            l_i,
            start,
            hi,
            q_pos,
            pool_ptr,
            k_row_ptr,
            v_row_ptr,
            col,
            stride_pool,
            qk_scale,
            BLOCK_N,
            MASK_KEYS=True,
            CAUSAL=True,
            DOT_PRECISION=DOT_PRECISION,
        )

    out = acc / l_i[:, None]
    tl.store(
        out_ptr + q_rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :],
        out.to(out_ptr.dtype.element_ty),
        mask=m_mask[:, None],
    )


def _dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs would otherwise go through tf32 on the GPU; the interpreter is exact anyway.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_common(q: Tensor, pool: Tensor, k_table: Tensor, v_table: Tensor) -> tuple[int, int]:
    """Validate the shared arguments; return (num_kv_heads, head_dim)."""
    if q.dim() != 3:
        raise ValueError(f"q must be 3-D, got shape {tuple(q.shape)}")
    num_heads, head_dim = q.shape[1], q.shape[2]
    if head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"head_dim must be a power of two >= 16, got {head_dim}")
    if pool.dim() != 2 or pool.shape[1] % head_dim:
        raise ValueError(f"pool must be [num_slots, KVH * {head_dim}], got {tuple(pool.shape)}")
    num_kv_heads = pool.shape[1] // head_dim
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not divide into {num_kv_heads} kv heads")
    if pool.dtype != q.dtype:
        raise ValueError(f"pool dtype {pool.dtype} differs from q dtype {q.dtype}")
    if q.stride(2) != 1 or pool.stride(1) != 1:
        raise ValueError("q and pool must be contiguous along their last dimension")
    for name, table in (("k_table", k_table), ("v_table", v_table)):
        if table.dtype != torch.int32 or table.dim() != 2 or table.stride(1) != 1:
            raise ValueError(f"{name} must be a 2-D int32 tensor contiguous along its last dim")
    return num_kv_heads, head_dim


def _check_out(out: Tensor | None, q: Tensor) -> Tensor:
    if out is None:
        return torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if out.shape != q.shape or out.dtype != q.dtype or out.stride(2) != 1:
        raise ValueError("out must match q's shape and dtype, contiguous along its last dim")
    return out


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 1


def decode_num_splits(batch: int, num_kv_heads: int, max_len: int, device: torch.device) -> int:
    """How many programs share one request's keys in `paged_decode_attention`.

    With a few thousand (request, kv head) programs the pipelined gathers keep memory busy on
    their own and splitting only adds merge work: measured on an H200 (Llama-7B shapes, bf16,
    the variants benchmark of commit 987c61c, BENCHMARKS.md), one split is fastest from 1,024
    programs up (32 requests of 140 tokens: 36 us against 38-41 us with 2-4 splits; 160 of
    ~400: 245 against 265-282 us). Below ~2 programs per SM the keys are split until there
    are ~4 per SM (measured 2-6x faster at batch 1 on an H100). MHA and GQA take the same
    rule, both running as tl.dot. Chosen from static shapes only (max_len = the tables'
    width), so that a CUDA graph captures a fixed launch.
    """
    pairs = batch * num_kv_heads
    sms = _num_sms(device)
    if pairs >= 2 * sms:
        return 1
    target = 4 * sms
    # Splits of fewer than ~32 keys would only add merge work.
    return max(1, min(16, ceil_div(target, pairs), max_len // 32))


def paged_decode_attention(
    q: Tensor,
    pool: Tensor,
    k_table: Tensor,
    v_table: Tensor,
    req_rows: Tensor,
    seq_lens: Tensor,
    scale: float,
    *,
    out: Tensor | None = None,
    num_splits: int | None = None,
) -> Tensor:
    """One decode step of attention over the paged KV cache.

    q [B, H, D]: one query per request, at position seq_lens[b] - 1. Request b attends over its
    tokens 0..seq_lens[b]-1, whose K is pool[k_table[req_rows[b], t]].view(KVH, D) (V likewise
    through v_table); query head h uses kv head h // (H // KVH). pool [num_slots, KVH * D];
    k_table, v_table int32 [max_rows, max_len]; req_rows, seq_lens int32 [B] on q's device.
    seq_lens[b] == 0 marks a padding row, whose output is zeros. Returns [B, H, D] in q's dtype
    (written into `out` when given). `num_splits` overrides the split-K choice
    (`decode_num_splits`). Reference: `kernels.paged_attention_ref.paged_decode_attention_ref`.
    """
    num_kv_heads, head_dim = _check_common(q, pool, k_table, v_table)
    batch, num_heads, _ = q.shape
    out = _check_out(out, q)
    if batch == 0:
        return out
    group = num_heads // num_kv_heads
    if num_splits is None:
        num_splits = decode_num_splits(batch, num_kv_heads, k_table.shape[1], q.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")

    # Even MHA's one query row per head goes through tl.dot, padded to 16 rows: the wasted
    # tensor-core work is free, while the broadcast-multiply-and-sum form spent its time in
    # cross-thread reductions and reached half the bandwidth (H200, Llama-7B shapes: 2.1 TB/s
    # against 3.9-4.1 TB/s at 160-256 requests of ~400 tokens; BENCHMARKS.md, fourth session).
    block_g = max(_MIN_DOT_ROWS, next_power_of_2(group))
    # 128-key blocks measured best for MHA in bf16 (3 pipeline stages of K and V tiles fit in
    # shared memory); fp32 and wider heads take shorter ones to fit.
    block_n = 128 if group == 1 and q.element_size() <= 2 and head_dim <= 128 else 64
    if num_splits > 1:
        part_out = torch.empty(
            batch, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device
        )
        part_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=q.device)
    else:
        part_out = part_lse = out  # unused by the single-split kernel
    _decode_kernel[(batch, num_kv_heads, num_splits)](
        q,
        pool,
        k_table,
        v_table,
        req_rows,
        seq_lens,
        out,
        part_out,
        part_lse,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        pool.stride(0),
        k_table.stride(0),
        v_table.stride(0),
        out.stride(0),
        out.stride(1),
        num_heads,
        NUM_SPLITS=num_splits,
        GROUP=group,
        BLOCK_G=block_g,
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=4,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            part_out,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            num_heads,
            NUM_SPLITS=num_splits,
            BLOCK_S=next_power_of_2(num_splits),
            HEAD_DIM=head_dim,
            num_warps=1 if head_dim <= 64 else 2,
        )
    return out


def paged_prefill_attention(
    q: Tensor,
    pool: Tensor,
    k_table: Tensor,
    v_table: Tensor,
    req_rows: Tensor,
    q_starts: Tensor,
    q_lens: Tensor,
    ctx_lens: Tensor,
    scale: float,
    max_q_len: int,
    *,
    out: Tensor | None = None,
) -> Tensor:
    """Causal attention of the new tokens of several requests over the paged KV cache.

    q [T, H, D]: the flat new tokens of B requests; request b's are rows
    q_starts[b] .. q_starts[b]+q_lens[b]-1, at absolute positions ctx_lens[b] ..
    ctx_lens[b]+q_lens[b]-1, and their K/V are already in the pool (positions
    0 .. ctx_lens[b]+q_lens[b]-1 of table row req_rows[b]). The query at position p sees keys
    0..p; query head h uses kv head h // (H // KVH). req_rows, q_starts, q_lens, ctx_lens are
    int32 [B] on q's device; max_q_len >= max(q_lens) sizes the grid. Returns [T, H, D] in q's
    dtype (written into `out` when given); rows of no request are left untouched.
    Reference: `kernels.paged_attention_ref.paged_prefill_attention_ref`.
    """
    num_kv_heads, head_dim = _check_common(q, pool, k_table, v_table)
    tokens, num_heads, _ = q.shape
    out = _check_out(out, q)
    batch = q_lens.shape[0]
    if tokens == 0 or batch == 0 or max_q_len <= 0:
        return out
    # 128x64 tiles were fastest on an H100 for long prompts; short ones waste less with 64 rows.
    block_m, block_n = (64 if max_q_len <= 64 else 128), 64
    grid = (ceil_div(max_q_len, block_m), batch, num_heads)
    _prefill_kernel[grid](
        q,
        pool,
        k_table,
        v_table,
        req_rows,
        q_starts,
        q_lens,
        ctx_lens,
        out,
        scale * _LOG2E,
        q.stride(0),
        q.stride(1),
        pool.stride(0),
        k_table.stride(0),
        v_table.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=num_heads // num_kv_heads,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=4,
    )
    return out


__all__ = [
    "decode_num_splits",
    "paged_decode_attention",
    "paged_prefill_attention",
]
