"""Paged attention kernels against their plain-torch references.

On the CPU the Triton kernels run under TRITON_INTERPRET=1 (fp32, small shapes); on the device
the same kernels run compiled (bf16, Llama-sized shapes; marked `gpu`).

Every case uses shuffled slots, and table entries past each request's length point at pool rows
full of NaN: a kernel that reads one key too many turns its output into NaN.
"""

from __future__ import annotations

import importlib
import math
import os
from dataclasses import dataclass

import pytest
import torch
from torch import Tensor

_ON_CPU = not torch.cuda.is_available()
if _ON_CPU:
    # triton.jit picks the interpreter when the kernel module is imported, so set this first.
    os.environ["TRITON_INTERPRET"] = "1"

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import kernels.paged_attention as pa  # noqa: E402
from kernels.paged_attention_ref import (  # noqa: E402
    paged_decode_attention_ref,
    paged_prefill_attention_ref,
)

if _ON_CPU and not isinstance(pa._decode_kernel, InterpretedFunction):
    # Something imported the module earlier in this session without the interpreter.
    pa = importlib.reload(pa)

HEADS = [pytest.param(4, 4, 16, id="mha-h4-d16"), pytest.param(8, 2, 32, id="gqa-h8-kv2-d32")]


@dataclass
class PagedKV:
    pool: Tensor  # [num_slots, KVH * D]
    k_table: Tensor  # int32 [rows, max_len]
    v_table: Tensor
    req_rows: Tensor  # int32 [B]


def make_paged_kv(
    lengths: list[int],
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    gen: torch.Generator,
) -> PagedKV:
    """K/V for requests of the given total lengths, scattered over shuffled slots of a pool that
    also holds other rows' tokens. Table entries past a request's length point at NaN slots."""
    batch = len(lengths)
    rows = batch + 2
    max_len = max(max(lengths), 1) + 5
    num_slots = 2 * rows * max_len + 13
    perm = torch.randperm(num_slots, generator=gen)
    k_table = perm[: rows * max_len].view(rows, max_len).clone()
    v_table = perm[rows * max_len : 2 * rows * max_len].view(rows, max_len).clone()
    req_rows = torch.randperm(rows, generator=gen)[:batch]
    pool = torch.randn(num_slots, num_kv_heads * head_dim, generator=gen)
    poison = perm[2 * rows * max_len :]  # slots that no table references
    pool[poison] = float("nan")
    for b, length in enumerate(lengths):
        row = int(req_rows[b])
        fill = poison[torch.randint(len(poison), (max_len - length,), generator=gen)]
        k_table[row, length:] = fill
        v_table[row, length:] = fill
    return PagedKV(
        pool=pool.to(dtype=dtype, device=device),
        k_table=k_table.to(device=device, dtype=torch.int32),
        v_table=v_table.to(device=device, dtype=torch.int32),
        req_rows=req_rows.to(device=device, dtype=torch.int32),
    )


def i32(values: list[int], device: str) -> Tensor:
    return torch.tensor(values, dtype=torch.int32, device=device)


def rel_err(out: Tensor, ref: Tensor) -> float:
    return float((out.float() - ref.float()).norm() / ref.float().norm())


@dataclass
class DecodeCase:
    q: Tensor
    kv: PagedKV
    seq_lens: Tensor
    scale: float

    def run(self, out: Tensor | None = None, num_splits: int | None = None) -> Tensor:
        kv = self.kv
        return pa.paged_decode_attention(
            self.q,
            kv.pool,
            kv.k_table,
            kv.v_table,
            kv.req_rows,
            self.seq_lens,
            self.scale,
            out=out,
            num_splits=num_splits,
        )

    def ref(self, seq_lens: Tensor | None = None) -> Tensor:
        """The reference in fp32 on upcast inputs (optionally with other lengths)."""
        kv = self.kv
        lens = self.seq_lens if seq_lens is None else seq_lens
        return paged_decode_attention_ref(
            self.q.float(), kv.pool.float(), kv.k_table, kv.v_table, kv.req_rows, lens, self.scale
        )


def make_decode(
    lengths: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
    strided_q: bool = False,
) -> DecodeCase:
    gen = torch.Generator().manual_seed(seed)
    kv = make_paged_kv(lengths, num_kv_heads, head_dim, dtype, device, gen)
    batch = len(lengths)
    if strided_q:
        # q as the model hands it over: a slice of a fused qkv projection output.
        qkv = torch.randn(batch, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
        q = qkv.to(dtype=dtype, device=device)[:, : num_heads * head_dim]
        q = q.view(batch, num_heads, head_dim)
    else:
        q = torch.randn(batch, num_heads, head_dim, generator=gen).to(dtype=dtype, device=device)
    return DecodeCase(q, kv, i32(lengths, device), 1.0 / math.sqrt(head_dim))


@dataclass
class PrefillCase:
    q: Tensor
    kv: PagedKV
    q_starts: Tensor
    q_lens: Tensor
    ctx_lens: Tensor
    scale: float
    max_q_len: int

    def run(self, out: Tensor | None = None) -> Tensor:
        kv = self.kv
        return pa.paged_prefill_attention(
            self.q,
            kv.pool,
            kv.k_table,
            kv.v_table,
            kv.req_rows,
            self.q_starts,
            self.q_lens,
            self.ctx_lens,
            self.scale,
            self.max_q_len,
            out=out,
        )

    def ref(self, ctx_lens: Tensor | None = None) -> Tensor:
        kv = self.kv
        return paged_prefill_attention_ref(
            self.q.float(),
            kv.pool.float(),
            kv.k_table,
            kv.v_table,
            kv.req_rows,
            self.q_starts,
            self.q_lens,
            self.ctx_lens if ctx_lens is None else ctx_lens,
            self.scale,
        )


def make_prefill(
    q_lens: list[int],
    ctx_lens: list[int],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    device: str,
    seed: int = 0,
    gap: int = 0,
) -> PrefillCase:
    """Requests' rows are laid out in shuffled order, with `gap` rows of no request between
    consecutive requests."""
    gen = torch.Generator().manual_seed(seed)
    totals = [c + n for c, n in zip(ctx_lens, q_lens, strict=True)]
    kv = make_paged_kv(totals, num_kv_heads, head_dim, dtype, device, gen)
    q_starts = [0] * len(q_lens)
    cursor = 0
    for b in torch.randperm(len(q_lens), generator=gen).tolist():
        q_starts[b] = cursor
        cursor += q_lens[b] + gap
    q = torch.randn(cursor, num_heads, head_dim, generator=gen).to(dtype=dtype, device=device)
    return PrefillCase(
        q,
        kv,
        i32(q_starts, device),
        i32(q_lens, device),
        i32(ctx_lens, device),
        1.0 / math.sqrt(head_dim),
        max(q_lens),
    )


def request_rows(case: PrefillCase) -> Tensor:
    """Bool [T]: rows that belong to some request."""
    rows = torch.zeros(case.q.shape[0], dtype=torch.bool)
    for start, n in zip(case.q_starts.tolist(), case.q_lens.tolist(), strict=True):
        rows[start : start + n] = True
    return rows.to(case.q.device)


# ---------------------------------------------------------------------------------------------
# CPU: the kernels under the Triton interpreter, fp32, against the reference.

# 0: padding rows; 64/65: exactly one key block and one past it; 200: several blocks, so the
# running max moves between blocks.
DECODE_LENS = [1, 70, 0, 17, 64, 0, 65, 200]
CPU_ONLY = pytest.mark.skipif(not _ON_CPU, reason="interpreter checks; the device runs gpu ones")


@CPU_ONLY
def test_kernels_run_under_the_interpreter() -> None:
    assert isinstance(pa._decode_kernel, InterpretedFunction)
    assert isinstance(pa._decode_reduce_kernel, InterpretedFunction)
    assert isinstance(pa._prefill_kernel, InterpretedFunction)


@CPU_ONLY
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), HEADS)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_decode_matches_reference(
    num_heads: int, num_kv_heads: int, head_dim: int, num_splits: int | None
) -> None:
    case = make_decode(DECODE_LENS, num_heads, num_kv_heads, head_dim, torch.float32, "cpu")
    out = torch.full_like(case.q, float("nan"))
    result = case.run(out=out, num_splits=num_splits)
    assert result is out
    ref = case.ref()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    padding = case.seq_lens == 0
    assert (out[padding] == 0).all()


@CPU_ONLY
def test_decode_strided_q_and_default_output() -> None:
    case = make_decode([9, 40, 0, 66], 8, 2, 32, torch.float32, "cpu", seed=1, strided_q=True)
    assert not case.q.is_contiguous()
    out = case.run(num_splits=2)
    assert out.shape == case.q.shape and out.dtype == case.q.dtype
    torch.testing.assert_close(out, case.ref(), rtol=1e-4, atol=1e-4)


def decode_tiled_gqa(case: DecodeCase) -> Tensor:
    """A wrong answer: query head h on kv head h % KVH instead of h // (H // KVH)."""
    kv = case.kv
    batch, num_heads, head_dim = case.q.shape
    num_kv_heads = kv.pool.shape[1] // head_dim
    out = torch.zeros(batch, num_heads, head_dim)
    for b, length in enumerate(case.seq_lens.tolist()):
        row = int(kv.req_rows[b])
        k = kv.pool[kv.k_table[row, :length].long()].view(length, num_kv_heads, head_dim)
        v = kv.pool[kv.v_table[row, :length].long()].view(length, num_kv_heads, head_dim)
        k = k.repeat(1, num_heads // num_kv_heads, 1)
        v = v.repeat(1, num_heads // num_kv_heads, 1)
        probs = torch.softmax(torch.einsum("hd,lhd->hl", case.q[b], k) * case.scale, dim=-1)
        out[b] = torch.einsum("hl,lhd->hd", probs, v)
    return out


@CPU_ONLY
def test_decode_comparison_detects_wrong_answers() -> None:
    """The tolerance above is tight enough to catch an off-by-one key or a wrong GQA mapping."""
    case = make_decode([5, 33, 70], 8, 2, 32, torch.float32, "cpu", seed=2)
    out = case.run()
    one_key_short = case.ref(seq_lens=case.seq_lens - 1)
    assert (out - one_key_short).abs().amax(dim=(1, 2)).min() > 1e-3
    assert (out - decode_tiled_gqa(case)).abs().max() > 1e-2


# Request lengths: ctx 0 and > 0, one query and many, more than one query block (128 rows when
# the longest request has > 64 new tokens), a context past a whole key block (exercises the
# unmasked key loop), and a short request after a long one.
PREFILL_Q_LENS = [3, 1, 130, 7, 20, 2]
PREFILL_CTX_LENS = [0, 5, 0, 150, 64, 0]
# All requests <= 64 new tokens: 64-row query blocks.
SHORT_Q_LENS = [64, 1, 9, 33]
SHORT_CTX_LENS = [0, 200, 70, 3]
PREFILL_LENS = [
    pytest.param(PREFILL_Q_LENS, PREFILL_CTX_LENS, id="long"),
    pytest.param(SHORT_Q_LENS, SHORT_CTX_LENS, id="short"),
]


@CPU_ONLY
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), HEADS)
@pytest.mark.parametrize(("q_lens", "ctx_lens"), PREFILL_LENS)
def test_prefill_matches_reference(
    num_heads: int, num_kv_heads: int, head_dim: int, q_lens: list[int], ctx_lens: list[int]
) -> None:
    case = make_prefill(
        q_lens, ctx_lens, num_heads, num_kv_heads, head_dim, torch.float32, "cpu", gap=2
    )
    out = torch.full_like(case.q, float("nan"))
    assert case.run(out=out) is out
    rows = request_rows(case)
    assert (~rows).any()
    # Rows of no request are not the kernel's to write.
    assert out[~rows].isnan().all()
    assert torch.isfinite(out[rows]).all()
    torch.testing.assert_close(out[rows], case.ref()[rows], rtol=1e-4, atol=1e-4)


@CPU_ONLY
def test_prefill_grid_larger_than_needed() -> None:
    """max_q_len is an upper bound (a padded bucket), not necessarily the exact maximum."""
    case = make_prefill([4, 9], [3, 0], 4, 4, 16, torch.float32, "cpu", seed=3)
    case.max_q_len = 130
    torch.testing.assert_close(case.run(), case.ref(), rtol=1e-4, atol=1e-4)


def prefill_by_decode_ref(case: PrefillCase, causal: bool) -> Tensor:
    """Prefill built from the decode reference, one query row at a time: the row at position p
    attends over keys 0..p (causal) or over all of its request's keys (not causal)."""
    kv = case.kv
    out = torch.zeros_like(case.q)
    starts, lens, ctxs = case.q_starts.tolist(), case.q_lens.tolist(), case.ctx_lens.tolist()
    for b, (start, n, ctx) in enumerate(zip(starts, lens, ctxs, strict=True)):
        seen = [ctx + i + 1 for i in range(n)] if causal else [ctx + n] * n
        rows = kv.req_rows[b].repeat(n)
        out[start : start + n] = paged_decode_attention_ref(
            case.q[start : start + n],
            kv.pool,
            kv.k_table,
            kv.v_table,
            rows,
            i32(seen, "cpu"),
            case.scale,
        )
    return out


def test_references_agree() -> None:
    """The two oracles check each other: prefill row by row equals decode at that position."""
    case = make_prefill([5, 1, 30], [0, 12, 7], 8, 2, 16, torch.float32, "cpu", seed=5)
    torch.testing.assert_close(case.ref(), prefill_by_decode_ref(case, causal=True))


@CPU_ONLY
def test_prefill_comparison_detects_wrong_answers() -> None:
    """A kernel without the causal mask, or one that ignores the cached context, fails."""
    case = make_prefill([6, 12], [0, 9], 4, 4, 16, torch.float32, "cpu", seed=4)
    out = case.run()
    assert (out - prefill_by_decode_ref(case, causal=False)).abs().max() > 1e-2
    no_ctx = case.ref(ctx_lens=torch.zeros(2, dtype=torch.int32))
    assert (out - no_ctx).abs().max() > 1e-2


def test_rejects_bad_arguments() -> None:
    case = make_decode([3, 4], 4, 4, 16, torch.float32, "cpu")
    kv = case.kv
    with pytest.raises(ValueError, match="head_dim"):
        pa.paged_decode_attention(
            case.q[:, :, :12], kv.pool, kv.k_table, kv.v_table, kv.req_rows, case.seq_lens, 1.0
        )
    with pytest.raises(ValueError, match="dtype"):
        pa.paged_decode_attention(
            case.q.double(), kv.pool, kv.k_table, kv.v_table, kv.req_rows, case.seq_lens, 1.0
        )
    with pytest.raises(ValueError, match="int32"):
        pa.paged_decode_attention(
            case.q, kv.pool, kv.k_table.long(), kv.v_table, kv.req_rows, case.seq_lens, 1.0
        )
    with pytest.raises(ValueError, match="kv heads"):
        pa.paged_decode_attention(
            case.q[:, :3], kv.pool, kv.k_table, kv.v_table, kv.req_rows, case.seq_lens, 1.0
        )


# ---------------------------------------------------------------------------------------------
# GPU: the same kernels compiled, bf16 at Llama sizes (relative error against the fp32
# reference on the upcast inputs).

GPU_TOL = 1e-2
LLAMA_HEADS = [pytest.param(32, 32, 128, id="llama7b"), pytest.param(32, 8, 128, id="gqa-kv8")]


def _random_lengths(batch: int, max_len: int, seed: int, zeros: int = 0) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, max_len + 1, (batch,), generator=gen).tolist()
    lengths[0] = max_len
    for i in range(1, min(zeros, batch - 1) + 1):
        lengths[-i] = 0
    return lengths


@pytest.mark.gpu
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), LLAMA_HEADS)
@pytest.mark.parametrize(("batch", "max_len"), [(1, 2048), (8, 1024), (64, 2048)])
@pytest.mark.parametrize("num_splits", [None, 1, 4])
def test_gpu_decode_bf16(
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    batch: int,
    max_len: int,
    num_splits: int | None,
) -> None:
    lengths = _random_lengths(batch, max_len, seed=batch, zeros=2 if batch > 4 else 0)
    case = make_decode(lengths, num_heads, num_kv_heads, head_dim, torch.bfloat16, "cuda")
    out = case.run(num_splits=num_splits)
    assert out.dtype == torch.bfloat16
    ref = case.ref()
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) < GPU_TOL
    assert (out[case.seq_lens == 0] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [*HEADS, (8, 8, 64)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_gpu_decode_fp32_and_fp16(
    num_heads: int, num_kv_heads: int, head_dim: int, num_splits: int
) -> None:
    case = make_decode(DECODE_LENS, num_heads, num_kv_heads, head_dim, torch.float32, "cuda")
    # fp32 goes through tl.dot with input_precision="ieee": as exact as the reference.
    torch.testing.assert_close(case.run(num_splits=num_splits), case.ref(), rtol=1e-4, atol=1e-4)
    half = make_decode(DECODE_LENS, num_heads, num_kv_heads, head_dim, torch.float16, "cuda")
    assert rel_err(half.run(num_splits=num_splits), half.ref()) < 5e-3


def test_decode_split_heuristic(monkeypatch: pytest.MonkeyPatch) -> None:
    """The split-K choices measured best (H100 and H200, both 132 SMs): splits only while
    there are fewer than ~2 (request, kv head) programs per SM, MHA and GQA alike."""
    monkeypatch.setattr(pa, "_num_sms", lambda device: 132)
    device = torch.device("cpu")
    assert pa.decode_num_splits(1, 32, 2048, device) == 16
    assert pa.decode_num_splits(1, 8, 2048, device) == 16
    assert pa.decode_num_splits(4, 32, 2048, device) == 5
    assert pa.decode_num_splits(32, 32, 2048, device) == 1
    # GQA at batch 64: the (request, kv head) programs alone fill an H100.
    assert pa.decode_num_splits(64, 8, 2048, device) == 1
    assert pa.decode_num_splits(1, 32, 20, device) == 1


@pytest.mark.gpu
def test_gpu_decode_cuda_graph_replay() -> None:
    """A captured decode launch replays correctly for new lengths and padding rows."""
    case = make_decode([700, 5, 1500, 64], 32, 8, 128, torch.bfloat16, "cuda")
    out = torch.empty_like(case.q)
    case.run(out=out)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        case.run(out=out)
    case.seq_lens.copy_(i32([1, 0, 1499, 63], "cuda"))
    case.q.normal_()
    graph.replay()
    torch.cuda.synchronize()
    assert rel_err(out, case.ref()) < GPU_TOL
    assert (out[1] == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), LLAMA_HEADS)
@pytest.mark.parametrize(
    ("q_lens", "ctx_lens"),
    [
        pytest.param([512, 300, 1, 77], [0, 0, 0, 0], id="fresh"),
        pytest.param([128, 1, 1000, 33], [1920, 2047, 1048, 0], id="with-context"),
    ],
)
def test_gpu_prefill_bf16(
    num_heads: int, num_kv_heads: int, head_dim: int, q_lens: list[int], ctx_lens: list[int]
) -> None:
    case = make_prefill(
        q_lens, ctx_lens, num_heads, num_kv_heads, head_dim, torch.bfloat16, "cuda", gap=1
    )
    out = case.run()
    rows = request_rows(case)
    assert torch.isfinite(out[rows]).all()
    assert rel_err(out[rows], case.ref()[rows]) < GPU_TOL


@pytest.mark.gpu
@pytest.mark.parametrize(("num_heads", "num_kv_heads", "head_dim"), [*HEADS, (8, 8, 64)])
@pytest.mark.parametrize(("q_lens", "ctx_lens"), PREFILL_LENS)
def test_gpu_prefill_fp32_and_fp16(
    num_heads: int, num_kv_heads: int, head_dim: int, q_lens: list[int], ctx_lens: list[int]
) -> None:
    case = make_prefill(q_lens, ctx_lens, num_heads, num_kv_heads, head_dim, torch.float32, "cuda")
    # fp32 goes through tl.dot with input_precision="ieee": as exact as the reference.
    torch.testing.assert_close(case.run(), case.ref(), rtol=1e-4, atol=1e-4)
    half = make_prefill(q_lens, ctx_lens, num_heads, num_kv_heads, head_dim, torch.float16, "cuda")
    assert rel_err(half.run(), half.ref()) < 5e-3
