"""The latency one router hop adds, at low load: the same client against a fake worker
(benchmarks/fake_worker.py) directly and through a real router (`python -m services.router`)
in front of it, in alternating rounds.

The fake sends one token per message every `--interval-ms` (an engine step), and stamps each
message with the CLOCK_MONOTONIC time it handed it to gRPC; on the same host the client reads
the same clock, so each message's delivery time (worker to client) is measured, not guessed.
Reported for each path: time to first token (from the call's start, as a client sees it) and
per-token delivery time, p50 and p99; the router's cost is the difference between the paths
(the issue's target: <= 5 ms p99 on time to first token).

    python -m benchmarks.router_hop_bench --rounds 4 --out results.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from benchmarks.router_processes import REPO, running_fakes, running_routers
from benchmarks.workload_args import add_workload_args, workload_from_args
from manylora.v1 import common_pb2, gpu_worker_pb2_grpc, router_pb2_grpc

DIRECT = "direct"


@dataclass
class Workload:
    concurrency: int = 2
    requests: int = 40
    tokens: int = 32
    interval_ms: float = 10.0
    prompt_tokens: int = 16


@dataclass
class Samples:
    path: str
    ttft_ms: list[float] = field(default_factory=list)
    delivery_ms: list[float] = field(default_factory=list)
    failed: int = 0


async def one_stream(stub: Any, index: int, w: Workload, into: Samples) -> None:
    request = common_pb2.GenerateRequest(
        request_id=f"hop-{index}",
        prompt_token_ids=common_pb2.PromptTokenIds(ids=range(3, 3 + w.prompt_tokens)),
        params=common_pb2.SamplingParams(max_new_tokens=w.tokens),
    )
    start = time.monotonic_ns()
    tokens = 0
    async for response in stub.Generate(request, timeout=60):
        now = time.monotonic_ns()
        if not tokens:
            into.ttft_ms.append((now - start) / 1e6)
        into.delivery_ms.append((now - int(response.text)) / 1e6)
        tokens += len(response.token_ids)
    if tokens != w.tokens:
        raise RuntimeError(f"{tokens} tokens, not {w.tokens}")


async def run_round(stub: Any, w: Workload, into: Samples) -> None:
    pending = list(range(w.requests))

    async def client() -> None:
        while pending:
            i = pending.pop()
            try:
                await one_stream(stub, i, w, into)
            except (RuntimeError, grpc.aio.AioRpcError):
                into.failed += 1

    await asyncio.gather(*(client() for _ in range(w.concurrency)))


async def run_all(worker: str, routers: dict[str, str], w: Workload, rounds: int) -> list[Samples]:
    targets = {DIRECT: worker, **routers}
    channels = {name: grpc.aio.insecure_channel(address) for name, address in targets.items()}
    stubs = {
        name: gpu_worker_pb2_grpc.GpuWorkerStub(channel)
        if name == DIRECT
        else router_pb2_grpc.RouterStub(channel)
        for name, channel in channels.items()
    }
    samples = {name: Samples(name) for name in targets}
    try:
        for index in range(rounds + 1):  # round 0 warms every path up and is not kept
            for name, stub in stubs.items():
                await run_round(stub, w, samples[name] if index else Samples(name))
    finally:
        for channel in channels.values():
            await channel.close()
    return list(samples.values())


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0}
    p50, p99 = np.percentile(values, [50, 99])
    return {"p50": round(float(p50), 3), "p99": round(float(p99), 3)}


def summary(samples: Sequence[Samples]) -> list[dict[str, Any]]:
    direct = next(s for s in samples if s.path == DIRECT)
    base = {"ttft": percentiles(direct.ttft_ms), "delivery": percentiles(direct.delivery_ms)}
    rows = []
    for s in samples:
        ttft, delivery = percentiles(s.ttft_ms), percentiles(s.delivery_ms)
        rows.append(
            {
                "path": s.path,
                "streams": len(s.ttft_ms),
                "messages": len(s.delivery_ms),
                "failed": s.failed,
                "ttft_ms": ttft,
                "delivery_ms": delivery,
                "hop_ttft_ms": {k: round(ttft[k] - base["ttft"][k], 3) for k in ttft},
                "hop_delivery_ms": {k: round(delivery[k] - base["delivery"][k], 3) for k in ttft},
            }
        )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| path | streams | failed | TTFT p50 / p99 ms | per-token delivery p50 / p99 ms "
        "| hop adds to TTFT p50 / p99 ms | hop adds per token p50 / p99 ms |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        t, d, ht, hd = r["ttft_ms"], r["delivery_ms"], r["hop_ttft_ms"], r["hop_delivery_ms"]
        lines.append(
            f"| {r['path']} | {r['streams']} | {r['failed']} | {t['p50']:.2f} / {t['p99']:.2f} "
            f"| {d['p50']:.2f} / {d['p99']:.2f} | {ht['p50']:.2f} / {ht['p99']:.2f} "
            f"| {hd['p50']:.2f} / {hd['p99']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Workload()
    add_workload_args(parser, defaults)
    parser.add_argument("--rounds", type=int, default=4, help="kept rounds of each path")
    parser.add_argument(
        "--compare",
        type=Path,
        action="append",
        default=[],
        help="another checkout whose router is measured too (repeatable)",
    )
    parser.add_argument("--out", type=Path, help="append the summary rows as JSON lines")
    args = parser.parse_args(argv)
    w = workload_from_args(args, defaults)
    with (
        running_fakes(1, interval_ms=w.interval_ms) as (workers, _),
        running_routers(workers, [REPO, *args.compare]) as routers,
    ):
        addresses = {f"router ({r.name})": r.address for r in routers}
        samples = asyncio.run(run_all(workers[0], addresses, w, args.rounds))
    rows = summary(samples)
    for row in rows:
        print(json.dumps(row), flush=True)
    print(table(rows), flush=True)
    if args.out:
        with args.out.open("a") as out:
            for row in rows:
                out.write(json.dumps({"bench": "router_hop", "workload": asdict(w), **row}) + "\n")


if __name__ == "__main__":
    main()
