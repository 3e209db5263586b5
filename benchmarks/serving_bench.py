"""S-LoRA's serving benchmark for manylora: replay synthetic traces, measure, append results.

Every combination of --num-adapters, --rate, --alpha and --cv (comma-separated lists) is one
trace (benchmarks.workload, same seed), served by every --variant in every --mode:

- modes: `inprocess` (an Engine in this process, on the wall clock) and `grpc` (an adapter
  store, one worker and a router started in this process; the trace through the router with
  the async client); `--target HOST:PORT` drives an already-running router instead.
- variants: `manylora` (unified pool, LoRA kernels), `no-unified-pool` (KV and adapters in
  fixed regions), `bmm` (S-LoRA's padded-bmm LoRA), `hf-peft` (HF transformers + PEFT with
  static batching; in-process only). `--no-unified-pool` and `--lora-backend bmm` apply to
  every engine variant.

Each run appends one JSON line to --out: the trace's parameters, throughput, latency and time
to first token (average, p50, p99), SLO attainment, adapter cache hit rate and pool usage.

    python -m benchmarks.serving_bench --preset S2 --num-adapters 5,100,1000,2000 \
        --variant manylora,no-unified-pool,bmm --out results.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from itertools import product
from pathlib import Path
from typing import Any, TypeVar

from benchmarks import workload
from benchmarks.serving import grpc_stack
from benchmarks.serving.engine_setup import EngineSettings, EngineVariant, resolve_device
from benchmarks.serving.runs import InProcess, RunOptions, run_grpc, run_hf_peft, run_remote
from services.common.logging import setup_logging

ENGINE_VARIANTS = {
    "manylora": EngineVariant(),
    "no-unified-pool": EngineVariant(unified_pool=False),
    "bmm": EngineVariant(lora_backend="bmm"),
}
MODES = ("inprocess", "grpc")
T = TypeVar("T")


def _list_of(kind: Callable[[str], T]) -> Callable[[str], list[T]]:
    return lambda text: [kind(x) for x in text.split(",") if x]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serving_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--preset", choices=sorted(workload.PRESETS), default="S1")
    p.add_argument("--model", help="dummy model preset (default: the workload preset's)")
    p.add_argument("--trace", help="a saved trace (JSON lines) instead of generated ones")
    p.add_argument("--num-adapters", type=_list_of(int), help="list, e.g. 5,100,1000,2000")
    p.add_argument("--rate", type=_list_of(float), help="requests/s, list")
    p.add_argument("--alpha", type=_list_of(float), help="popularity exponent, list")
    p.add_argument("--cv", type=_list_of(float), help="arrival coefficient of variation, list")
    p.add_argument("--duration", type=float, help="seconds of arrivals per trace")
    p.add_argument("--prompt-range", type=workload.int_pair, help="LOW,HIGH")
    p.add_argument("--output-range", type=workload.int_pair, help="LOW,HIGH")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mode", type=_list_of(str), default=["inprocess"], help="inprocess,grpc")
    p.add_argument(
        "--variant",
        type=_list_of(str),
        default=["manylora"],
        help="manylora,no-unified-pool,bmm,hf-peft",
    )
    p.add_argument("--no-unified-pool", action="store_true", help="every engine variant split")
    p.add_argument("--lora-backend", choices=("kernels", "bmm"), help="every engine variant's")
    p.add_argument("--target", help="host:port of a running router to drive (mode grpc-remote)")
    p.add_argument("--store-target", help="with --target: upload the adapters to this store")
    p.add_argument("--device", default="auto", help="cuda, cpu or auto")
    p.add_argument(
        "--max-upload-gb",
        type=float,
        default=20.0,
        help="refuse gRPC runs whose adapter files would be larger",
    )
    p.add_argument("--slo", type=float, default=6.0, help="time-to-first-token bound, seconds")
    p.add_argument("--timeout", type=float, help="cut each run off after this many seconds")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-loras", type=int, default=512)
    p.add_argument("--max-rank", type=int, default=0, help="0: the trace's largest rank")
    p.add_argument("--pool-slots", type=int, default=0, help="0: sized from free memory")
    p.add_argument("--gpu-memory-fraction", type=float, default=0.85)
    p.add_argument("--adapter-region-fraction", type=float, default=0.25)
    p.add_argument("--no-cuda-graphs", action="store_true")
    p.add_argument(
        "--distinct-weights",
        type=int,
        default=8,
        help="random weight sets per rank that adapters share",
    )
    p.add_argument("--peft-batch", type=int, default=8, help="HF PEFT's static batch size")
    p.add_argument("--out", required=True, help="JSON-lines file the results are appended to")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for mode in args.mode:
        if mode not in MODES:
            p.error(f"--mode {mode!r}: not one of {', '.join(MODES)}")
    for name in args.variant:
        if name not in (*ENGINE_VARIANTS, "hf-peft"):
            p.error(f"--variant {name!r}: not one of {', '.join(ENGINE_VARIANTS)}, hf-peft")
    return args


def traces(args: argparse.Namespace) -> Iterator[workload.Trace]:
    """One trace per combination of the swept lists (or the saved --trace)."""
    if args.trace:
        yield workload.load(args.trace)
        return
    base = workload.PRESETS[args.preset]
    fixed = {
        "model": args.model,
        "duration_s": args.duration,
        "prompt_range": args.prompt_range,
        "output_range": args.output_range,
        "seed": args.seed,
    }
    base = dataclasses.replace(base, **{k: v for k, v in fixed.items() if v is not None})
    lists = [
        args.num_adapters or [base.num_adapters],
        args.rate or [base.rate],
        args.alpha or [base.alpha],
        args.cv or [base.cv],
    ]
    for n, rate, alpha, cv in product(*lists):
        params = dataclasses.replace(base, num_adapters=n, rate=rate, alpha=alpha, cv=cv)
        yield workload.generate(params)


def engine_variants(args: argparse.Namespace) -> list[EngineVariant]:
    chosen: list[EngineVariant] = []
    for name in args.variant:
        if name in ENGINE_VARIANTS:
            v = ENGINE_VARIANTS[name]
            if args.no_unified_pool:
                v = dataclasses.replace(v, unified_pool=False)
            if args.lora_backend:
                v = dataclasses.replace(v, lora_backend=args.lora_backend)
            if v not in chosen:
                chosen.append(v)
    return chosen


def run_options(args: argparse.Namespace) -> RunOptions:
    settings = EngineSettings(
        max_num_seqs=args.max_num_seqs,
        max_loras=args.max_loras,
        max_rank=args.max_rank,
        pool_slots=args.pool_slots,
        gpu_memory_fraction=args.gpu_memory_fraction,
        adapter_region_fraction=args.adapter_region_fraction,
        cuda_graphs=not args.no_cuda_graphs,
    )
    return RunOptions(
        resolve_device(args.device),
        settings,
        args.slo,
        args.timeout,
        not args.no_progress,
        args.distinct_weights,
        args.peft_batch,
    )


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip()


class Results:
    """Appends each run's result to the output file as soon as it exists (a run cut short by
    a device time limit keeps the runs before it) and prints a one-line summary."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.commit = git_commit()
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        row = {**row, "commit": self.commit}
        self.rows.append(row)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(summary_line(row), flush=True)


def summary_line(r: dict[str, Any]) -> str:
    def fmt(value: float | None, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    return (
        f"[{r['mode']} {r['variant']}] n={r['num_adapters']} R={r['rate']:g} "
        f"alpha={r['alpha']:g} cv={r['cv']:g}: {r['finished']}/{r['num_requests']} done, "
        f"{fmt(r['throughput_req_s'])} req/s, {fmt(r['throughput_tok_s'], '.0f')} tok/s, "
        f"latency avg {fmt(r['avg_latency_s'])} s p99 {fmt(r['p99_latency_s'])} s, "
        f"TTFT avg {fmt(r['avg_ttft_s'])} s p99 {fmt(r['p99_ttft_s'])} s, "
        f"SLO {fmt(r['slo_attainment'], '.1%')}, "
        f"cache hits {fmt(r['cache_hit_rate'], '.1%')}"
    )


def run_inprocess(
    all_traces: list[workload.Trace],
    args: argparse.Namespace,
    options: RunOptions,
    results: Results,
) -> None:
    runner = InProcess(options)
    for trace in all_traces:
        for variant in engine_variants(args):
            results.add(runner.run(trace, variant))
        if "hf-peft" in args.variant:
            results.add(run_hf_peft(trace, options))
    runner.release()


def adapters_to_upload(
    all_traces: list[workload.Trace], limit_gb: float
) -> tuple[str, list[tuple[str, int]]]:
    """The model and the (id, rank) list of the sweep's largest trace; refuses (SystemExit)
    when their files would pass `limit_gb` (the store writes each one to disk)."""
    most = max(all_traces, key=lambda t: t.params.num_adapters).params
    named = grpc_stack.bench_adapters(most)
    size = grpc_stack.upload_bytes(most.model, named) / 1e9
    if size > limit_gb:
        raise SystemExit(
            f"uploading {len(named)} adapters would write {size:.0f} GB to the store "
            f"(over --max-upload-gb {limit_gb:g}); use fewer adapters or smaller ranks"
        )
    return most.model, named


async def run_grpc_mode(
    all_traces: list[workload.Trace],
    args: argparse.Namespace,
    options: RunOptions,
    results: Results,
) -> None:
    """One store with every adapter the largest trace names; per run a fresh worker+router."""
    model, named = adapters_to_upload(all_traces, args.max_upload_gb)
    with tempfile.TemporaryDirectory(prefix="manylora-bench-") as tmp:
        async with grpc_stack.store_at(Path(tmp) / "store", model, 128) as store:
            target = f"127.0.0.1:{store.port}"
            await grpc_stack.upload_adapters(
                target,
                model,
                named,
                Path(tmp) / "peft",
                options.distinct_weights,
                options.progress,
            )
            for trace in all_traces:
                for variant in engine_variants(args):
                    results.add(await run_grpc(trace, variant, target, options))


async def run_against(
    all_traces: list[workload.Trace],
    args: argparse.Namespace,
    options: RunOptions,
    results: Results,
) -> None:
    if args.store_target:
        model, named = adapters_to_upload(all_traces, args.max_upload_gb)
        with tempfile.TemporaryDirectory(prefix="manylora-bench-") as tmp:
            await grpc_stack.upload_adapters(
                args.store_target,
                model,
                named,
                Path(tmp),
                options.distinct_weights,
                options.progress,
            )
    for trace in all_traces:
        results.add(await run_remote(trace, args.target, options, bool(args.store_target)))


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    setup_logging("WARNING")  # the engine logs every adapter load and eviction at INFO
    options, results = run_options(args), Results(args.out)
    all_traces = list(traces(args))
    if args.target:
        asyncio.run(run_against(all_traces, args, options, results))
        return results.rows
    if "inprocess" in args.mode:
        run_inprocess(all_traces, args, options, results)
    if "grpc" in args.mode:
        if "hf-peft" in args.variant:
            print("hf-peft runs in-process only; skipped in grpc mode", flush=True)
        if engine_variants(args):
            asyncio.run(run_grpc_mode(all_traces, args, options, results))
    return results.rows


if __name__ == "__main__":
    main()
