"""LoRA kernels at Llama-7B shapes: ours against S-LoRA's padded-`bmm` baseline and the gather
reference, every request on its own adapter, ranks mixed {8, 16, 32, 64}.

One "op" is the LoRA of q, k and v for one layer: our fused shrink plus three expands, added
in place to the base outputs. Ours and the pre-padded bmm are timed inside a CUDA graph, as
the engine's decode runs them; the two variants with host loops cannot be, and are not.
Bandwidth counts the bytes our kernels must move: each
request's A and Bᵀ for the three projections, x, and the outputs read and written.

    python -m benchmarks.lora_kernel_bench
"""

from __future__ import annotations

from typing import Any

import torch

HIDDEN = 4096
RANKS = (8, 16, 32, 64)
BATCHES = (1, 8, 32, 128)


def _tables(batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """A pool holding one adapter per request (q, k, v, o), slots shuffled, and the tables."""
    ranks = [RANKS[i % len(RANKS)] for i in range(batch)]
    sizes = [4 * 2 * r for r in ranks]  # per projection: r slots of A, r of Bᵀ (W = hidden)
    pool = torch.randn(sum(sizes) + 64, HIDDEN, dtype=dtype, device=device) / 16
    perm = torch.randperm(pool.shape[0], device=device).to(torch.int32)
    slots = torch.zeros(batch, max(sizes), dtype=torch.int32, device=device)
    meta = torch.zeros(batch, 4, 3, dtype=torch.int32)
    used = 0
    for i, (rank, size) in enumerate(zip(ranks, sizes, strict=True)):
        slots[i, :size] = perm[used : used + size]
        used += size
        for p in range(4):
            meta[i, p] = torch.tensor([rank, 2 * rank * p, 2 * rank * p + rank])
    arange = torch.arange(batch, device=device, dtype=torch.int32)
    return {
        "pool": pool,
        "slots": slots,
        "meta": meta.to(device),
        "ranks": ranks,
        "req_lora": arange,
        "q_starts": arange,
        "q_lens": torch.ones(batch, device=device, dtype=torch.int32),
    }


def _padded(t: dict[str, Any], proj: int) -> tuple[torch.Tensor, torch.Tensor]:
    """S-LoRA's bmm baseline layout: every adapter padded to the largest rank."""
    pool, rmax = t["pool"], max(t["ranks"])
    batch = len(t["ranks"])
    a_pad = torch.zeros(batch, HIDDEN, rmax, dtype=pool.dtype, device=pool.device)
    b_pad = torch.zeros(batch, rmax, HIDDEN, dtype=pool.dtype, device=pool.device)
    for i, rank in enumerate(t["ranks"]):
        a_start, b_start = int(t["meta"][i, proj, 1]), int(t["meta"][i, proj, 2])
        a_pad[i, :, :rank] = pool[t["slots"][i, a_start : a_start + rank].long()].t()
        b_pad[i, :rank] = pool[t["slots"][i, b_start : b_start + rank].long()]
    return a_pad, b_pad


def _time_case(batch: int, device: torch.device) -> dict[str, Any]:
    import triton.testing

    from kernels.lora import lora_apply

    dtype = torch.bfloat16
    t = _tables(batch, device, dtype)
    x = torch.randn(batch, HIDDEN, dtype=dtype, device=device)
    fused = torch.randn(batch, 3 * HIDDEN, dtype=dtype, device=device)
    outs = list(fused.split(HIDDEN, dim=1))  # q, k, v: views of one fused output
    args = (t["pool"], t["slots"], t["meta"], t["req_lora"], t["q_starts"], t["q_lens"])
    padded = [_padded(t, p) for p in range(3)]

    def ours() -> None:
        lora_apply(x, fused, *args, (0, 1, 2), (HIDDEN,) * 3, max(t["ranks"]), 1)

    def bmm_prepadded() -> None:
        for i, (a_pad, b_pad) in enumerate(padded):
            outs[i] += torch.bmm(torch.bmm(x[:, None], a_pad), b_pad)[:, 0]

    def bmm_gather_each_step() -> None:
        for i in range(3):
            a_pad, b_pad = _padded(t, i)
            outs[i] += torch.bmm(torch.bmm(x[:, None], a_pad), b_pad)[:, 0]

    def gather_reference() -> None:
        for i in range(3):
            for b, rank in enumerate(t["ranks"]):
                a_start, b_start = int(t["meta"][b, i, 1]), int(t["meta"][b, i, 2])
                a = t["pool"].index_select(0, t["slots"][b, a_start : a_start + rank].long())
                bt = t["pool"].index_select(0, t["slots"][b, b_start : b_start + rank].long())
                outs[i][b : b + 1] += (x[b : b + 1] @ a.t()) @ bt

    weight_bytes = sum(3 * 2 * r * HIDDEN * 2 for r in t["ranks"])
    moved = weight_bytes + batch * HIDDEN * 2 * (1 + 3 * 2)
    row: dict[str, Any] = {"batch": batch, "bytes": moved}
    variants = (
        ("ours", ours),
        ("bmm_padded", bmm_prepadded),
        ("bmm_gather", bmm_gather_each_step),
        ("gather_ref", gather_reference),
    )
    for name, fn in variants:
        if name in ("bmm_gather", "gather_ref") and batch > 32:
            row[name + "_us"] = float("nan")  # host loops: slow to time, nothing to learn
            continue
        if name in ("ours", "bmm_padded"):
            # Inside a CUDA graph, as the engine runs them: no Python launch cost in the time.
            ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
        else:  # host loops with syncs cannot be captured
            ms = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
        row[name + "_us"] = ms * 1000
    row["ours_gbps"] = moved / (row["ours_us"] * 1e-6) / 1e9
    return row


def run(
    device: str | torch.device = "cuda", batches: tuple[int, ...] = BATCHES
) -> list[dict[str, Any]]:
    """One row per batch size: microseconds per q/k/v LoRA op for each variant, our GB/s."""
    return [_time_case(batch, torch.device(device)) for batch in batches]


def main() -> None:
    rows = run()
    print(f"{'batch':>5} {'ours us':>8} {'GB/s':>7} {'bmm pad':>8} {'bmm gather':>10} {'ref':>8}")
    for r in rows:
        print(
            f"{r['batch']:>5} {r['ours_us']:>8.1f} {r['ours_gbps']:>7.0f}"
            f" {r['bmm_padded_us']:>8.1f} {r['bmm_gather_us']:>10.1f}"
            f" {r['gather_ref_us']:>8.1f}"
        )


if __name__ == "__main__":
    main()
