"""Launch configurations of the LoRA kernels side by side, on one decoder layer's all-linear
LoRA at Llama-7B shapes (q, k, v, o: 4096 -> 4096; gate, up: 4096 -> 11008; down: 11008 ->
4096; slot width 4096), every request decoding one token on its own adapter, ranks cycling
8/16/32/64 over all seven projections.

One "op" is what `model.py` launches per layer: shrink q/k/v + three expands, shrink o +
expand, shrink gate/up + two expands, shrink down + expand. Each variant is checked against
the torch reference (`kernels/lora_ref.py`) on the same inputs, then timed inside a CUDA
graph (median). Bandwidth counts the bytes the op must move: every request's A and Bᵀ of the
seven projections, its inputs read and outputs read and written.

    python -m benchmarks.lora_tune [--batches 32,128] [--breakdown] [--out DIR]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from kernels.lora import DEFAULT_LAUNCH, LoraLaunch, lora_expand, lora_shrink
from kernels.lora_ref import lora_expand_ref, lora_shrink_ref
from services.common.base_model import DUMMY_PRESETS, LINEAR_MODULES, BaseModelShape
from services.common.lora_format import CanonicalAdapter
from services.gpu_worker.memory.adapter_manager import AdapterManager
from services.gpu_worker.memory.adapter_tables import DOWN, GATE_UP, O_PROJ, QKV
from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool

RANKS = (8, 16, 32, 64)
VARIANTS: dict[str, LoraLaunch] = {
    "default": DEFAULT_LAUNCH,
    "r32": LoraLaunch(block_r=32),
    "r64": LoraLaunch(block_r=64),
    "n256": LoraLaunch(block_n_cap=256),
    "n512": LoraLaunch(block_n_cap=512),
    "k256": LoraLaunch(block_k_cap=256),
    "split4": LoraLaunch(max_k_splits=4),
    "split16": LoraLaunch(max_k_splits=16),
    "w2": LoraLaunch(num_warps=2),
    "w8": LoraLaunch(num_warps=8),
    "r32_n256": LoraLaunch(block_r=32, block_n_cap=256),
    "r32_n512_k256": LoraLaunch(block_r=32, block_n_cap=512, block_k_cap=256),
}
# (shrink projections, [(expand projection, index in the shrink's output, input/output)])
GROUPS = (
    (QKV, "hidden", "hidden"),
    (O_PROJ, "hidden", "hidden"),
    (GATE_UP, "hidden", "inter"),
    (DOWN, "inter", "hidden"),
)


def _setup(batch: int, device: torch.device, dtype: torch.dtype = torch.bfloat16) -> dict[str, Any]:
    """One layer's pool holding one all-linear adapter per request, and the batch tables."""
    config = {**DUMMY_PRESETS["llama-7b"], "num_hidden_layers": 1}
    shape = BaseModelShape.from_hf_config(config)
    hidden, inter = shape.hidden_size, shape.intermediate_size
    ranks = [RANKS[i % len(RANKS)] for i in range(batch)]
    per_rank_slots = 4 * 2 + 3 * (1 + 3)  # q,k,v,o: A and Bᵀ one slot a row; MLP: 1 + 3
    pool = UnifiedMemoryPool(1, sum(ranks) * per_rank_slots + 64, hidden, dtype, device)
    manager = AdapterManager(pool, batch + 1, max(ranks) * per_rank_slots)
    gen = torch.Generator(device).manual_seed(0)
    rows = []
    for i, rank in enumerate(ranks):
        adapter = CanonicalAdapter(f"a{i}", rank, 1.0, 1.0, "")
        for proj in LINEAR_MODULES:
            in_f, out_f = shape.proj_dims(proj)
            a = torch.randn(1, rank, in_f, generator=gen, device=device) / 32
            b = torch.randn(1, out_f, rank, generator=gen, device=device) / 32
            adapter.lora_a[proj], adapter.lora_b[proj] = a.to(dtype), b.to(dtype)
        rows.append(manager.acquire(adapter).row)

    def ints(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return {
        "pool": pool.buffer[0],
        "slots": manager.tables.slots,
        "meta": manager.tables.meta,
        "req_lora": ints(rows),
        "q_starts": ints(list(range(batch))),
        "q_lens": ints([1] * batch),
        "dims": {"hidden": hidden, "inter": inter},
        "ranks": ranks,
        "shape": shape,
    }


def _op(t: dict[str, Any], launch: LoraLaunch, ref: bool) -> tuple[Callable[[], None], list]:
    """The layer's LoRA launches over fixed inputs and outputs (returned for checking)."""
    batch, device = t["req_lora"].shape[0], t["pool"].device
    gen = torch.Generator(device).manual_seed(1)
    tables = (t["pool"], t["slots"], t["meta"], t["req_lora"], t["q_starts"], t["q_lens"])
    inputs, outputs = [], []
    for projs, src, dst in GROUPS:
        dtype = t["pool"].dtype
        x = torch.randn(batch, t["dims"][src], generator=gen, device=device).to(dtype)
        outs = [
            torch.randn(batch, t["dims"][dst], generator=gen, device=device).to(dtype)
            for _ in projs
        ]
        inputs.append(x)
        outputs.append(outs)
    max_rank = max(t["ranks"])

    def run() -> None:
        for (projs, _, _), x, outs in zip(GROUPS, inputs, outputs, strict=True):
            if ref:
                y = lora_shrink_ref(x, *tables, projs, max_rank)
            else:
                y = lora_shrink(x, *tables, projs, max_rank, 1, launch)
            for i, (proj, out) in enumerate(zip(projs, outs, strict=True)):
                if ref:
                    lora_expand_ref(y, i, out, *tables, proj)
                else:
                    lora_expand(y, i, out, *tables, proj, 1, launch)

    return run, outputs


def _bytes(t: dict[str, Any]) -> int:
    shape: BaseModelShape = t["shape"]
    per_rank = sum(sum(shape.proj_dims(p)) for p in LINEAR_MODULES)
    weights = sum(r * per_rank * 2 for r in t["ranks"])
    batch, hidden, inter = len(t["ranks"]), t["dims"]["hidden"], t["dims"]["inter"]
    io = batch * 2 * (hidden + hidden + hidden + inter + 2 * (4 * hidden + 2 * inter))
    return weights + io


def run(batches: tuple[int, ...], device: torch.device) -> list[dict[str, Any]]:
    import triton.testing

    results = []
    for batch in batches:
        t = _setup(batch, device)
        ref_run, ref_out = _op(t, DEFAULT_LAUNCH, ref=True)
        _, before = _op(t, DEFAULT_LAUNCH, ref=True)  # the outputs' values before any op
        ref_run()
        moved = _bytes(t)
        for name, launch in VARIANTS.items():
            fn, outs = _op(t, launch, ref=False)
            fn()
            err = max(  # of the LoRA delta alone, against the reference's delta
                float((o.float() - r.float()).norm() / (r.float() - b.float()).norm())
                for group, ref_group, start in zip(outs, ref_out, before, strict=True)
                for o, r, b in zip(group, ref_group, start, strict=True)
            )
            ms = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
            row = {
                "batch": batch,
                "variant": name,
                "launch": dataclasses.asdict(launch),
                "us": ms * 1000,
                "gbps": moved / (ms * 1e-3) / 1e9,
                "rel_err": err,
                "bytes": moved,
            }
            results.append(row)
            print(
                f"{batch:>5} {name:>14} {row['us']:>8.1f} us {row['gbps']:>7.0f} GB/s"
                f" err {err:.1e}",
                flush=True,
            )
    return results


def breakdown(batch: int, device: torch.device) -> list[dict[str, Any]]:
    """Each launch of the default op timed alone in a CUDA graph, with the weight bytes it
    reads: which of the eleven launches (and the split-K sums) the layer's time goes to."""
    import triton.testing

    t = _setup(batch, device)
    shape: BaseModelShape = t["shape"]
    tables = (t["pool"], t["slots"], t["meta"], t["req_lora"], t["q_starts"], t["q_lens"])
    max_rank, rows = max(t["ranks"]), []
    gen = torch.Generator(device).manual_seed(2)
    names = dict(enumerate(LINEAR_MODULES))
    for projs, src, dst in GROUPS:
        x = torch.randn(batch, t["dims"][src], generator=gen, device=device).to(torch.bfloat16)
        y = lora_shrink(x, *tables, projs, max_rank, 1)
        label = "+".join(names[p] for p in projs)
        a_bytes = sum(r * shape.proj_dims(names[p])[0] * 2 for r in t["ranks"] for p in projs)
        launches: list[tuple[str, Callable[[], Any], int]] = [
            (f"shrink {label}", partial(lora_shrink, x, *tables, projs, max_rank, 1), a_bytes)
        ]
        for i, p in enumerate(projs):
            out = torch.zeros(batch, t["dims"][dst], dtype=torch.bfloat16, device=device)
            b_bytes = sum(r * shape.proj_dims(names[p])[1] * 2 for r in t["ranks"])
            expand = partial(lora_expand, y, i, out, *tables, p, 1)
            launches.append((f"expand {names[p]}", expand, b_bytes))
        for name, fn, moved in launches:
            fn()
            ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
            rows.append(
                {"batch": batch, "launch": name, "us": ms * 1000, "gbps": moved / (ms * 1e-3) / 1e9}
            )
            print(f"{batch:>5} {name:>18} {ms * 1000:>7.1f} us {rows[-1]['gbps']:>6.0f} GB/s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lora_tune", description=__doc__)
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--breakdown", action="store_true", help="time each launch alone too")
    args = parser.parse_args()
    batches = tuple(int(b) for b in args.batches.split(","))
    if args.breakdown:
        parts = [row for b in batches for row in breakdown(b, torch.device("cuda"))]
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "lora_breakdown.json").write_text(json.dumps(parts, indent=1))
    rows = run(batches, torch.device("cuda"))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "lora_tune.json").write_text(json.dumps(rows, indent=1))
    for batch in batches:
        mine = sorted((r for r in rows if r["batch"] == batch), key=lambda r: r["us"])
        base = next(r for r in mine if r["variant"] == "default")
        print(
            f"batch {batch}: "
            + ", ".join(f"{r['variant']} {base['us'] / r['us']:.2f}x" for r in mine[:5])
        )


if __name__ == "__main__":
    main()
