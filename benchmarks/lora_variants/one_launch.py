"""An experiment, not yet timed on the device: a projection group's decode LoRA in ONE launch
that keeps the split-K shrink (`kernels/lora.py`: shrink, sum of its splits, expand: three
launches).

The fifth and sixth sessions found that at decode the LoRA is bound by the latency chain of
each program (request -> adapter row -> slot numbers -> weights), and that a program walking
all of in_features alone is slower than three launches (BENCHMARKS.md, sixth session). Here one
launch holds two kinds of programs, the shrink's first in program order:

- shrink program (b, split, projection, rank block): its partial product, as `lora.py`'s,
  into `parts`; then it counts itself done for request b (an acq_rel atomic). The last of b's
  shrink programs sums b's partials in split order (deterministic, batch-independent) into
  `y[b]` and raises b's ready flag (release).
- expand program (b, column block): loads its slot numbers and its tile of Bᵀ (the whole
  rank at once) and its tile of the output FIRST, since none of that depends on the shrink,
  then waits for b's ready flag (acquire), reads y[b] past L1 and adds y @ Bᵀ.

So an expand's weight loads overlap the shrink instead of following a kernel boundary, and
the sum's launch is gone. The last expand program of b to finish resets b's counters, so
the next launch (stream order) starts from zero without a memset.

Progress: an expand program waits only for shrink programs of lower program ids, which the
GPU dispatches first, and which never wait; so every waited-for program is running or done.
Under TRITON_INTERPRET=1 programs run one by one in id order, so every shrink has finished
before any expand looks. Rows have one token each (decode); q_lens 0 rows are skipped.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# The production kernels' tiling rules, shared so that the two launch the same shrink.
from benchmarks.lora_variants.decode_shrink import BLOCK_T, decode_shrink_part
from kernels.lora import MAX_PARTS, _block, _proj_ids, _split_width


@triton.jit
def _shrink_part(
    x_ptr,
    parts_ptr,
    pool_ptr,
    slot_row,
    a_start,
    rank,
    row,
    split,
    p_local,
    r0,
    in_features,
    stride_x,
    split_stride,
    max_rank,
    W: tl.constexpr,
    NPROJ: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    STAGES: tl.constexpr,
    IEEE: tl.constexpr,
):
    """parts[split, row, p_local, r0 : r0 + BLOCK_R] = x[row, split] @ A[ranks, split]ᵀ."""
    k_begin = split * SPLIT_K
    ranks = r0 + tl.arange(0, BLOCK_R)
    rank_ok = ranks < rank
    slot_idx = a_start + ranks * tl.cdiv(in_features, W) + k_begin // W
    slot = tl.load(slot_row + slot_idx, mask=rank_ok, other=0)
    part = decode_shrink_part(
        x_ptr, pool_ptr, slot, rank_ok, row, k_begin, in_features, stride_x, W, BLOCK_R,
        BLOCK_K, SPLIT_K, STAGES, IEEE,
    )  # fmt: skip
    offs = split * split_stride + (row * NPROJ + p_local) * max_rank + ranks
    tl.store(parts_ptr + offs, part, mask=rank_ok)


@triton.jit
def _sum_splits(
    parts_ptr,
    y_ptr,
    row,
    k_splits,
    split_stride,
    max_rank,
    NPROJ: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """y[row] = the sum of row's partial products over the splits, in split order."""
    cols = tl.arange(0, BLOCK)
    ok = cols < NPROJ * max_rank
    base = row * NPROJ * max_rank + cols
    total = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(0, k_splits):
        total += tl.load(
            parts_ptr + s * split_stride + base, mask=ok, other=0.0, cache_modifier=".cg"
        )
    tl.store(y_ptr + base, total, mask=ok)


@triton.jit
def _one_launch_kernel(
    x_ptr,
    out_ptr,
    parts_ptr,
    y_ptr,
    sync_ptr,
    pool_ptr,
    slots_ptr,
    meta_ptr,
    req_lora_ptr,
    q_starts_ptr,
    q_lens_ptr,
    proj_ids_ptr,
    batch,
    in_features,
    k_splits,
    n_rblocks,
    width0,
    width1,
    width2,
    blocks0,
    blocks1,
    n_blocks,
    stride_x,
    stride_out,
    stride_slots,
    meta_stride,
    max_rank,
    split_stride,
    W: tl.constexpr,
    NPROJ: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_RANK: tl.constexpr,
    BLOCK_Y: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
    IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    per_req = k_splits * NPROJ * n_rblocks  # shrink programs of one request
    shrinking = pid < batch * per_req
    item = tl.where(shrinking, pid, pid - batch * per_req)
    b = tl.where(shrinking, item // per_req, item // n_blocks)
    m = tl.load(req_lora_ptr + b)
    if m < 0 or tl.load(q_lens_ptr + b) == 0:
        return
    row = tl.load(q_starts_ptr + b)
    slot_row = slots_ptr + m * stride_slots
    count_ptr = sync_ptr + 3 * b  # shrinks done, y ready, expands done
    if shrinking:
        rest = item % per_req
        split = rest // (NPROJ * n_rblocks)
        p_local = (rest // n_rblocks) % NPROJ
        r0 = (rest % n_rblocks) * BLOCK_R
        meta = meta_ptr + (m * meta_stride + tl.load(proj_ids_ptr + p_local)) * 3
        rank = tl.load(meta)
        if r0 < rank:
            _shrink_part(
                x_ptr, parts_ptr, pool_ptr, slot_row, tl.load(meta + 1), rank, row, split,
                p_local, r0, in_features, stride_x, split_stride, max_rank, W, NPROJ, BLOCK_R,
                BLOCK_K, SPLIT_K, STAGES, IEEE,
            )  # fmt: skip
        tl.debug_barrier()  # every thread's partial stored before the count says so
        if tl.atomic_add(count_ptr, 1, sem="acq_rel") == per_req - 1:  # the last: sum, signal
            _sum_splits(parts_ptr, y_ptr, row, k_splits, split_stride, max_rank, NPROJ, BLOCK_Y)
            tl.debug_barrier()
            tl.atomic_xchg(count_ptr + 1, 1, sem="release")
    else:
        j = item % n_blocks
        p_local = tl.where(j >= blocks0 + blocks1, 2, tl.where(j >= blocks0, 1, 0))
        first = tl.where(p_local == 2, blocks0 + blocks1, tl.where(p_local == 1, blocks0, 0))
        col0 = tl.where(p_local == 2, width0 + width1, tl.where(p_local == 1, width0, 0))
        width = tl.where(p_local == 2, width2, tl.where(p_local == 1, width1, width0))
        n0 = (j - first) * BLOCK_N
        meta = meta_ptr + (m * meta_stride + tl.load(proj_ids_ptr + p_local)) * 3
        rank = tl.load(meta)
        if rank > 0:
            ranks = tl.arange(0, BLOCK_RANK)
            rank_ok = ranks < rank
            cols = tl.arange(0, BLOCK_N)
            col_ok = n0 + cols < width
            slot_idx = tl.load(meta + 2) + ranks * tl.cdiv(width, W) + n0 // W
            slot = tl.load(slot_row + slot_idx, mask=rank_ok, other=0)
            bt = tl.load(
                pool_ptr + slot.to(tl.int64)[:, None] * W + (n0 % W) + cols[None, :],
                mask=rank_ok[:, None] & col_ok[None, :],
                other=0.0,
            )
            pad = tl.arange(0, BLOCK_T)
            out_ptrs = out_ptr + row.to(tl.int64) * stride_out + col0 + n0 + pad[:, None] * 0
            out_ptrs += cols[None, :]
            out_ok = (pad[:, None] == 0) & col_ok[None, :]
            current = tl.load(out_ptrs, mask=out_ok, other=0.0)
            while tl.atomic_add(count_ptr + 1, 0, sem="acquire") == 0:
                pass
            y_offs = (row * NPROJ + p_local) * max_rank + ranks
            y = tl.load(
                y_ptr + pad[:, None] * 0 + y_offs[None, :],
                mask=(pad[:, None] == 0) & rank_ok[None, :],
                other=0.0,
                cache_modifier=".cg",
            )
            delta = tl.dot(y.to(bt.dtype), bt, input_precision="ieee" if IEEE else None)
            tl.store(out_ptrs, (current.to(tl.float32) + delta).to(current.dtype), mask=out_ok)
        tl.debug_barrier()
        if tl.atomic_add(count_ptr + 2, 1, sem="acq_rel") == n_blocks - 1:  # the last: reset
            tl.store(count_ptr, 0)
            tl.store(count_ptr + 1, 0)
            tl.store(count_ptr + 2, 0)


_SYNC: dict[torch.device, torch.Tensor] = {}


def _sync_words(rows: int, device: torch.device) -> torch.Tensor:
    """Three zeroed int32 counters a row, kept (the kernel leaves them zeroed again); made
    before a graph is captured, by a first call outside it."""
    words = _SYNC.get(device)
    if words is None or words.numel() < 3 * rows:
        words = _SYNC[device] = torch.zeros(3 * max(rows, 256), dtype=torch.int32, device=device)
    return words


def lora_apply_one_launch(
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
    max_k_splits: int = 8,
    block_n_cap: int = 128,
    shrink_stages: int = 3,
    num_warps: int = 4,
) -> torch.Tensor:
    """`kernels.lora.lora_apply` of a decode batch (one row a request; the same arguments and
    result, lora_ref.lora_apply_ref), in one launch. max_rank <= 64."""
    if not 1 <= len(projs) <= MAX_PARTS or len(widths) != len(projs) or sum(widths) != out.shape[1]:
        raise ValueError(f"1 to {MAX_PARTS} projections covering out: {projs}, {widths}")
    batch, width_w = req_lora.shape[0], pool.shape[1]
    if batch == 0 or max_rank == 0:
        return out
    if max_rank > 64:
        raise ValueError("max_rank > 64")
    block_k = _block(width_w, 128)
    split_k = _split_width(width_w, x.shape[1], block_k, max_k_splits)
    k_splits = triton.cdiv(x.shape[1], split_k)
    nproj = len(projs)
    parts = torch.empty(k_splits, x.shape[0], nproj, max_rank, dtype=torch.float32, device=x.device)
    y = torch.empty(x.shape[0], nproj, max_rank, dtype=torch.float32, device=x.device)
    block_r = min(16, max(16, triton.next_power_of_2(max_rank)))
    n_rblocks = triton.cdiv(max_rank, block_r)
    block_n = _block(width_w, block_n_cap)
    padded = (*widths, 0, 0)[:3]
    blocks = [triton.cdiv(w, block_n) for w in padded]
    n_blocks = sum(blocks)
    grid = batch * (k_splits * nproj * n_rblocks + n_blocks)
    _one_launch_kernel[(grid,)](
        x, out, parts, y, _sync_words(x.shape[0], x.device), pool, lora_slots, lora_meta,
        req_lora, q_starts, q_lens, _proj_ids(projs, x.device), batch, x.shape[1], k_splits,
        n_rblocks, *padded, blocks[0], blocks[1], n_blocks, x.stride(0), out.stride(0),
        lora_slots.stride(0), lora_meta.shape[1], max_rank, parts[0].numel(),
        W=width_w, NPROJ=nproj, BLOCK_R=block_r,
        BLOCK_RANK=max(16, triton.next_power_of_2(max_rank)),
        BLOCK_Y=triton.next_power_of_2(nproj * max_rank), BLOCK_K=block_k, SPLIT_K=split_k,
        BLOCK_N=block_n, STAGES=shrink_stages, IEEE=x.dtype == torch.float32,
        num_warps=num_warps,
    )  # fmt: skip
    return out
