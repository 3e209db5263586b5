"""What the LoRA kernels of `lora.py` (tiled: a tile of a request's rows a program) and
`lora_rows.py` (one row a request, for decode batches) share: how they tile their work, and
the helpers that keep a tile inside one slot of the pool."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.host_math import ceil_div

MAX_PARTS = 3  # projections of one fused output (q, k, v)


EXPAND_ACCUMULATORS = ("tile", "chunk", "rank")


@dataclass(frozen=True)
class LoraLaunch:
    """How the kernels tile their work; the result does not depend on it (beyond the order of
    float32 sums). Benchmarks time variants side by side (benchmarks/lora_tune.py)."""

    block_r: int = 16  # rank columns per program (shrink) or per loop step (expand)
    block_k_cap: int = 128  # shrink: in_features per load, at most
    max_k_splits: int = 8  # shrink: programs sharing one row of A, at most (when W allows)
    shrink_stages: int = 3  # shrink: loads of its loop in flight (Triton's pipelining)
    block_n_cap: int = 128  # expand: out_features per program, at most
    num_warps: int = 4
    # A decode batch (one row a request, no tile list) through lora_rows.py's kernels.
    row_kernels: bool = True
    row_block_k: int = 256  # row shrink: in_features per load, at most
    row_rank_programs: int = 2  # row shrink: programs sharing a request's rank chunks
    row_shrink_block_r: int = 16  # row shrink: ranks per chunk (rows of A held at once)
    # row expand: its float32 accumulator (EXPAND_ACCUMULATORS). "rank": [row_block_n], one
    # rank's row of Bᵀ at a time, so nothing is summed across threads; "tile":
    # [row_expand_block_r, row_block_n], summed over ranks at the end; "chunk": [row_block_n],
    # each rank chunk's products summed at once.
    row_expand_accumulator: str = "rank"
    row_expand_block_r: int = 8  # row expand: ranks per loop step (rows of Bᵀ in flight)
    row_block_n: int = 1024  # row expand: out_features per program, at most
    row_expand_stages: int = 1  # row expand: rank chunks of its loop in flight
    # row expand: halve row_block_n (down to 128) while the launch has fewer programs than
    # this, so that a small batch's narrow projections still spread over the SMs; 0: never.
    row_expand_min_programs: int = 264  # 2 an SM of an H200 (132 SMs)
    # Batches of fewer requests expand with `row_expand_launch`'s shape instead (0: none).
    # Measured on an H200 at Llama-7B shapes, rank-by-rank over 1024 columns is 1.2x faster
    # at 128 requests with ranks 8-64 and 1.4-2x with rank 8, but 0.9x at 32 with ranks 8-64,
    # where a rank-64 request's long walk of rank chunks is the launch's tail (BENCHMARKS.md,
    # twelfth session).
    row_small_batch: int = 48
    # Row kernels: the request as the grid's slowest axis, so that the GPU starts a request's
    # programs together; with a batch ordered by descending rank, the longest programs start
    # first and the short ones fill the end of the launch (list scheduling). Default off
    # until measured.
    row_request_major: bool = False

    def __post_init__(self) -> None:
        if self.row_expand_accumulator not in EXPAND_ACCUMULATORS:
            raise ValueError(
                f"row_expand_accumulator {self.row_expand_accumulator!r}: one of "
                f"{', '.join(EXPAND_ACCUMULATORS)}"
            )


DEFAULT_LAUNCH = LoraLaunch()


def row_expand_launch(launch: LoraLaunch, batch: int) -> LoraLaunch:
    """The launch a row expand of `batch` requests runs with: below `row_small_batch`, 16
    ranks x 512 columns a step into a tile accumulator."""
    if batch >= launch.row_small_batch:
        return launch
    return _small_batch_expand(launch)


@functools.cache
def _small_batch_expand(launch: LoraLaunch) -> LoraLaunch:
    return dataclasses.replace(
        launch,
        row_expand_accumulator="tile",
        row_expand_block_r=16,
        row_block_n=512,
        row_expand_min_programs=0,
    )


def block_in_slot(width: int, cap: int) -> int:
    """Largest power of two <= cap dividing the slot width (a tile never straddles slots)."""
    block = 16
    while block * 2 <= cap and width % (block * 2) == 0:
        block *= 2
    if width % block:
        raise ValueError(f"slot width {width} is not a multiple of 16")
    return block


def split_width(width: int, in_features: int, block_k: int, max_splits: int) -> int:
    """in_features per shrink program: a multiple of block_k dividing the slot width (so a
    split lies in one slot), the smallest that keeps the splits within max_splits."""
    split = block_k
    while ceil_div(in_features, split) > max_splits and width % (split * 2) == 0:
        split *= 2
    return split


class ShrinkSplits(NamedTuple):
    """How a shrink splits in_features over its programs, and the buffer they write."""

    block_k: int  # in_features per load
    split_k: int  # in_features per program
    parts: torch.Tensor  # [k_splits, T, nproj, rank stride] float32: each split's products


def shrink_splits(
    x: torch.Tensor, slot_width: int, block_k_cap: int, max_splits: int, nproj: int, max_rank: int
) -> ShrinkSplits:
    """The split of x's in_features and the partial-product buffer of a shrink over x [T, in].
    Its rank stride is max_rank rounded up to 16 whatever the batch's ranks, so that one
    compiled kernel serves every batch."""
    block_k = block_in_slot(slot_width, block_k_cap)
    split_k = split_width(slot_width, x.shape[1], block_k, max_splits)
    rank_stride = ceil_div(max_rank, 16) * 16
    parts = torch.empty(
        ceil_div(x.shape[1], split_k),
        x.shape[0],
        nproj,
        rank_stride,
        dtype=torch.float32,
        device=x.device,
    )
    return ShrinkSplits(block_k, split_k, parts)


_PROJ_IDS: dict[tuple[tuple[int, ...], torch.device], torch.Tensor] = {}


def proj_ids(projs: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The projection list as a device tensor, made once: a host-to-device copy inside a
    kernel call would break CUDA-graph capture."""
    key = (projs, device)
    if key not in _PROJ_IDS:
        _PROJ_IDS[key] = torch.tensor(projs, dtype=torch.int32, device=device)
    return _PROJ_IDS[key]


def check_group(out: torch.Tensor, projs: tuple[int, ...], widths: tuple[int, ...]) -> None:
    """One to MAX_PARTS projections whose widths cover out's columns."""
    if not 1 <= len(projs) <= MAX_PARTS or len(widths) != len(projs):
        raise ValueError(f"1 to {MAX_PARTS} projections, one width each: {projs}, {widths}")
    if sum(widths) != out.shape[1]:
        raise ValueError(f"widths {widths} do not cover out's {out.shape[1]} columns")


def column_blocks(widths: tuple[int, ...], block_n: int) -> tuple[tuple[int, ...], list[int]]:
    """Each projection's width padded to MAX_PARTS entries, and its count of block_n columns."""
    padded = (*widths, 0, 0)[:MAX_PARTS]
    return padded, [ceil_div(w, block_n) for w in padded]


@triton.jit
def column_block(j, width0, width1, width2, blocks0, blocks1, BLOCK_N: tl.constexpr):
    """(local projection, its first column in the fused output, its width, this block's first
    column within it) of an expand program's column block j: blocks run projection after
    projection."""
    p_local = tl.where(j >= blocks0 + blocks1, 2, tl.where(j >= blocks0, 1, 0))
    first = tl.where(p_local == 2, blocks0 + blocks1, tl.where(p_local == 1, blocks0, 0))
    col0 = tl.where(p_local == 2, width0 + width1, tl.where(p_local == 1, width0, 0))
    width = tl.where(p_local == 2, width2, tl.where(p_local == 1, width1, width0))
    return p_local, col0, width, (j - first) * BLOCK_N


@triton.jit
def slot_row(pool_ptr, slot, offset, W: tl.constexpr):
    """A pointer to element `offset` of pool slot `slot` ([R] pointers for [R] slots).

    Triton cannot tell that a slot number read from memory times W is a multiple of 16, and
    without that it loads the weights two bytes at a time: 8x the load instructions of
    16-byte vectors (seen in the PTX). It is one: W is a multiple of 16 and every offset a
    multiple of a block that divides W (`block_in_slot`)."""
    return pool_ptr + tl.multiple_of(slot.to(tl.int64) * W + offset, 16)


@triton.jit
def slot_rows(pool_ptr, slot, offset, W: tl.constexpr):
    """[R, 1] pointers to element `offset` of each pool slot of `slot` [R] (`slot_row`)."""
    return slot_row(pool_ptr, slot, offset, W)[:, None]
