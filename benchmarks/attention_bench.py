"""Decode attention over the paged KV cache: time and achieved memory bandwidth.

Llama-7B shapes (H = KVH = 32, D = 128, bf16), every request at the same context length, slots
shuffled over the pool as the allocator leaves them. Bandwidth counts the bytes the kernel must
move: the K and V rows it reads, q, and the output (the int32 table entries are left out).
Timed as a CUDA-graph replay (the way the engine runs decode steps) and eagerly; also with the
split-K path turned off, to show what splitting buys.

    python -m benchmarks.attention_bench
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import torch

BATCHES = (1, 8, 32, 64, 128)
CONTEXTS = (512, 1024, 2048)
NUM_HEADS = 32
NUM_KV_HEADS = 32
HEAD_DIM = 128


def _median_ms(fn: Callable[[], object]) -> float:
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def _graphed(fn: Callable[[], object]) -> Callable[[], None]:
    """fn captured in a CUDA graph, as the engine replays decode steps: timings without the
    Python launch overhead, which at small batches is longer than the kernels themselves."""
    fn()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def run(
    device: str | torch.device = "cuda",
    batches: tuple[int, ...] = BATCHES,
    contexts: tuple[int, ...] = CONTEXTS,
    num_heads: int = NUM_HEADS,
    num_kv_heads: int = NUM_KV_HEADS,
    head_dim: int = HEAD_DIM,
    dtype: torch.dtype = torch.bfloat16,
) -> list[dict[str, Any]]:
    """One row per (batch, context): times in microseconds (median of do_bench) of a CUDA-graph
    replay (time_us, and time_us_no_split with split-K off) and of an eager call
    (eager_time_us, Python launch overhead included), with the achieved GB/s."""
    import triton.testing

    from kernels.paged_attention import decode_num_splits, paged_decode_attention

    device = torch.device(device)
    width = num_kv_heads * head_dim
    elem = torch.tensor([], dtype=dtype).element_size()
    # One pool for the largest case; smaller cases use a random subset of its slots.
    max_tokens = max(batches) * max(contexts)
    gen = torch.Generator(device=device).manual_seed(0)
    pool = torch.randn(2 * max_tokens, width, dtype=dtype, device=device, generator=gen)
    scale = 1.0 / math.sqrt(head_dim)
    rows: list[dict[str, Any]] = []
    for batch in batches:
        for ctx in contexts:
            slots = torch.randperm(2 * max_tokens, device=device, generator=gen)
            slots = slots[: 2 * batch * ctx].to(torch.int32)
            k_table = slots[: batch * ctx].view(batch, ctx)
            v_table = slots[batch * ctx :].view(batch, ctx)
            req_rows = torch.arange(batch, dtype=torch.int32, device=device)
            seq_lens = torch.full((batch,), ctx, dtype=torch.int32, device=device)
            q = torch.randn(batch, num_heads, head_dim, dtype=dtype, device=device, generator=gen)
            out = torch.empty_like(q)
            splits = decode_num_splits(batch, num_kv_heads, ctx, device)

            args = (q, pool, k_table, v_table, req_rows, seq_lens, scale)
            auto = functools.partial(paged_decode_attention, *args, out=out)
            one = functools.partial(paged_decode_attention, *args, out=out, num_splits=1)
            if not rows:
                # Let the clocks ramp up before the first timed case.
                triton.testing.do_bench(auto, warmup=200, rep=200)
            eager_ms = _median_ms(auto)
            ms = _median_ms(_graphed(auto))
            ms_one = ms if splits == 1 else _median_ms(_graphed(one))
            moved = (2 * batch * ctx * width + 2 * q.numel()) * elem
            rows.append(
                {
                    "batch": batch,
                    "context": ctx,
                    "num_splits": splits,
                    "time_us": ms * 1e3,
                    "gb_per_s": moved / (ms * 1e-3) / 1e9,
                    "eager_time_us": eager_ms * 1e3,
                    "time_us_no_split": ms_one * 1e3,
                    "gb_per_s_no_split": moved / (ms_one * 1e-3) / 1e9,
                }
            )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"{'batch':>5} {'ctx':>5} {'splits':>6} {'graph us':>9} {'GB/s':>6} {'eager us':>9}"
        f" {'no-split us':>11} {'GB/s':>6}"
    ]
    for r in rows:
        lines.append(
            f"{r['batch']:>5} {r['context']:>5} {r['num_splits']:>6} {r['time_us']:>9.1f}"
            f" {r['gb_per_s']:>6.0f} {r['eager_time_us']:>9.1f} {r['time_us_no_split']:>11.1f}"
            f" {r['gb_per_s_no_split']:>6.0f}"
        )
    return "\n".join(lines)


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("attention_bench needs a CUDA device")
    print(
        f"paged_decode_attention, H={NUM_HEADS} KVH={NUM_KV_HEADS} D={HEAD_DIM} bf16 on "
        f"{torch.cuda.get_device_name()}"
    )
    print(format_table(run("cuda")))


if __name__ == "__main__":
    main()
