"""Triton LoRA kernels for a batch that mixes adapters of different ranks (S-LoRA's MBGMM and
MBGMV in one form), reading A and Bᵀ straight from the unified pool through slot tables.

Layout and meaning of every argument: see `lora_ref.py`, whose functions are the references
these must match. One program handles a tile of one request's rows, so a request with many
new tokens (prefill) is a small matrix product against its adapter, and a decode request (one
row) reads its adapter once. Ranks need no padding: tiles past a request's rank (for that
projection) exit early. Any linear layer works, attention (q, k, v, o) or MLP (gate, up,
down): a row of A or Bᵀ longer than the slot width W lies over ceil(len / W) slots, the last
one padded, and the kernels mask the tail (Llama-7B's 11008 over W = 4096).
`lora_shrink` computes several projections that share their input (q, k, v; gate, up) in
one launch; `lora_expand` adds into the base projection's output in place. Neither reads
anything back to the host or copies to the device after its first call with the same
projections, so both can be captured in CUDA graphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK_T = 16  # rows of a request per program (tl.dot needs at least 16)


@dataclass(frozen=True)
class LoraLaunch:
    """How the kernels tile their work; the result does not depend on it (beyond the order of
    float32 sums). Benchmarks time variants side by side (benchmarks/lora_tune.py)."""

    block_r: int = 16  # rank columns per program (shrink) or per loop step (expand)
    block_k_cap: int = 128  # shrink: in_features per loop step, at most
    max_k_splits: int = 8  # shrink: programs sharing one row of A, at most
    block_n_cap: int = 128  # expand: out_features per program, at most
    num_warps: int = 4


DEFAULT_LAUNCH = LoraLaunch()


def _block(width: int, cap: int) -> int:
    """Largest power of two <= cap dividing the slot width (a tile never straddles slots)."""
    block = 16
    while block * 2 <= cap and width % (block * 2) == 0:
        block *= 2
    if width % block:
        raise ValueError(f"slot width {width} is not a multiple of 16")
    return block


@triton.jit
def _shrink_kernel(
    x_ptr,
    y_ptr,
    pool_ptr,
    slots_ptr,
    meta_ptr,
    req_lora_ptr,
    q_starts_ptr,
    q_lens_ptr,
    proj_ids_ptr,
    tiles_ptr,
    in_features,
    stride_x,
    stride_slots,
    meta_stride,
    max_rank,
    n_rblocks,
    k_per_split,
    split_stride,
    W: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    NPROJ: tl.constexpr,
    K_SPLITS: tl.constexpr,
    TILED: tl.constexpr,
    IEEE: tl.constexpr,
):
    if TILED:  # program 0-axis i runs tile i: rows t0.. of request b
        b = tl.load(tiles_ptr + 2 * tl.program_id(0))
        t0 = tl.load(tiles_ptr + 2 * tl.program_id(0) + 1)
        split = tl.program_id(1)
    else:
        b = tl.program_id(0)
        t0 = (tl.program_id(1) // K_SPLITS) * BLOCK_T
        split = tl.program_id(1) % K_SPLITS
    k_begin = split * k_per_split
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
    slots_per_row = tl.cdiv(in_features, W)  # a row's last slot is padded past in_features
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for k0 in range(k_begin, tl.minimum(k_begin + k_per_split, in_features), BLOCK_K):
        cols = tl.arange(0, BLOCK_K)
        col_ok = k0 + cols < in_features
        x = tl.load(
            x_ptr + x_rows[:, None] * stride_x + k0 + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        slot_idx = a_start + ranks * slots_per_row + k0 // W
        slot = tl.load(slots_ptr + m * stride_slots + slot_idx, mask=rank_ok, other=0)
        a = tl.load(
            pool_ptr + slot.to(tl.int64)[:, None] * W + (k0 % W) + cols[None, :],
            mask=rank_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if IEEE:
            acc += tl.dot(x, tl.trans(a), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(a))
    y_off = split * split_stride + (x_rows[:, None] * NPROJ + p_local) * max_rank + ranks[None, :]
    tl.store(y_ptr + y_off, acc, mask=row_ok[:, None] & rank_ok[None, :])


@triton.jit
def _expand_kernel(
    y_ptr,
    out_ptr,
    pool_ptr,
    slots_ptr,
    meta_ptr,
    req_lora_ptr,
    q_starts_ptr,
    q_lens_ptr,
    tiles_ptr,
    proj,
    y_index,
    out_features,
    stride_out,
    stride_slots,
    meta_stride,
    max_rank,
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
        b = tl.program_id(0)
        t0 = tl.program_id(1) * BLOCK_T
    n0 = tl.program_id(2) * BLOCK_N
    m = tl.load(req_lora_ptr + b)
    q_len = tl.load(q_lens_ptr + b)
    rank = tl.load(meta_ptr + (m * meta_stride + proj) * 3, mask=m >= 0, other=0)
    if m < 0 or t0 >= q_len or rank == 0:
        return
    b_start = tl.load(meta_ptr + (m * meta_stride + proj) * 3 + 2)
    rows = t0 + tl.arange(0, BLOCK_T)
    row_ok = rows < q_len
    out_rows = tl.load(q_starts_ptr + b) + rows
    cols = tl.arange(0, BLOCK_N)
    col_ok = n0 + cols < out_features
    slots_per_row = tl.cdiv(out_features, W)  # a row's last slot is padded past out_features
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        ranks = r0 + tl.arange(0, BLOCK_R)
        rank_ok = ranks < rank
        y_off = (out_rows[:, None] * NPROJ + y_index) * max_rank + ranks[None, :]
        y = tl.load(y_ptr + y_off, mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
        slot_idx = b_start + ranks * slots_per_row + n0 // W
        slot = tl.load(slots_ptr + m * stride_slots + slot_idx, mask=rank_ok, other=0)
        bt = tl.load(
            pool_ptr + slot.to(tl.int64)[:, None] * W + (n0 % W) + cols[None, :],
            mask=rank_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        if IEEE:
            acc += tl.dot(y.to(bt.dtype), bt, input_precision="ieee")
        else:
            acc += tl.dot(y.to(bt.dtype), bt)
    out_ptrs = out_ptr + out_rows[:, None] * stride_out + n0 + cols[None, :]
    out_ok = row_ok[:, None] & col_ok[None, :]
    current = tl.load(out_ptrs, mask=out_ok)
    tl.store(out_ptrs, (current.to(tl.float32) + acc).to(current.dtype), mask=out_ok)


_PROJ_IDS: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def _proj_ids(projs: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The projection list as a device tensor, made once: a host-to-device copy inside a
    kernel call would break CUDA-graph capture."""
    key = (projs, device)
    if key not in _PROJ_IDS:
        _PROJ_IDS[key] = torch.tensor(projs, dtype=torch.int32, device=device)
    return _PROJ_IDS[key]


def lora_shrink(
    x: torch.Tensor,
    pool: torch.Tensor,
    lora_slots: torch.Tensor,
    lora_meta: torch.Tensor,
    req_lora: torch.Tensor,
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    projs: tuple[int, ...],
    max_rank: int,
    max_q_len: int,
    launch: LoraLaunch = DEFAULT_LAUNCH,
    tiles: torch.Tensor | None = None,
) -> torch.Tensor:
    """y [T, len(projs), max_rank] (float32) with y[t, i, :r] = x[t] @ A_pᵢᵀ; see lora_ref.

    x [T, in] with unit column stride (in: any width, e.g. 4096 for q/k/v/gate/up, 11008 or
    14336 for down); pool [num_slots, W] (one layer); lora_slots [M, S], lora_meta
    [M, P, 3] (P projections: the meta stride), req_lora/q_starts/q_lens [B]: int32 on x's
    device. projs index lora_meta's second dimension; max_rank bounds every rank of the
    batch; max_q_len bounds q_lens (grid size only: nothing is read back). Entries outside
    each request's rank for a projection and rows without an adapter are left unwritten.
    `tiles` (see `lora_tiles`): the programs to run, instead of max_q_len's grid of every
    request; a batch whose requests have a few rows and one has many then launches only
    programs with work, not one per request for each of the longest request's tiles."""
    width, in_features = pool.shape[1], x.shape[1]
    block_k = _block(width, launch.block_k_cap)
    # A program walks its slice of in_features; splitting the walk across programs keeps a
    # decode batch (few rows, long rows of A) from waiting on one long serial loop.
    k_splits = max(1, min(launch.max_k_splits, triton.cdiv(in_features, block_k) // 4))
    k_per_split = triton.cdiv(triton.cdiv(in_features, k_splits), block_k) * block_k
    parts = torch.empty(
        k_splits, x.shape[0], len(projs), max_rank, dtype=torch.float32, device=x.device
    )
    n_rblocks = triton.cdiv(max_rank, launch.block_r)
    if tiles is None:
        grid = (req_lora.shape[0], triton.cdiv(max_q_len, BLOCK_T) * k_splits)
    else:
        grid = (tiles.shape[0], k_splits)
    if grid[0] == 0:
        return parts[0]
    _shrink_kernel[(*grid, len(projs) * n_rblocks)](
        x,
        parts,
        pool,
        lora_slots,
        lora_meta,
        req_lora,
        q_starts,
        q_lens,
        _proj_ids(projs, x.device),
        req_lora if tiles is None else tiles,
        in_features,
        x.stride(0),
        lora_slots.stride(0),
        lora_meta.shape[1],
        max_rank,
        n_rblocks,
        k_per_split,
        parts[0].numel(),
        W=width,
        BLOCK_T=BLOCK_T,
        BLOCK_R=launch.block_r,
        BLOCK_K=block_k,
        NPROJ=len(projs),
        K_SPLITS=k_splits,
        TILED=tiles is not None,
        IEEE=x.dtype == torch.float32,
        num_warps=launch.num_warps,
    )
    # Summing the partial products in a fixed order keeps the result deterministic.
    return parts[0] if k_splits == 1 else parts.sum(0)


def lora_expand(
    y: torch.Tensor,
    y_index: int,
    out: torch.Tensor,
    pool: torch.Tensor,
    lora_slots: torch.Tensor,
    lora_meta: torch.Tensor,
    req_lora: torch.Tensor,
    q_starts: torch.Tensor,
    q_lens: torch.Tensor,
    proj: int,
    max_q_len: int,
    launch: LoraLaunch = DEFAULT_LAUNCH,
    tiles: torch.Tensor | None = None,
) -> torch.Tensor:
    """out [T, out_features] += y[:, y_index, :r] @ Bᵀ_proj in place; see lora_ref.

    y [T, n, max_rank] float32 from `lora_shrink`; out [T, out_features] with unit column
    stride and any row stride (out_features: any width, e.g. 11008 or 14336 for gate/up; out
    may be a column slice of a fused output, e.g. k of the model's q|k|v); the tables as in
    `lora_shrink` (`tiles` too). Rows without an adapter, or whose adapter leaves `proj`
    alone, keep their values bit for bit."""
    width = pool.shape[1]
    block_n = _block(width, launch.block_n_cap)
    n_blocks = triton.cdiv(out.shape[1], block_n)
    if tiles is None:
        grid = (req_lora.shape[0], triton.cdiv(max_q_len, BLOCK_T), n_blocks)
    else:
        grid = (tiles.shape[0], 1, n_blocks)
    if grid[0] == 0:
        return out
    _expand_kernel[grid](
        y,
        out,
        pool,
        lora_slots,
        lora_meta,
        req_lora,
        q_starts,
        q_lens,
        req_lora if tiles is None else tiles,
        proj,
        y_index,
        out.shape[1],
        out.stride(0),
        lora_slots.stride(0),
        lora_meta.shape[1],
        y.shape[2],
        W=width,
        NPROJ=y.shape[1],
        BLOCK_T=BLOCK_T,
        BLOCK_R=launch.block_r,
        BLOCK_N=block_n,
        TILED=tiles is not None,
        IEEE=out.dtype == torch.float32,
        num_warps=launch.num_warps,
    )
    return out


def lora_tiles(has_adapter: list[bool], q_lens: list[int], device: torch.device) -> torch.Tensor:
    """int32 [n, 2]: (request, first row) of each BLOCK_T-row tile of the requests that have
    an adapter, for the kernels' `tiles`. Built per batch on the host: one small copy to the
    device, so not for a batch a CUDA graph replays."""
    tiles = [
        (b, t0)
        for b, (used, n) in enumerate(zip(has_adapter, q_lens, strict=True))
        if used
        for t0 in range(0, n, BLOCK_T)
    ]
    return torch.tensor(tiles, dtype=torch.int32, device=device).view(-1, 2)
