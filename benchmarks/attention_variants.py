"""Candidate shapes of the MHA decode attention kernel, timed beside the production one at a
serving trace's shapes (device only).

The production kernel (`kernels.paged_attention`) runs one program per (request, kv head,
split) and gathers 256-byte rows of one head per token. The candidate here runs one program
per (request, group of HEADS heads, split): each token's K and V rows are read HEADS * 256
contiguous bytes at a time, the slot ids are read once per group, and the key loop may be
software-pipelined (STAGES). Every variant is checked against the torch reference first.

    python -m benchmarks.attention_variants [--out DIR]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path
from typing import Any

import torch
import triton
import triton.language as tl
import triton.testing

from kernels.paged_attention import _decode_kernel, _decode_reduce_kernel, paged_decode_attention
from kernels.paged_attention_ref import paged_decode_attention_ref

_LOG2E = 1.4426950408889634
HEADS_TOTAL, HEAD_DIM = 32, 128


@triton.jit
def _decode_heads_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    pool_ptr,
    k_table_ptr,
    v_table_ptr,
    req_rows_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,
    stride_qb,
    stride_qh,
    stride_pool,
    stride_kt,
    stride_vt,
    stride_ob,
    stride_oh,
    num_heads,
    NUM_SPLITS: tl.constexpr,
    HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STAGES: tl.constexpr,
):
    b = tl.program_id(0)
    hb = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b)
    row = tl.load(req_rows_ptr + b).to(tl.int64)
    offs_h = tl.arange(0, HEADS)
    offs_d = tl.arange(0, HEAD_DIM)
    heads = hb * HEADS + offs_h
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :])
    q = q.to(tl.float32) * qk_scale
    cols = heads[:, None] * HEAD_DIM + offs_d[None, :]
    chunk = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(lo + chunk, seq_len)
    k_row_ptr = k_table_ptr + row * stride_kt
    v_row_ptr = v_table_ptr + row * stride_vt
    m_i = tl.full([HEADS], float("-inf"), tl.float32)
    l_i = tl.zeros([HEADS], tl.float32)
    acc = tl.zeros([HEADS, HEAD_DIM], tl.float32)
    for start in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_mask = offs_n < hi
        k_slots = tl.load(k_row_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
        v_slots = tl.load(v_row_ptr + offs_n, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(
            pool_ptr + k_slots[:, None, None] * stride_pool + cols[None, :, :],
            mask=n_mask[:, None, None],
            other=0.0,
        )
        s = tl.sum(k.to(tl.float32) * q[None, :, :], axis=2)
        s = tl.where(n_mask[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[None, :])
        l_i = l_i * alpha + tl.sum(p, axis=0)
        v = tl.load(
            pool_ptr + v_slots[:, None, None] * stride_pool + cols[None, :, :],
            mask=n_mask[:, None, None],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v.to(tl.float32), axis=0)
        m_i = m_new
    has_keys = l_i > 0.0
    out = acc / tl.where(has_keys, l_i, 1.0)[:, None]
    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty),
        )
    else:
        part = (b * num_heads + heads) * NUM_SPLITS + split
        tl.store(part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], out)
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(part_lse_ptr + part, lse)


@triton.jit
def _reduce_kernel(  # type: ignore[no-untyped-def]
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    stride_ob,
    stride_oh,
    num_heads,
    NUM_SPLITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < NUM_SPLITS
    part = (b * num_heads + h) * NUM_SPLITS + offs_s
    lse = tl.load(part_lse_ptr + part, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)
    total = tl.sum(w, axis=0)
    parts = tl.load(
        part_out_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=s_mask[:, None], other=0.0
    )
    out = tl.sum(w[:, None] * parts, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


def heads_attention(
    q: torch.Tensor,
    pool: torch.Tensor,
    k_table: torch.Tensor,
    v_table: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    heads: int,
    block_n: int,
    stages: int,
    splits: int,
    warps: int,
) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    part_out = torch.empty(batch, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q.device)
    _decode_heads_kernel[(batch, num_heads // heads, splits)](
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
        NUM_SPLITS=splits,
        HEADS=heads,
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        STAGES=stages,
        num_warps=warps,
    )
    if splits > 1:
        _reduce_kernel[(batch, num_heads)](
            part_out,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            num_heads,
            NUM_SPLITS=splits,
            BLOCK_S=triton.next_power_of_2(splits),
            HEAD_DIM=head_dim,
            num_warps=2,
        )
    return out


def dot_attention(
    q: torch.Tensor,
    pool: torch.Tensor,
    k_table: torch.Tensor,
    v_table: torch.Tensor,
    req_rows: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: torch.Tensor,
    *,
    block_n: int,
    splits: int,
    warps: int,
    stages: int,
) -> torch.Tensor:
    """The production kernel with its tl.dot form forced for MHA: each head's one query row
    padded to 16 (tensor cores have the headroom; the reductions of the other form do not)."""
    batch, num_heads, head_dim = q.shape
    part_out = torch.empty(batch, num_heads, splits, head_dim, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(batch, num_heads, splits, dtype=torch.float32, device=q.device)
    _decode_kernel[(batch, num_heads, splits)](
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
        NUM_SPLITS=splits,
        GROUP=1,
        BLOCK_G=16,
        HEAD_DIM=head_dim,
        BLOCK_N=block_n,
        USE_DOT=True,
        DOT_PRECISION="tf32",
        num_warps=warps,
        num_stages=stages,
    )
    if splits > 1:
        _decode_reduce_kernel[(batch, num_heads)](
            part_out,
            part_lse,
            out,
            out.stride(0),
            out.stride(1),
            num_heads,
            NUM_SPLITS=splits,
            BLOCK_S=triton.next_power_of_2(splits),
            HEAD_DIM=head_dim,
            num_warps=2,
        )
    return out


def _graphed_ms(fn: Any) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return float(triton.testing.do_bench(graph.replay, warmup=10, rep=60, return_mode="median"))


def run_variant(
    args: list[torch.Tensor], scale: float, out: torch.Tensor, v: dict[str, Any]
) -> torch.Tensor:
    opts = {k: x for k, x in v.items() if k != "kind"}
    q, pool, k_table, v_table, req_rows, seq_lens = args
    tables = (q, pool, k_table, v_table, req_rows, seq_lens)
    if v.get("kind") == "dot":
        return dot_attention(*tables, scale, out, **opts)
    return heads_attention(*tables, scale, out, **opts)


def make_case(batch: int, mean_ctx: int, gen: torch.Generator) -> dict[str, Any]:
    """`batch` requests with contexts uniform in [mean/8, 15*mean/8], slots shuffled."""
    device = torch.device("cuda")
    lens = torch.randint(max(1, mean_ctx // 8), mean_ctx * 15 // 8 + 1, (batch,), generator=gen)
    max_len = int(lens.max())
    total = int(lens.sum())
    width = HEADS_TOTAL * HEAD_DIM
    pool = torch.randn(2 * total + 16, width, dtype=torch.bfloat16, device=device)
    perm = torch.randperm(2 * total + 16, device=device).to(torch.int32)
    k_table = torch.zeros(batch, max_len, dtype=torch.int32, device=device)
    v_table = torch.zeros_like(k_table)
    at = 0
    for b, n in enumerate(lens.tolist()):
        k_table[b, :n] = perm[at : at + n]
        v_table[b, :n] = perm[at + n : at + 2 * n]
        at += 2 * n
    q = torch.randn(batch, HEADS_TOTAL, HEAD_DIM, dtype=torch.bfloat16, device=device)
    return {
        "q": q,
        "pool": pool,
        "k_table": k_table,
        "v_table": v_table,
        "req_rows": torch.arange(batch, dtype=torch.int32, device=device),
        "seq_lens": lens.to(device=device, dtype=torch.int32),
        "bytes": 2 * total * width * 2,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--shapes", default="32x140,160x400,256x400")
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    scale = 1.0 / math.sqrt(HEAD_DIM)
    variants: list[dict[str, Any]] = [
        dict(heads=h, block_n=32, stages=2, splits=sp, warps=4)
        for h, sp in itertools.product((1, 2), (2, 4))
    ]
    variants += [
        dict(kind="dot", block_n=n, stages=st, splits=sp, warps=w)
        for n, st, sp, w in itertools.product((32, 64, 128), (1, 3), (1, 2, 4, 8), (4, 8))
    ]
    small = make_case(6, 200, gen)
    small_args = [small[k] for k in ("q", "pool", "k_table", "v_table", "req_rows", "seq_lens")]
    q, pool, k_table, v_table, req_rows, seq_lens = small_args
    want = paged_decode_attention_ref(q, pool, k_table, v_table, req_rows, seq_lens, scale)
    want = want.float()
    ok = []
    for v in variants:
        got = run_variant(small_args, scale, torch.empty_like(small["q"]), v).float()
        err = (got - want).abs().max().item()
        if err > 2e-2:
            print(f"variant {v} wrong: max error {err:.3g}", flush=True)
            continue
        ok.append(v)
    rows = []
    for shape in args.shapes.split(","):
        batch, ctx = (int(n) for n in shape.split("x"))
        case = make_case(batch, ctx, gen)
        cargs = [case[k] for k in ("q", "pool", "k_table", "v_table", "req_rows", "seq_lens")]
        out = torch.empty_like(case["q"])
        q, pool, k_table, v_table, req_rows, seq_lens = cargs
        base_ms = _graphed_ms(
            lambda: paged_decode_attention(
                q,
                pool,
                k_table,
                v_table,
                req_rows,
                seq_lens,
                scale,
                out=out,  # noqa: B023
            )
        )
        reference = out.clone().float()
        gbps = case["bytes"] / base_ms / 1e6
        rows.append({"shape": shape, "variant": "production", "ms": base_ms, "gb_s": gbps})
        print(f"{shape} production {base_ms * 1e3:8.1f} us {gbps:6.0f} GB/s", flush=True)
        for v in ok:
            vout = torch.empty_like(case["q"])
            ms = _graphed_ms(
                lambda v=v, vout=vout: run_variant(cargs, scale, vout, v)  # noqa: B023
            )
            err = (vout.float() - reference).abs().max().item()
            gbps = case["bytes"] / ms / 1e6
            rows.append({"shape": shape, "variant": v, "ms": ms, "gb_s": gbps, "err": err})
        timed = [r for r in rows if r["shape"] == shape and "err" in r]
        best = sorted(timed, key=lambda r: r["ms"])
        for r in best[:8]:
            print(
                f"{shape} {r['variant']} {r['ms'] * 1e3:8.1f} us {r['gb_s']:6.0f} GB/s "
                f"x{base_ms / r['ms']:.2f} err {r['err']:.2g}",
                flush=True,
            )
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "attention_variants.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
