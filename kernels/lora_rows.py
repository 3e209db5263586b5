"""Triton LoRA kernels for a decode batch: one row a request, each request on its own adapter
(S-LoRA's MBGMV), A and Bᵀ read from the unified pool through the adapter tables.

Same arguments and result as `lora.lora_apply` (reference: `lora_ref.lora_apply_ref`) for a
batch whose requests bring at most one row each. Two launches a projection group:
- shrink: grid (request, split of in_features, projection x `row_rank_programs`). A program
  multiplies its request's row against rows of A over one split (a split lies in one slot of
  each row), `row_shrink_block_r` ranks at a time up to its request's own rank, and writes the
  float32 partial products parts[split, row, projection, rank];
- expand: grid (request, block of the fused output's columns). A program adds the splits'
  partial products in a fixed order (a row's result does not depend on its batch), then
  walks its adapter's rank `row_expand_block_r` ranks a step and adds y @ Bᵀ into its
  columns of the output. By default it takes one rank's row of Bᵀ at a time into a
  [BLOCK_N] accumulator, so that a thread keeps its own columns of every row and nothing is
  summed across threads; batches under `row_small_batch` take [16, 512] tiles of Bᵀ into a
  tile accumulator instead (`lora_launch.row_expand_launch`, measured there).

Why not `lora.py`'s tiled kernels for these batches: tl.dot needs 16 rows, so there a decode
request's program carries a 16-row tile of which one row is real, and its tiles are sized for
that. Here a program's products are elementwise multiplies and a sum in float32, so its
registers hold only the real row and a program can take a larger tile of the adapter (a
decode batch's LoRA is bound by the bytes each program has in flight, not by FLOPs). Measured
against the tiled kernels on an H200 at Llama-7B shapes: 1.07-1.18x faster with ranks 8-64,
1.27x with rank 8 under the engine's rank bound of 128 (BENCHMARKS.md, eleventh session);
the rank-by-rank expand another 1.2x (ranks 8-64, 128 requests) and 1.45-1.96x (rank 8)
(twelfth session).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.host_math import ceil_div
from kernels.lora_launch import (
    EXPAND_ACCUMULATORS,
    LoraLaunch,
    block_in_slot,
    column_block,
    column_blocks,
    row_expand_launch,
    shrink_splits,
    slot_row,
    slot_rows,
)


# rank_programs is fixed per engine; unspecialized all the same, as it may be 1.
@triton.jit(do_not_specialize=["rank_programs"])
def _row_shrink_kernel(
    x_ptr,
    part_ptr,
    pool_ptr,
    slots_ptr,
    meta_ptr,
    req_lora_ptr,
    q_starts_ptr,
    q_lens_ptr,
    proj_ids_ptr,
    in_features,
    stride_x,
    stride_slots,
    meta_stride,
    rank_stride,
    rank_programs,
    split_stride,
    W: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    STAGES: tl.constexpr,
    NPROJ: tl.constexpr,
    REQUEST_MAJOR: tl.constexpr,
):
    # REQUEST_MAJOR: the request is the grid's slowest axis, so that the GPU starts all of a
    # request's programs before the next request's (see LoraLaunch.row_request_major).
    b = tl.program_id(2 if REQUEST_MAJOR else 0)
    split = tl.program_id(1)
    p_local = tl.program_id(0 if REQUEST_MAJOR else 2) // rank_programs
    first_chunk = tl.program_id(0 if REQUEST_MAJOR else 2) % rank_programs
    # Every load a program needs before its weights is issued up front, side by side: the
    # kernel is bound by each program's chain of dependent loads, not by bytes.
    m = tl.load(req_lora_ptr + b)
    q_len = tl.load(q_lens_ptr + b)
    row = tl.load(q_starts_ptr + b)
    proj = tl.load(proj_ids_ptr + p_local)
    meta = meta_ptr + (m * meta_stride + proj) * 3
    rank = tl.load(meta, mask=m >= 0, other=0)
    a_start = tl.load(meta + 1, mask=m >= 0, other=0)
    if m < 0 or q_len == 0 or first_chunk * BLOCK_R >= rank:
        return
    k_begin = split * SPLIT_K
    x_row = x_ptr + row.to(tl.int64) * stride_x + k_begin
    y_row = part_ptr + split * split_stride + (row * NPROJ + p_local) * rank_stride
    # This program's chunks of BLOCK_R ranks: first_chunk, then every rank_programs-th one.
    for r0 in range(first_chunk * BLOCK_R, rank, rank_programs * BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < rank
        slot_idx = a_start + ranks * tl.cdiv(in_features, W) + k_begin // W
        slot = tl.load(slots_ptr + m * stride_slots + slot_idx, mask=rank_ok, other=0)
        a_rows = slot_rows(pool_ptr, slot, k_begin % W, W)
        acc = tl.zeros((BLOCK_R, BLOCK_K), dtype=tl.float32)
        for i in tl.range(0, SPLIT_K // BLOCK_K, num_stages=STAGES):
            cols = i * BLOCK_K + tl.arange(0, BLOCK_K)
            col_ok = k_begin + cols < in_features
            x = tl.load(x_row + cols, mask=col_ok, other=0.0)
            a_ok = rank_ok[:, None] & col_ok[None, :]
            a = tl.load(a_rows + cols[None, :], mask=a_ok, other=0.0)
            acc += a.to(tl.float32) * x.to(tl.float32)[None, :]
        tl.store(y_row + ranks, tl.sum(acc, axis=1), mask=rank_ok)


@triton.jit
def _expand_rank_rows(
    acc, y_row, split_stride, slot_row0, slots_per_row, pool_ptr, r0, rank, n0, cols, col_ok,
    W: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr,
):  # fmt: skip
    """acc [BLOCK_N] += y[r] * Bᵀ[r, n0 + cols] for r in r0 .. r0 + BLOCK_R below `rank`, one
    rank's row of Bᵀ at a time: a thread keeps its own columns of every row, so nothing is
    summed across threads; the rows' loads still go out together."""
    for i in tl.static_range(BLOCK_R):
        r_ok = r0 + i < rank
        y_r = tl.zeros((), dtype=tl.float32)
        for s in tl.static_range(SPLITS):
            y_r += tl.load(y_row + s * split_stride + r0 + i, mask=r_ok, other=0.0)
        slot = tl.load(slot_row0 + (r0 + i) * slots_per_row, mask=r_ok, other=0)
        bt = tl.load(slot_row(pool_ptr, slot, n0 % W, W) + cols, mask=r_ok & col_ok, other=0.0)
        # y is rounded to the weights' dtype before the expand, as the tiled kernels do.
        acc += y_r.to(bt.dtype).to(tl.float32) * bt.to(tl.float32)
    return acc


@triton.jit
def _expand_rank_tile(
    acc, y_row, split_stride, slot_row0, slots_per_row, pool_ptr, r0, rank, n0, cols, col_ok,
    W: tl.constexpr, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr, SUM_NOW: tl.constexpr,
):  # fmt: skip
    """The [BLOCK_R, BLOCK_N] tile of Bᵀ of ranks r0 .. r0 + BLOCK_R (below `rank`) at once,
    times y: added to acc [BLOCK_R, BLOCK_N], or with SUM_NOW summed over its ranks into acc
    [BLOCK_N]."""
    ranks = r0 + tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    y = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for s in tl.static_range(SPLITS):
        y += tl.load(y_row + s * split_stride + ranks, mask=rank_ok, other=0.0)
    slot = tl.load(slot_row0 + ranks * slots_per_row, mask=rank_ok, other=0)
    bt = tl.load(
        slot_rows(pool_ptr, slot, n0 % W, W) + cols[None, :],
        mask=rank_ok[:, None] & col_ok[None, :],
        other=0.0,
    )
    products = y.to(bt.dtype).to(tl.float32)[:, None] * bt.to(tl.float32)
    if SUM_NOW:
        acc += tl.sum(products, axis=0)
    else:
        acc += products
    return acc


@triton.jit
def _row_expand_kernel(
    part_ptr,
    out_ptr,
    pool_ptr,
    slots_ptr,
    meta_ptr,
    req_lora_ptr,
    q_starts_ptr,
    q_lens_ptr,
    proj_ids_ptr,
    width0,
    width1,
    width2,
    blocks0,
    blocks1,
    stride_out,
    stride_slots,
    meta_stride,
    rank_stride,
    split_stride,
    W: tl.constexpr,
    NPROJ: tl.constexpr,
    SPLITS: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
    ACC: tl.constexpr,
    REQUEST_MAJOR: tl.constexpr,
):
    b = tl.program_id(1 if REQUEST_MAJOR else 0)
    p_local, col0, width, n0 = column_block(
        tl.program_id(0 if REQUEST_MAJOR else 1), width0, width1, width2, blocks0, blocks1, BLOCK_N
    )
    # As in the shrink, loads that do not depend on each other are issued together.
    m = tl.load(req_lora_ptr + b)
    q_len = tl.load(q_lens_ptr + b)
    row = tl.load(q_starts_ptr + b)
    proj = tl.load(proj_ids_ptr + p_local)
    meta = meta_ptr + (m * meta_stride + proj) * 3
    rank = tl.load(meta, mask=m >= 0, other=0)
    b_start = tl.load(meta + 2, mask=m >= 0, other=0)
    if m < 0 or q_len == 0 or rank == 0:
        return
    cols = tl.arange(0, BLOCK_N)
    col_ok = n0 + cols < width
    out_ptrs = out_ptr + row.to(tl.int64) * stride_out + col0 + n0 + cols
    current = tl.load(out_ptrs, mask=col_ok)
    y_row = part_ptr + (row * NPROJ + p_local) * rank_stride
    slots_per_row = tl.cdiv(width, W)  # a row's last slot is padded past out_features
    slot_row0 = slots_ptr + m * stride_slots + b_start + n0 // W
    if ACC == 0:
        acc = tl.zeros((BLOCK_R, BLOCK_N), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for r0 in tl.range(0, rank, BLOCK_R, num_stages=STAGES):
        if ACC == 2:
            acc = _expand_rank_rows(
                acc, y_row, split_stride, slot_row0, slots_per_row, pool_ptr, r0, rank, n0, cols,
                col_ok, W, SPLITS, BLOCK_R,
            )  # fmt: skip
        else:
            acc = _expand_rank_tile(
                acc, y_row, split_stride, slot_row0, slots_per_row, pool_ptr, r0, rank, n0, cols,
                col_ok, W, SPLITS, BLOCK_R, ACC == 1,
            )  # fmt: skip
    delta = tl.sum(acc, axis=0) if ACC == 0 else acc
    tl.store(out_ptrs, (current.to(tl.float32) + delta).to(current.dtype), mask=col_ok)


def lora_apply_rows(
    x: torch.Tensor,
    out: torch.Tensor,
    tables: tuple[torch.Tensor, ...],
    projs: torch.Tensor,
    widths: tuple[int, ...],
    max_rank: int,
    launch: LoraLaunch,
) -> None:
    """out[q_starts[b], cols of projection i] += x[q_starts[b]] @ A_pᵢᵀ @ Bᵀ_pᵢ of request b's
    adapter, for every request b with q_lens[b] == 1 (0: skipped), in place.

    x [T, in], out [T, sum(widths)] (unit column strides); tables: pool [num_slots, W],
    lora_slots [M, S], lora_meta [M, P, 3], req_lora/q_starts/q_lens [B]; projs: int32
    projection ids on x's device (`lora_launch.proj_ids`); max_rank bounds every rank."""
    pool, lora_slots, lora_meta, req_lora = tables[:4]
    batch, slot_width, in_features = req_lora.shape[0], pool.shape[1], x.shape[1]
    nproj = projs.shape[0]
    block_k, split_k, parts = shrink_splits(
        x, slot_width, launch.row_block_k, launch.max_k_splits, nproj, max_rank
    )
    k_splits, rank_stride = parts.shape[0], parts.shape[3]
    # A grid axis over every chunk of max_rank (the engine's largest, 128, in its decode
    # graphs) would launch mostly programs that exit (S1's ranks are 8): a program walks
    # chunks of its request's own rank instead, row_rank_programs of them sharing the walk.
    chunk = launch.row_shrink_block_r
    rank_programs = max(1, min(launch.row_rank_programs, ceil_div(rank_stride, chunk)))
    major = launch.row_request_major
    shrink_grid = (batch, k_splits, nproj * rank_programs)
    _row_shrink_kernel[shrink_grid[::-1] if major else shrink_grid](
        x,
        parts,
        *tables,
        projs,
        in_features,
        x.stride(0),
        lora_slots.stride(0),
        lora_meta.shape[1],
        rank_stride,
        rank_programs,
        parts[0].numel(),
        W=slot_width,
        BLOCK_R=chunk,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        STAGES=launch.shrink_stages,
        NPROJ=nproj,
        REQUEST_MAJOR=major,
        num_warps=launch.num_warps,
    )
    expand = row_expand_launch(launch, batch)
    block_n = block_in_slot(slot_width, expand.row_block_n)
    padded, blocks = column_blocks(widths, block_n)
    while block_n > 128 and batch * sum(blocks) < expand.row_expand_min_programs:
        block_n //= 2
        padded, blocks = column_blocks(widths, block_n)
    expand_grid = (batch, sum(blocks))
    _row_expand_kernel[expand_grid[::-1] if major else expand_grid](
        parts,
        out,
        *tables,
        projs,
        *padded,
        blocks[0],
        blocks[1],
        out.stride(0),
        lora_slots.stride(0),
        lora_meta.shape[1],
        rank_stride,
        parts[0].numel(),
        W=slot_width,
        NPROJ=nproj,
        SPLITS=k_splits,
        BLOCK_R=expand.row_expand_block_r,
        BLOCK_N=block_n,
        STAGES=expand.row_expand_stages,
        ACC=EXPAND_ACCUMULATORS.index(expand.row_expand_accumulator),
        REQUEST_MAJOR=major,
        num_warps=launch.num_warps,
    )
