"""The worker's `--stream-interval` on the CPU stack as deployed (store, a CPU worker of the
dummy `tiny` model, router: benchmarks/stack_processes.py), through the router's gRPC API:
tokens/s and the CPU time the worker and the router spend per token, for each interval.

Each interval gets its own stack (the worker reads MANYLORA_STREAM_INTERVAL at start); stacks
alternate between the intervals `--repeats` times, and each runs `--rounds` rounds of the
same closed loop as benchmarks/openai_front_bench.py (after a warm-up round, not kept).

    python -m benchmarks.stream_interval_bench --intervals 1,4 --repeats 2 --out results.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from benchmarks.openai_front_bench import (
    MODEL,
    Workload,
    adapter_names,
    closed_loop,
    grpc_one,
    make_requests,
)
from benchmarks.serving.grpc_stack import upload_adapters
from benchmarks.stack_processes import StackAddresses, cpu_seconds, running_stack
from benchmarks.workload_args import add_workload_args, workload_from_args
from services.client import AsyncManyloraClient


async def measure(
    stack: StackAddresses, w: Workload, interval: int, rounds: int
) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        adapters = [(n, 8) for n in adapter_names(w)[1:]]
        await upload_adapters(stack.store, MODEL, adapters, Path(tmp), progress=False)
    requests = make_requests(w)
    rows = []
    async with AsyncManyloraClient(stack.router, timeout=600) as client:
        one = grpc_one(client, w.max_tokens)
        for index in range(rounds + 1):  # round 0 warms the stack up and is not kept
            before = {name: cpu_seconds(pid) for name, pid in stack.pids.items()}
            result = await closed_loop(requests, w.concurrency, one)
            cpu = {name: cpu_seconds(pid) - before[name] for name, pid in stack.pids.items()}
            if not index:
                continue
            tokens = max(result.tokens, 1)
            rows.append(
                {
                    "stream_interval": interval,
                    "round": index,
                    "tokens": result.tokens,
                    "errors": result.errors,
                    "seconds": round(result.seconds, 3),
                    "tokens_per_s": round(result.tokens / result.seconds, 1),
                    "worker_cpu_us_per_token": round(1e6 * cpu["worker"] / tokens, 1),
                    "router_cpu_us_per_token": round(1e6 * cpu["router"] / tokens, 1),
                }
            )
            print(json.dumps(rows[-1]), flush=True)
    return rows


def _per_token(rows: list[dict[str, Any]], key: str) -> float:
    """A per-token figure over several rounds: weighted by their tokens."""
    return sum(r[key] * r["tokens"] for r in rows) / max(sum(r["tokens"] for r in rows), 1)


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| stream interval | rounds | tokens/s | worker CPU µs/token | router CPU µs/token "
        "| errors |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for interval in dict.fromkeys(r["stream_interval"] for r in rows):
        mine = [r for r in rows if r["stream_interval"] == interval]
        tokens = sum(r["tokens"] for r in mine)
        seconds = sum(r["seconds"] for r in mine)

        lines.append(
            f"| {interval} | {len(mine)} | {tokens / seconds:,.0f} "
            f"| {_per_token(mine, 'worker_cpu_us_per_token'):.0f} "
            f"| {_per_token(mine, 'router_cpu_us_per_token'):.0f} "
            f"| {sum(r['errors'] for r in mine)} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Workload(concurrency=32, requests=128)
    add_workload_args(parser, defaults)
    parser.add_argument("--intervals", default="1,4", help="comma-separated stream intervals")
    parser.add_argument("--repeats", type=int, default=2, help="stacks started per interval")
    parser.add_argument("--rounds", type=int, default=3, help="kept rounds of each stack")
    parser.add_argument("--worker-threads", type=int, default=1, help="torch threads")
    parser.add_argument("--out", type=Path, help="append the rounds as JSON lines")
    args = parser.parse_args(argv)
    w = workload_from_args(args, defaults)
    rows = []
    for _ in range(args.repeats):
        for interval in (int(i) for i in args.intervals.split(",")):
            os.environ["MANYLORA_STREAM_INTERVAL"] = str(interval)  # the worker's setting
            with running_stack(MODEL, args.worker_threads) as stack:
                rows += asyncio.run(measure(stack, w, interval, args.rounds))
    print(table(rows), flush=True)
    if args.out:
        with args.out.open("a") as out:
            for row in rows:
                out.write(json.dumps({"bench": "stream_interval", "workload": asdict(w), **row}))
                out.write("\n")


if __name__ == "__main__":
    main()
