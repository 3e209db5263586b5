"""The split-K shrink step of the direct-slot-tables decode experiment (direct_slots.py): one
program's partial product of one request's row against rows of A that lie in one slot each
over the split."""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.lora_launch import slot_rows

BLOCK_T = tl.constexpr(16)  # tl.dot's minimum rows; row 0 is the request's token


@triton.jit
def decode_shrink_part(
    x_ptr,
    pool_ptr,
    slot,
    rank_ok,
    row,
    k_begin,
    in_features,
    stride_x,
    W: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    STAGES: tl.constexpr,
    IEEE: tl.constexpr,
):
    """[BLOCK_R] float32: x[row, k_begin : k_begin + SPLIT_K] @ A[r, same]ᵀ for each rank r
    of the block, A's row r read from pool slot `slot[r]` (rows not `rank_ok` give 0)."""
    pad = tl.arange(0, BLOCK_T)
    a_rows = slot_rows(pool_ptr, slot, k_begin % W, W)
    x_row = x_ptr + row.to(tl.int64) * stride_x + k_begin
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for i in tl.range(0, SPLIT_K // BLOCK_K, num_stages=STAGES):
        cols = i * BLOCK_K + tl.arange(0, BLOCK_K)
        col_ok = k_begin + cols < in_features
        xv = tl.load(
            x_row + pad[:, None] * 0 + cols[None, :],
            mask=(pad[:, None] == 0) & col_ok[None, :],
            other=0.0,
        )
        a = tl.load(a_rows + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
        acc += tl.dot(xv, tl.trans(a), input_precision="ieee" if IEEE else None)
    return tl.sum(acc, axis=0)  # only row 0 is not zero
