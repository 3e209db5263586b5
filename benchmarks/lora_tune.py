"""Launch configurations of the LoRA kernels side by side, on one decoder layer's all-linear
LoRA at Llama-7B shapes (q, k, v, o: 4096 -> 4096; gate, up: 4096 -> 11008; down: 11008 ->
4096; slot width 4096), every request decoding one token on its own adapter, ranks cycling
8/16/32/64 over all seven projections.

One "op" is what `model.py` launches per layer: `lora_apply` into the fused q|k|v output,
into o, into the fused gate|up output, into down (a shrink and an expand launch each). Each
variant is checked against the torch reference (`kernels/lora_ref.py`) on the same inputs,
then timed inside a CUDA graph (median). Bandwidth counts the bytes the op must move: every
request's A and Bᵀ of the seven projections, its inputs read and outputs read and written.
`--baseline DIR` times, beside them, the kernels of another checkout (e.g. a `git archive` of
an older commit) through its own `kernels/lora.py`: `lora_apply`, or the older
`lora_shrink`/`lora_expand` pair with one expand per projection.

    python -m benchmarks.lora_tune [--batches 32,128] [--breakdown] [--baseline DIR] [--out DIR]
        [--ranks 8,16,32,64] [--groups all-linear|attention] [--variants a,b,...] [--max-rank N]
        [--order cycled|by-rank]

`--ranks 8 --groups attention` is S1's serving case (rank-8 q/k/v/o adapters).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from kernels.lora import DEFAULT_LAUNCH, LoraLaunch, lora_apply
from kernels.lora_launch import row_expand_launch
from kernels.lora_ref import lora_apply_ref
from services.common.base_model import DUMMY_PRESETS, LINEAR_MODULES, BaseModelShape
from services.common.lora_format import CanonicalAdapter
from services.gpu_worker.memory.adapter_manager import AdapterManager
from services.gpu_worker.memory.adapter_tables import DOWN, GATE_UP, O_PROJ, QKV
from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool

RANKS = (8, 16, 32, 64)
_ROWS_RANK = LoraLaunch(row_small_batch=0)  # rank by rank at every batch size
_TILED = LoraLaunch(row_kernels=False)  # lora.py's tiled kernels for decode batches too
VARIANTS: dict[str, LoraLaunch] = {
    "default": DEFAULT_LAUNCH,
    # The row kernels (lora_rows.py), the default for decode batches.
    "rows_k128": LoraLaunch(row_block_k=128),
    "rows_k512": LoraLaunch(row_block_k=512),
    "rows_split4": LoraLaunch(max_k_splits=4),
    "rows_split16": LoraLaunch(max_k_splits=16),
    "rows_st1": LoraLaunch(shrink_stages=1),
    "rows_w2": LoraLaunch(num_warps=2),
    "rows_w8": LoraLaunch(num_warps=8),
    "rows_rp1": LoraLaunch(row_rank_programs=1),
    "rows_rp4": LoraLaunch(row_rank_programs=4),
    "rows_sr32": LoraLaunch(row_shrink_block_r=32),
    "rows_sr8": LoraLaunch(row_shrink_block_r=8),
    # The request as the grid's slowest axis: with `--order by-rank`, longest programs first.
    "rows_request_major": LoraLaunch(row_request_major=True),
    "rows_request_major_small": LoraLaunch(row_request_major=True, row_small_batch=0),
    # The expand's shape at every batch size: rank by rank, or the small batches' tile.
    "rows_rank": _ROWS_RANK,
    "rows_tile": row_expand_launch(DEFAULT_LAUNCH, 0),
    "rows_rank_n512": dataclasses.replace(_ROWS_RANK, row_block_n=512),
    "rows_rank_n2048": dataclasses.replace(_ROWS_RANK, row_block_n=2048),
    "rows_rank_er16": dataclasses.replace(_ROWS_RANK, row_expand_block_r=16),
    "rows_rank_min0": dataclasses.replace(_ROWS_RANK, row_expand_min_programs=0),
    "rows_rank_min528": dataclasses.replace(_ROWS_RANK, row_expand_min_programs=528),
    "rows_rank_exp2": dataclasses.replace(_ROWS_RANK, row_expand_stages=2),
    "rows_chunk_er32": dataclasses.replace(
        _ROWS_RANK, row_expand_accumulator="chunk", row_expand_block_r=32
    ),
    # lora.py's tiled kernels (one 16-row tile a request), the decode default before.
    "tiled": _TILED,
    "tiled_split16": dataclasses.replace(_TILED, max_k_splits=16),
    "tiled_n256": dataclasses.replace(_TILED, block_n_cap=256),
    "tiled_r32": dataclasses.replace(_TILED, block_r=32),
}
# (projections sharing one input, input width, each projection's output width)
GROUPS = (
    (QKV, "hidden", "hidden"),
    (O_PROJ, "hidden", "hidden"),
    (GATE_UP, "hidden", "inter"),
    (DOWN, "inter", "hidden"),
)


def _setup(
    batch: int,
    device: torch.device,
    rank_cycle: tuple[int, ...] = RANKS,
    groups: tuple[tuple[tuple[int, ...], str, str], ...] = GROUPS,
    dtype: torch.dtype = torch.bfloat16,
    max_rank: int = 0,
    by_rank: bool = False,
) -> dict[str, Any]:
    """One layer's pool holding one all-linear adapter per request (ranks cycling through
    `rank_cycle`, or those ranks in descending order when `by_rank`), and the batch tables;
    `groups`: the projection groups to run; `max_rank`: the bound the kernels are told (0: the
    largest rank of the batch)."""
    config = {**DUMMY_PRESETS["llama-7b"], "num_hidden_layers": 1}
    shape = BaseModelShape.from_hf_config(config)
    hidden, inter = shape.hidden_size, shape.intermediate_size
    ranks = [rank_cycle[i % len(rank_cycle)] for i in range(batch)]
    if by_rank:
        ranks.sort(reverse=True)
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
        "max_rank": max(max_rank, *ranks),
        "shape": shape,
        "groups": groups,
    }


def load_baseline(root: Path) -> Any:
    """`kernels/lora.py` of another checkout with the rest of that checkout's `kernels`
    package (its `lora_rows`, `lora_launch`), imported under the usual names and then set
    aside so that this checkout's `kernels` stays the one imported everywhere else."""
    if not (root / "kernels" / "lora.py").is_file():
        raise SystemExit(f"--baseline: no kernels/lora.py under {root}")

    def ours() -> dict[str, Any]:
        return {k: m for k, m in sys.modules.items() if k == "kernels" or k.startswith("kernels.")}

    saved = ours()
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module("kernels.lora")
    finally:
        sys.path.remove(str(root))
        for name in ours():
            del sys.modules[name]
        sys.modules.update(saved)


def _apply_with(module: Any, launch: LoraLaunch | None) -> Callable[..., Any]:
    """lora_apply of `module` (this checkout's when None), or its older shrink/expand pair
    called the way that checkout's model called it."""
    if module is None:
        return partial(lora_apply, launch=launch or DEFAULT_LAUNCH)
    if hasattr(module, "lora_apply"):
        return module.lora_apply

    def shrink_expand(x, out, pool, *rest):  # type: ignore[no-untyped-def]
        tables, (projs, widths, max_rank, max_q) = rest[:5], rest[5:]
        y = module.lora_shrink(x, pool, *tables, projs, max_rank, max_q)
        for i, (part, proj) in enumerate(zip(out.split(widths, dim=1), projs, strict=True)):
            module.lora_expand(y, i, part, pool, *tables, proj, max_q)
        return out

    return shrink_expand


def _op(
    t: dict[str, Any], apply: Callable[..., Any] | None
) -> tuple[Callable[[], None], list[torch.Tensor]]:
    """The layer's LoRA over fixed inputs and fused outputs (returned for checking); `apply`
    None runs the torch reference."""
    batch, device = t["req_lora"].shape[0], t["pool"].device
    gen = torch.Generator(device).manual_seed(1)
    tables = (t["pool"], t["slots"], t["meta"], t["req_lora"], t["q_starts"], t["q_lens"])
    inputs, outputs = [], []
    for projs, src, dst in t["groups"]:
        dtype = t["pool"].dtype
        x = torch.randn(batch, t["dims"][src], generator=gen, device=device).to(dtype)
        width = len(projs) * t["dims"][dst]
        outputs.append(torch.randn(batch, width, generator=gen, device=device).to(dtype))
        inputs.append(x)
    max_rank = t["max_rank"]

    def run() -> None:
        for (projs, _, dst), x, out in zip(t["groups"], inputs, outputs, strict=True):
            widths = (t["dims"][dst],) * len(projs)
            if apply is None:
                lora_apply_ref(x, out, *tables, projs, widths)
            else:
                apply(x, out, *tables, projs, widths, max_rank, 1)

    return run, outputs


def _bytes(t: dict[str, Any]) -> int:
    """What the groups must move: each request's A and Bᵀ of their projections, its inputs
    read and outputs read and written (bf16)."""
    shape: BaseModelShape = t["shape"]
    names = dict(enumerate(LINEAR_MODULES))
    projs = [p for group, _, _ in t["groups"] for p in group]
    per_rank = sum(sum(shape.proj_dims(names[p])) for p in projs)
    weights = sum(r * per_rank * 2 for r in t["ranks"])
    dims = t["dims"]
    io = sum(dims[src] + 2 * len(group) * dims[dst] for group, src, dst in t["groups"])
    return weights + len(t["ranks"]) * 2 * io


DIRECT_SLOTS = "direct_slots"


def _direct_slots() -> Callable[..., Any]:
    """benchmarks/lora_variants/direct_slots.py, called as `lora_apply`. Its tables are made
    at a batch's first call (outside the timed graph: the worker would make them once a step
    for every layer) and kept by (batch size, projections, input width)."""
    from benchmarks.lora_variants.direct_slots import (
        SlotTables,
        lora_apply_direct_slots,
        request_slot_tables,
    )

    made: dict[tuple[int, tuple[int, ...], int], SlotTables] = {}

    def apply(
        x: torch.Tensor, out: torch.Tensor, pool: torch.Tensor, *tables_and_group: Any
    ) -> torch.Tensor:
        slots, meta, req_lora, q_starts, _, projs, widths, max_rank, _ = tables_and_group
        key = (req_lora.shape[0], projs, x.shape[1])
        if key not in made:
            made[key] = request_slot_tables(
                slots, meta, req_lora, projs, x.shape[1], widths, max_rank, pool.shape[1]
            )
        return lora_apply_direct_slots(x, out, pool, q_starts, made[key], widths, max_rank)

    return apply


def _variants(names: list[str], baseline: Any) -> dict[str, Callable[..., Any]]:
    def variant(name: str) -> Callable[..., Any]:
        if name == DIRECT_SLOTS:
            return _direct_slots()
        return _apply_with(None, VARIANTS[name])

    variants = {name: variant(name) for name in names}
    if baseline is not None:
        variants["baseline"] = _apply_with(baseline, None)
    return variants


def run(
    batches: tuple[int, ...],
    device: torch.device,
    names: list[str],
    baseline: Any = None,
    workload: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Each variant over the layer's groups; `workload`: `_setup`'s rank_cycle and groups."""
    import triton.testing

    variants = _variants(names, baseline)
    results = []
    for batch in batches:
        t = _setup(batch, device, **(workload or {}))
        ref_run, ref_out = _op(t, None)
        _, before = _op(t, None)  # the outputs' values before any op
        ref_run()
        moved = _bytes(t)
        for name, apply in variants.items():
            fn, outs = _op(t, apply)
            fn()
            err = max(  # of the LoRA delta alone, against the reference's delta
                float((o.float() - r.float()).norm() / (r.float() - b.float()).norm())
                for o, r, b in zip(outs, ref_out, before, strict=True)
            )
            ms = triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
            launch = VARIANTS.get(name)
            row = {
                "batch": batch,
                "variant": name,
                "launch": dataclasses.asdict(launch) if launch else None,
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


def breakdown(
    batch: int,
    device: torch.device,
    names: list[str],
    baseline: Any = None,
    workload: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Each projection group's LoRA (a shrink and an expand launch; the baseline's own
    launches) timed alone in a CUDA graph under each variant, with the weight bytes it
    reads."""
    import triton.testing

    t = _setup(batch, device, **(workload or {}))
    shape: BaseModelShape = t["shape"]
    tables = (t["pool"], t["slots"], t["meta"], t["req_lora"], t["q_starts"], t["q_lens"])
    max_rank, rows = t["max_rank"], []
    gen = torch.Generator(device).manual_seed(2)
    modules = dict(enumerate(LINEAR_MODULES))
    applies = _variants(names, baseline)
    for projs, src, dst in t["groups"]:
        x = torch.randn(batch, t["dims"][src], generator=gen, device=device).to(torch.bfloat16)
        widths = (t["dims"][dst],) * len(projs)
        out = torch.zeros(batch, sum(widths), dtype=torch.bfloat16, device=device)
        label = "+".join(modules[p] for p in projs)
        moved = sum(r * sum(shape.proj_dims(modules[p])) * 2 for r in t["ranks"] for p in projs)
        for variant, apply in applies.items():
            fn = partial(apply, x, out, *tables, projs, widths, max_rank, 1)
            fn()
            ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
            gbps = moved / (ms * 1e-3) / 1e9
            rows.append(
                {"batch": batch, "group": label, "variant": variant, "us": ms * 1000, "gbps": gbps}
            )
            print(f"{batch:>5} {label:>18} {variant:>12} {ms * 1000:>7.1f} us {gbps:>6.0f} GB/s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.lora_tune", description=__doc__)
    parser.add_argument("--batches", default="32,128")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--breakdown", action="store_true", help="time each group alone too")
    parser.add_argument("--ranks", default="8,16,32,64", help="adapter ranks, cycled")
    parser.add_argument(
        "--groups", choices=("all-linear", "attention"), default="all-linear", help="which LoRA"
    )
    parser.add_argument(
        "--max-rank",
        type=int,
        default=0,
        help="the largest rank the kernels are told (the engine's decode graphs: its --max-rank, "
        "128 by default); 0: the batch's largest",
    )
    parser.add_argument(
        "--order",
        choices=("cycled", "by-rank"),
        default="cycled",
        help="the batch's requests with their ranks cycled, or in descending rank",
    )
    parser.add_argument("--baseline", type=Path, help="a checkout whose kernels to time beside")
    known = [*VARIANTS, DIRECT_SLOTS]
    parser.add_argument("--variants", default=",".join(known), help=f"some of {', '.join(known)}")
    args = parser.parse_args()
    names = args.variants.split(",")
    if unknown := set(names) - set(known):
        parser.error(f"--variants: unknown {', '.join(sorted(unknown))}")
    batches = tuple(int(b) for b in args.batches.split(","))
    baseline = load_baseline(args.baseline) if args.baseline else None
    groups = GROUPS if args.groups == "all-linear" else GROUPS[:2]
    workload = {
        "rank_cycle": tuple(int(r) for r in args.ranks.split(",")),
        "groups": groups,
        "max_rank": args.max_rank,
        "by_rank": args.order == "by-rank",
    }
    device = torch.device("cuda")
    if args.breakdown:
        parts = [row for b in batches for row in breakdown(b, device, names, baseline, workload)]
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "lora_breakdown.json").write_text(json.dumps(parts, indent=1))
    rows = run(batches, device, names, baseline, workload)
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
