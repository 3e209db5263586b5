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

`--target-modules all-linear` gives every adapter LoRA on all seven linear layers (q/k/v/o and
gate/up/down) instead of the attention projections only (`attention`, the default).

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
from collections.abc import Iterator, Sequence
from itertools import product
from pathlib import Path
from typing import Any

from benchmarks import workload
from benchmarks.serving import grpc_stack
from benchmarks.serving.options import engine_variants, run_options
from benchmarks.serving.options import parse_args as _parse_args
from benchmarks.serving.runs import InProcess, RunOptions, run_grpc, run_hf_peft, run_remote
from services.common.logging import setup_logging


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return _parse_args(argv, __doc__ or "")


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


def kernels_dir() -> str:
    """The folder of the `kernels` package this run imported: another tree's when a folder
    holding one came first on the path (experiments.sh capacity_ab)."""
    import kernels

    return str(Path(kernels.__file__).resolve().parent)


class Results:
    """Appends each run's result to the output file as soon as it exists (a run cut short by
    a device time limit keeps the runs before it) and prints a one-line summary."""

    def __init__(self, path: str):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.commit, self.kernels = git_commit(), kernels_dir()
        self.rows: list[dict[str, Any]] = []

    def add(self, row: dict[str, Any]) -> None:
        row = {**row, "commit": self.commit, "kernels": self.kernels}
        self.rows.append(row)
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(summary_line(row), flush=True)


def summary_line(r: dict[str, Any]) -> str:
    def fmt(value: float | None, spec: str = ".2f") -> str:
        return "-" if value is None else format(value, spec)

    targets = r.get("target_modules", "attention")
    on = "" if targets == "attention" else f" on {targets}"
    return (
        f"[{r['mode']} {r['variant']}] n={r['num_adapters']}{on} R={r['rate']:g} "
        f"alpha={r['alpha']:g} cv={r['cv']:g}: {r['finished']}/{r['num_requests']} done, "
        f"{r.get('distinct_adapters', '-')} adapters served, "
        f"{fmt(r['throughput_req_s'])} req/s, {fmt(r['throughput_tok_s'], '.0f')} tok/s, "
        f"latency avg {fmt(r['avg_latency_s'])} s p99 {fmt(r['p99_latency_s'])} s, "
        f"TTFT avg {fmt(r['avg_ttft_s'])} s p99 {fmt(r['p99_ttft_s'])} s"
        f"{_engine_ttft_text(r)}, "
        f"SLO {fmt(r['slo_attainment'], '.1%')}, "
        f"cache hits {fmt(r['cache_hit_rate'], '.1%')}{_steps_text(r.get('steps') or {})}"
        f"{_compiles_text(r.get('kernel_compiles'))}{_pool_text(r.get('pool') or {})}"
    )


def _engine_ttft_text(r: dict[str, Any]) -> str:
    """` (in the engine avg X s, queued Y s)`: what of the TTFT the worker's engine saw, and
    of that the wait before its admission, through gRPC."""
    if r.get("avg_engine_ttft_s") is None:
        return ""
    return (
        f" (in the engine avg {r['avg_engine_ttft_s']:.2f} s, "
        f"queued {r['avg_engine_queue_s']:.2f} s)"
    )


def _pool_text(pool: dict[str, Any]) -> str:
    """`; pool: committed ≤ X%, running ≤ N, waiting ≤ M`: how near admission came to its
    bounds (the pool's held and promised slots, --max-num-seqs)."""
    if "peak_running" not in pool:
        return ""
    return (
        f"; pool: committed ≤ {pool['peak_committed_frac']:.0%}, "
        f"running ≤ {pool['peak_running']}, waiting ≤ {pool['peak_waiting']}"
    )


def _compiles_text(compiles: dict[str, Any] | None) -> str:
    """`; N kernels compiled in the run (S s)`: each stalled a step, so a fair run has none."""
    if not compiles or not compiles["count"]:
        return ""
    return f"; {compiles['count']} kernels compiled in the run ({compiles['seconds']:.1f} s)"


def _steps_text(steps: dict[str, Any]) -> str:
    """`; steps: decode N × X ms (W ms waiting, C ms CPU, T tokens), ...` where the run timed
    its engine steps: the wait is for the device, the rest of a step is host work, of which
    the stepping thread's CPU time is C (the rest it waited for something else: the GIL)."""
    parts = [
        f"{kind} {s['steps']} × {s['avg_ms']:.1f} ms ({_step_detail(s)})"
        for kind, s in steps.items()
        if s.get("steps")
    ]
    return "; steps: " + ", ".join(parts) if parts else ""


def _step_detail(s: dict[str, Any]) -> str:
    detail = [f"{s['avg_wait_ms']:.1f} ms waiting"] if "avg_wait_ms" in s else []
    detail += [f"{s['avg_cpu_ms']:.1f} ms CPU"] if "avg_cpu_ms" in s else []
    detail += [f"{s['avg_tokens']:.0f} tokens"] if "avg_tokens" in s else []
    detail += [f"{s['avg_seqs']:.0f} seqs"] if "avg_seqs" in s else []
    return ", ".join(detail)


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
    all_traces: list[workload.Trace], limit_gb: float, targets: Sequence[str]
) -> tuple[str, list[tuple[str, int]]]:
    """The model and the (id, rank) list of the sweep's largest trace; refuses (SystemExit)
    when their files would pass `limit_gb` (the store writes each one to disk)."""
    most = max(all_traces, key=lambda t: t.params.num_adapters).params
    named = grpc_stack.bench_adapters(most)
    size = grpc_stack.upload_bytes(most.model, named, targets) / 1e9
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
    model, named = adapters_to_upload(all_traces, args.max_upload_gb, options.targets)
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
                options.targets,
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
        model, named = adapters_to_upload(all_traces, args.max_upload_gb, options.targets)
        with tempfile.TemporaryDirectory(prefix="manylora-bench-") as tmp:
            await grpc_stack.upload_adapters(
                args.store_target,
                model,
                named,
                Path(tmp),
                options.distinct_weights,
                options.progress,
                options.targets,
            )
    for trace in all_traces:
        results.add(
            await run_remote(
                trace, args.target, options, bool(args.store_target), args.worker_stats
            )
        )


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
