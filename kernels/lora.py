"""Triton LoRA kernels for a batch that mixes adapters of different ranks (S-LoRA's MBGMM and
MBGMV in one form), reading A and Bᵀ straight from the unified pool through slot tables.

Layout and meaning of every argument: see `lora_ref.py`, whose function is the reference
these must match. `lora_apply` adds x @ Aᵀ @ Bᵀ of each row's adapter into a fused output
whose column ranges are the projections of one input (q|k|v, gate|up; or o, down alone): a
shrink launch, a sum of its split-K partial products, and one expand launch over the columns
of every projection of the group.

A decode step at batch 32 moves a few MB per launch, so a launch costs its dependent memory
round-trips more than its bytes: each shrink program reads its slot numbers once (a split of
in_features never straddles a slot) and keeps several loads of its loop in flight.

One program handles a tile of one request's rows, so a request with many new tokens
(prefill) is a small matrix product against its adapter, and a decode request (one row)
reads its adapter once. Ranks need no padding: tiles past a request's rank (for that
projection) exit early. A row of A or Bᵀ longer than the slot width W lies over
ceil(len / W) slots, the last one padded, and the kernels mask the tail (Llama-7B's 11008
over W = 4096). Nothing is read back to the host or copied to the device after the first
call with the same projections, so every launch can be captured in CUDA graphs.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.host_math import ceil_div, next_power_of_2
from kernels.lora_launch import (
    DEFAULT_LAUNCH,
    LoraLaunch,
    block_in_slot,
    check_group,
    column_block,
    column_blocks,
    proj_ids,
    shrink_splits,
    slot_rows,
)
from kernels.lora_rows import lora_apply_rows

BLOCK_T = 16  # rows of a request per program (tl.dot needs at least 16)


@triton.jit
def _shrink_step(
    acc,
    x_rows_ptr,
    a_rows,
    c0,
    k_begin,
    in_features,
    row_ok,
    rank_ok,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    """acc += x[:, c0 : c0 + BLOCK_K] @ A[:, c0 : c0 + BLOCK_K]ᵀ within the program's split."""
    cols = c0 + tl.arange(0, BLOCK_K)
    col_ok = k_begin + cols < in_features
    x = tl.load(x_rows_ptr + cols[None, :], mask=row_ok[:, None] & col_ok[None, :], other=0.0)
    a = tl.load(a_rows + cols[None, :], mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    if IEEE:
        return acc + tl.dot(x, tl.trans(a), input_precision="ieee")
    return acc + tl.dot(x, tl.trans(a))


# Arguments that change from batch to batch are not specialized: Triton would compile a kernel
# for each new combination of them being 1 or a multiple of 16, stalling a served step for a
# second or more each time (rank_stride and split_stride are multiples of 16 by construction).
@triton.jit(do_not_specialize=["tiles_per_req", "n_rblocks"])
def _shrink_kernel(
    x_ptr,
    part_ptr,
    pool_ptr,
    slots_ptr,
    meta_ptr,
    req_lora_ptr,
    q_starts_ptr,
    q_lens_ptr,
    proj_ids_ptr,
    tiles_ptr,
    tiles_per_req,
    in_features,
    stride_x,
    stride_slots,
    meta_stride,
    rank_stride,
    n_rblocks,
    split_stride,
    W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    STAGES: tl.constexpr,
    NPROJ: tl.constexpr,
    TILED: tl.constexpr,
    IEEE: tl.constexpr,
):
    if TILED:  # program 0-axis i runs tile i: rows t0.. of request b
        b = tl.load(tiles_ptr + 2 * tl.program_id(0))
        t0 = tl.load(tiles_ptr + 2 * tl.program_id(0) + 1)
    else:  # every request gets tiles_per_req tiles, most of them empty
        b = tl.program_id(0) // tiles_per_req
        t0 = (tl.program_id(0) % tiles_per_req) * BLOCK_T
    split = tl.program_id(1)
    k_begin = split * SPLIT_K
    p_local = tl.program_id(2) // n_rblocks
    r0 = (tl.program_id(2) % n_rblocks) * BLOCK_R
    m = tl.load(req_lora_ptr + b)
    q_len = tl.load(q_lens_ptr + b)
    proj = tl.load(proj_ids_ptr + p_local)
    rank = tl.load(meta_ptr + (m * meta_stride + proj) * 3, mask=m >= 0, other=0)
    if m < 0 or t0 >= q_len or r0 >= rank:
        return
    a_start = tl.load(meta_ptr + (m * meta_stride + proj) * 3 + 1)
    rows = t0 + tl.arange(0, BLOCK_T)
    ranks = r0 + tl.arange(0, BLOCK_R)
    row_ok = rows < q_len
    rank_ok = ranks < rank
    x_rows = tl.load(q_starts_ptr + b) + rows
    # The split lies in one slot of each row of A: one slot number per rank, read once.
    slot_idx = a_start + ranks * tl.cdiv(in_features, W) + k_begin // W
    slot = tl.load(slots_ptr + m * stride_slots + slot_idx, mask=rank_ok, other=0)
    a_rows = slot_rows(pool_ptr, slot, k_begin % W, W)
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    x_rows_ptr = x_ptr + x_rows[:, None] * stride_x + k_begin
    for i in tl.range(0, SPLIT_K // BLOCK_K, num_stages=STAGES):
        acc = _shrink_step(
            acc,
            x_rows_ptr,
            a_rows,
            i * BLOCK_K,
            k_begin,
            in_features,
            row_ok,
            rank_ok,
            BLOCK_K,
            IEEE,
        )
    y_off = (
        split * split_stride + (x_rows[:, None] * NPROJ + p_local) * rank_stride + ranks[None, :]
    )
    tl.store(part_ptr + y_off, acc, mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit(do_not_specialize=["tiles_per_req"])
def _expand_kernel(
    y_ptr,
    out_ptr,
    pool_ptr,
    slots_ptr,
    meta_ptr,
    req_lora_ptr,
    q_starts_ptr,
    q_lens_ptr,
    proj_ids_ptr,
    tiles_ptr,
    tiles_per_req,
    width0,
    width1,
    width2,
    blocks0,
    blocks1,
    stride_out,
    stride_slots,
    meta_stride,
    rank_stride,
    W: tl.constexpr,
    NPROJ: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
    TILED: tl.constexpr,
    IEEE: tl.constexpr,
):
    if TILED:
        b = tl.load(tiles_ptr + 2 * tl.program_id(0))
        t0 = tl.load(tiles_ptr + 2 * tl.program_id(0) + 1)
    else:
        b = tl.program_id(0) // tiles_per_req
        t0 = (tl.program_id(0) % tiles_per_req) * BLOCK_T
    p_local, col0, width, n0 = column_block(
        tl.program_id(1), width0, width1, width2, blocks0, blocks1, BLOCK_N
    )
    m = tl.load(req_lora_ptr + b)
    q_len = tl.load(q_lens_ptr + b)
    proj = tl.load(proj_ids_ptr + p_local)
    rank = tl.load(meta_ptr + (m * meta_stride + proj) * 3, mask=m >= 0, other=0)
    if m < 0 or t0 >= q_len or rank == 0:
        return
    b_start = tl.load(meta_ptr + (m * meta_stride + proj) * 3 + 2)
    rows = t0 + tl.arange(0, BLOCK_T)
    row_ok = rows < q_len
    out_rows = tl.load(q_starts_ptr + b) + rows
    cols = tl.arange(0, BLOCK_N)
    col_ok = n0 + cols < width
    out_ptrs = out_ptr + out_rows[:, None] * stride_out + col0 + n0 + cols[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    current = tl.load(out_ptrs, mask=out_ok)
    slots_per_row = tl.cdiv(width, W)  # a row's last slot is padded past out_features
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < rank
        y_ok = row_ok[:, None] & rank_ok[None, :]
        y_off = (out_rows[:, None] * NPROJ + p_local) * rank_stride + ranks[None, :]
        y = tl.load(y_ptr + y_off, mask=y_ok, other=0.0)
        slot_idx = b_start + ranks * slots_per_row + n0 // W
        slot = tl.load(slots_ptr + m * stride_slots + slot_idx, mask=rank_ok, other=0)
        bt = tl.load(
            slot_rows(pool_ptr, slot, n0 % W, W) + cols[None, :],
            mask=rank_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if IEEE:
            acc += tl.dot(y.to(bt.dtype), bt, input_precision="ieee")
        else:
            acc += tl.dot(y.to(bt.dtype), bt)
    tl.store(out_ptrs, (current.to(tl.float32) + acc).to(current.dtype), mask=out_ok)


class _GridRows(NamedTuple):
    """The kernels' first grid axis: `programs`, each a tile of `tiles` (tiled) or
    tile `i % per_req` of request `i // per_req` (`tiles` then unused)."""

    programs: int
    tiles: torch.Tensor
    per_req: int
    tiled: bool


def _rank_block(max_rank: int) -> int:
    """The smallest power of two >= max_rank, from 16 up to 64."""
    return max(16, min(64, next_power_of_2(max(max_rank, 1))))


def lora_apply(
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
    max_rank: int,
    max_q_len: int,
    launch: LoraLaunch = DEFAULT_LAUNCH,
    tiles: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[t, cols of projs[i]] += x[t] @ A_pᵢᵀ @ Bᵀ_pᵢ of row t's adapter, in place; returns
    out. See lora_ref.lora_apply_ref.

    x [T, in] with unit column stride (in: any width, e.g. 4096 for q/k/v/gate/up, 11008 or
    14336 for down); out [T, sum(widths)] with unit column stride and any row stride (a view
    of a wider tensor is fine): projs[i] owns its columns sum(widths[:i]) .. + widths[i]
    (at most three projections: q, k, v); pool [num_slots, W] (one layer); lora_slots
    [M, S], lora_meta [M, P, 3] (P projections: the meta stride), req_lora/q_starts/q_lens
    [B]: int32 on x's device. max_rank bounds every rank of the batch; max_q_len bounds
    q_lens (grid size only: nothing is read back). Rows without an adapter, and columns of a
    projection the row's adapter leaves alone, keep their values bit for bit. `tiles` (see
    `lora_tiles`): the programs to run, instead of max_q_len's grid of every request; a batch
    whose requests have a few rows and one has many then launches only programs with work.
    A decode batch (max_q_len 1, no tiles) takes `lora_rows`' kernels unless `launch` says
    otherwise."""
    check_group(out, projs, widths)
    if tiles is None and max_q_len <= 1 and launch.row_kernels:
        if req_lora.shape[0] and max_rank:
            lora_apply_rows(
                x,
                out,
                (pool, lora_slots, lora_meta, req_lora, q_starts, q_lens),
                proj_ids(projs, x.device),
                widths,
                max_rank,
                launch,
            )
        return out
    tiles_per_req = ceil_div(max(max_q_len, 1), BLOCK_T)
    rows_grid = req_lora.shape[0] * tiles_per_req if tiles is None else tiles.shape[0]
    if rows_grid == 0 or max_rank == 0:
        return out
    tables = (pool, lora_slots, lora_meta, req_lora, q_starts, q_lens, proj_ids(projs, x.device))
    grid_rows = _GridRows(
        rows_grid, req_lora if tiles is None else tiles, tiles_per_req, tiles is not None
    )
    y = _shrink(x, tables, grid_rows, len(projs), max_rank, launch)
    _expand(y, out, tables, grid_rows, widths, launch)
    return out


def _shrink(
    x: torch.Tensor,
    tables: tuple[torch.Tensor, ...],
    grid_rows: _GridRows,
    nproj: int,
    max_rank: int,
    launch: LoraLaunch,
) -> torch.Tensor:
    """y [T, nproj, max_rank rounded up to 16] float32 = x @ Aᵀ of each row's adapter (entries
    past a rank and rows without an adapter unwritten)."""
    pool, lora_slots, lora_meta = tables[:3]
    rows_grid, tiles, tiles_per_req, tiled = grid_rows
    slot_width, in_features = pool.shape[1], x.shape[1]
    block_k, split_k, parts = shrink_splits(
        x, slot_width, launch.block_k_cap, launch.max_k_splits, nproj, max_rank
    )
    k_splits, rank_stride = parts.shape[0], parts.shape[3]
    block_r = min(launch.block_r, _rank_block(max_rank))
    n_rblocks = ceil_div(max_rank, block_r)
    _shrink_kernel[(rows_grid, k_splits, nproj * n_rblocks)](
        x,
        parts,
        *tables,
        tiles,
        tiles_per_req,
        in_features,
        x.stride(0),
        lora_slots.stride(0),
        lora_meta.shape[1],
        rank_stride,
        n_rblocks,
        parts[0].numel(),
        W=slot_width,
        BLOCK_T=BLOCK_T,
        BLOCK_R=block_r,
        BLOCK_K=block_k,
        SPLIT_K=split_k,
        STAGES=launch.shrink_stages,
        NPROJ=nproj,
        TILED=tiled,
        IEEE=x.dtype == torch.float32,
        num_warps=launch.num_warps,
    )
    # Summing the partial products in a fixed order keeps a row's result deterministic and
    # independent of the batch; one small launch, cheaper than every expand program reading
    # every split (measured: BENCHMARKS.md, "fifth session").
    return parts[0] if k_splits == 1 else parts.sum(0)


def _expand(
    y: torch.Tensor,
    out: torch.Tensor,
    tables: tuple[torch.Tensor, ...],
    grid_rows: _GridRows,
    widths: tuple[int, ...],
    launch: LoraLaunch,
) -> None:
    """out[t, cols of projection i] += y[t, i, :rank] @ Bᵀ of each row's adapter, in place."""
    pool, lora_slots, lora_meta = tables[:3]
    rows_grid, tiles, tiles_per_req, tiled = grid_rows
    slot_width, rank_stride = pool.shape[1], y.shape[2]
    block_n = block_in_slot(slot_width, launch.block_n_cap)
    padded, blocks = column_blocks(widths, block_n)
    _expand_kernel[(rows_grid, sum(blocks))](
        y,
        out,
        *tables,
        tiles,
        tiles_per_req,
        *padded,
        blocks[0],
        blocks[1],
        out.stride(0),
        lora_slots.stride(0),
        lora_meta.shape[1],
        rank_stride,
        W=slot_width,
        NPROJ=len(widths),
        BLOCK_T=BLOCK_T,
        BLOCK_R=min(launch.block_r, _rank_block(rank_stride)),
        BLOCK_N=block_n,
        TILED=tiled,
        IEEE=out.dtype == torch.float32,
        num_warps=launch.num_warps,
    )


def lora_tiles(has_adapter: list[bool], q_lens: list[int], device: torch.device) -> torch.Tensor:
    """int32 [n, 2]: (request, first row) of each BLOCK_T-row tile of the requests that have
    an adapter, for the kernels' `tiles`. Built per batch on the host: one small copy to the
    device, queued, so not for a batch a CUDA graph replays."""
    tiles = [
        (b, t0)
        for b, (used, n) in enumerate(zip(has_adapter, q_lens, strict=True))
        if used
        for t0 in range(0, n, BLOCK_T)
    ]
    host = torch.tensor(tiles, dtype=torch.int32).view(-1, 2)
    if device.type != "cuda":
        return host.to(device)
    # Queued like the kernels, through pinned memory: a blocking copy would wait for the step
    # the device is running (the engine launches the next step before that one ends).
    return host.pin_memory().to(device, non_blocking=True)
