"""An experiment, not yet timed on the device: the decode LoRA of `kernels/lora.py` (split-K
shrink, sum, expand) with a shorter chain of dependent loads in every program.

The sixth session found the decode LoRA bound by each program's chain: request -> adapter row
(`req_lora`) -> its projection's rank and first slot (`lora_meta`) -> slot numbers
(`lora_slots`) -> weights, four loads that wait on each other before the weights arrive. The
slot numbers of a request's rows are the same in every layer (each layer's pool holds the
adapter in the same slots), so a batch can look them up once, before the layers run
(`request_slot_tables`, torch ops on the device, a CUDA graph can hold them), into tables
indexed by the request itself: the shrink then reads its slot numbers and then its weights
(two loads), the expand its rank, then slot numbers, then weights (three).

Same arguments and result as `lora.lora_apply` for a decode batch (one row a request), plus the
tables; its reference is `lora_ref.lora_apply_ref`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

# The production kernels' tiling rules, shared so that the two launch the same shrink.
from benchmarks.lora_variants.decode_shrink import BLOCK_T, decode_shrink_part
from kernels.lora_launch import (
    MAX_PARTS,
    block_in_slot,
    column_block,
    column_blocks,
    slot_rows,
    split_width,
)


class SlotTables(NamedTuple):
    """One group's slot numbers by request, looked up once a batch: -1 past a rank."""

    a: torch.Tensor  # [B, NPROJ, R, KS] int32: slots of A's row r (KS = cdiv(in, W))
    b: torch.Tensor  # [B, NPROJ, R, NS] int32: slots of Bᵀ's row r (NS = cdiv(max width, W))
    rank: torch.Tensor  # [B, NPROJ] int32: 0 without an adapter or for a projection it leaves


def request_slot_tables(
    lora_slots: torch.Tensor,
    lora_meta: torch.Tensor,
    req_lora: torch.Tensor,
    projs: tuple[int, ...],
    in_features: int,
    widths: tuple[int, ...],
    max_rank: int,
    slot_width: int,
) -> SlotTables:
    """The tables of one projection group for a batch (device ops only, no host sync)."""
    device = lora_slots.device
    has = (req_lora >= 0).to(torch.int32)
    m = req_lora.clamp(min=0).long()
    meta = lora_meta[m][:, list(projs), :]  # [B, P, 3]
    rank = meta[..., 0] * has[:, None]
    rows = lora_slots[m].long()  # [B, S]
    r = torch.arange(max_rank, device=device)

    def table(start: torch.Tensor, per_row: torch.Tensor, width_slots: int) -> torch.Tensor:
        cols = torch.arange(width_slots, device=device)
        index = start[:, :, None, None] + r[None, None, :, None] * per_row[None, :, None, None]
        index = index + cols[None, None, None, :]
        ok = (r[None, None, :, None] < rank[:, :, None, None]) & (
            cols[None, None, None, :] < per_row[None, :, None, None]
        )
        flat = index.clamp(0, rows.shape[1] - 1).reshape(rows.shape[0], -1)
        found = rows.gather(1, flat).view(index.shape)
        return torch.where(ok, found, -1).to(torch.int32).contiguous()

    ks = -(-in_features // slot_width)
    ns = [-(-w // slot_width) for w in widths]
    k_per_row = torch.full((len(projs),), ks, device=device)
    n_per_row = torch.tensor(ns, device=device)
    return SlotTables(
        table(meta[..., 1].long(), k_per_row, ks),
        table(meta[..., 2].long(), n_per_row, max(ns)),
        rank.to(torch.int32).contiguous(),
    )


@triton.jit
def _shrink_kernel(
    x_ptr,
    parts_ptr,
    pool_ptr,
    a_tab_ptr,
    q_starts_ptr,
    in_features,
    stride_x,
    max_rank,
    n_rblocks,
    split_stride,
    k_slots,
    W: tl.constexpr,
    NPROJ: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    STAGES: tl.constexpr,
    IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    split = tl.program_id(1)
    p_local = tl.program_id(2) // n_rblocks
    r0 = (tl.program_id(2) % n_rblocks) * BLOCK_R
    k_begin = split * SPLIT_K
    ranks = r0 + tl.arange(0, BLOCK_R)
    entry = ((b * NPROJ + p_local) * max_rank + ranks) * k_slots + k_begin // W
    slot = tl.load(a_tab_ptr + entry, mask=ranks < max_rank, other=-1)
    rank_ok = slot >= 0
    if tl.max(rank_ok.to(tl.int32), axis=0) == 0:
        return
    row = tl.load(q_starts_ptr + b)
    part = decode_shrink_part(
        x_ptr, pool_ptr, slot, rank_ok, row, k_begin, in_features, stride_x, W, BLOCK_R,
        BLOCK_K, SPLIT_K, STAGES, IEEE,
    )  # fmt: skip
    offs = split * split_stride + (row * NPROJ + p_local) * max_rank + ranks
    tl.store(parts_ptr + offs, part, mask=rank_ok)


@triton.jit
def _expand_kernel(
    y_ptr,
    out_ptr,
    pool_ptr,
    b_tab_ptr,
    rank_ptr,
    q_starts_ptr,
    width0,
    width1,
    width2,
    blocks0,
    blocks1,
    stride_out,
    max_rank,
    n_slots_max,
    W: tl.constexpr,
    NPROJ: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    b = tl.program_id(0)
    p_local, col0, width, n0 = column_block(
        tl.program_id(1), width0, width1, width2, blocks0, blocks1, BLOCK_N
    )
    rank = tl.load(rank_ptr + b * NPROJ + p_local)
    if rank == 0:
        return
    row = tl.load(q_starts_ptr + b)
    pad = tl.arange(0, BLOCK_T)
    cols = tl.arange(0, BLOCK_N)
    col_ok = n0 + cols < width
    out_ptrs = out_ptr + row.to(tl.int64) * stride_out + col0 + n0 + pad[:, None] * 0
    out_ptrs += cols[None, :]
    out_ok = (pad[:, None] == 0) & col_ok[None, :]
    current = tl.load(out_ptrs, mask=out_ok, other=0.0)
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < rank
        entry = ((b * NPROJ + p_local) * max_rank + ranks) * n_slots_max + n0 // W
        slot = tl.load(b_tab_ptr + entry, mask=rank_ok, other=0)
        bt = tl.load(
            slot_rows(pool_ptr, slot, n0 % W, W) + cols[None, :],
            mask=rank_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        y_offs = (row * NPROJ + p_local) * max_rank + ranks
        y = tl.load(
            y_ptr + pad[:, None] * 0 + y_offs[None, :],
            mask=(pad[:, None] == 0) & rank_ok[None, :],
            other=0.0,
        )
        acc += tl.dot(y.to(bt.dtype), bt, input_precision="ieee" if IEEE else None)
    tl.store(out_ptrs, (current.to(tl.float32) + acc).to(current.dtype), mask=out_ok)


def lora_apply_direct_slots(
    x: torch.Tensor,
    out: torch.Tensor,
    pool: torch.Tensor,
    q_starts: torch.Tensor,
    tables: SlotTables,
    widths: tuple[int, ...],
    max_rank: int,
    max_k_splits: int = 8,
    block_n_cap: int = 128,
    shrink_stages: int = 3,
    num_warps: int = 4,
) -> torch.Tensor:
    """`lora.lora_apply` of a decode batch through `request_slot_tables`'s tables (made with
    the same projections, widths, max_rank and slot width). max_rank <= 64."""
    nproj = len(widths)
    if not 1 <= nproj <= MAX_PARTS or sum(widths) != out.shape[1]:
        raise ValueError(f"1 to {MAX_PARTS} projections covering out: {widths}")
    batch, slot_width = tables.rank.shape[0], pool.shape[1]
    if batch == 0 or max_rank == 0:
        return out
    block_k = block_in_slot(slot_width, 128)
    split_k = split_width(slot_width, x.shape[1], block_k, max_k_splits)
    k_splits = triton.cdiv(x.shape[1], split_k)
    parts = torch.empty(k_splits, x.shape[0], nproj, max_rank, dtype=torch.float32, device=x.device)
    block_r = 16
    n_rblocks = triton.cdiv(max_rank, block_r)
    ieee = x.dtype == torch.float32
    _shrink_kernel[(batch, k_splits, nproj * n_rblocks)](
        x, parts, pool, tables.a, q_starts, x.shape[1], x.stride(0), max_rank, n_rblocks,
        parts[0].numel(), tables.a.shape[3], W=slot_width, NPROJ=nproj, BLOCK_R=block_r,
        BLOCK_K=block_k, SPLIT_K=split_k, STAGES=shrink_stages, IEEE=ieee, num_warps=num_warps,
    )  # fmt: skip
    y = parts[0] if k_splits == 1 else parts.sum(0)  # in split order, as lora.py's
    block_n = block_in_slot(slot_width, block_n_cap)
    padded, blocks = column_blocks(widths, block_n)
    _expand_kernel[(batch, sum(blocks))](
        y, out, pool, tables.b, tables.rank, q_starts, *padded, blocks[0], blocks[1],
        out.stride(0), max_rank, tables.b.shape[3], W=slot_width, NPROJ=nproj, BLOCK_R=block_r,
        BLOCK_N=block_n, IEEE=ieee, num_warps=num_warps,
    )  # fmt: skip
    return out
