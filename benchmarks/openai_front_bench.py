"""Throughput of the OpenAI HTTP front against the router's gRPC API, side by side on the CPU
stack (store, worker, router and front each in its own process: benchmarks/stack_processes.py).

The same closed-loop workload runs through both paths in alternating rounds (gRPC, HTTP,
gRPC, HTTP, ...), after one warm-up round of each: `--concurrency` clients, each sending its
share of `--requests` streaming completions one after another, adapters in turn with the base
model, `--max-tokens` tokens each (ignore_eos, greedy) after a prompt of `--prompt-tokens`
token ids. gRPC streams go through `AsyncManyloraClient`; HTTP streams are read as raw
server-sent events with aiohttp (a light client, as the gRPC one is: on a shared CPU the
client's own cost is part of what is measured). The result is tokens per second of each run
and the ratio HTTP / gRPC per round and over all rounds (the front's target: >= 0.9), and,
steadier on a shared machine, the CPU time every process of the stack spent per token on each
path (Linux's /proc), whose inverse ratio is the throughput ratio of a CPU-bound stack.

    python -m benchmarks.openai_front_bench --rounds 3 --out results.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np

from benchmarks.serving.grpc_stack import upload_adapters
from benchmarks.stack_processes import StackAddresses, cpu_seconds, running_stack
from benchmarks.workload_args import add_workload_args, workload_from_args
from services.client import AsyncManyloraClient
from services.openai_front.sse import read_sse_events

MODEL = "tiny"


@dataclass
class Workload:
    concurrency: int = 16
    requests: int = 96
    max_tokens: int = 64
    prompt_tokens: int = 16
    adapters: int = 4
    seed: int = 0


@dataclass
class RunResult:
    path: str  # "grpc" or "http"
    round: int
    seconds: float
    tokens: int
    requests: int
    errors: int
    ttft_s: list[float] = field(default_factory=list)
    # CPU seconds each process used during the run (this one is "client").
    cpu_s: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds

    def summary(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "round": self.round,
            "seconds": round(self.seconds, 3),
            "tokens": self.tokens,
            "requests": self.requests,
            "errors": self.errors,
            "tokens_per_s": round(self.tokens_per_s, 1),
            "ttft_p50_ms": round(1000 * statistics.median(self.ttft_s), 1) if self.ttft_s else 0,
            "cpu_s": {name: round(seconds, 2) for name, seconds in self.cpu_s.items()},
        }


@dataclass
class Request:
    adapter: str  # "" = the base model
    prompt: list[int]


def adapter_names(workload: Workload) -> list[str]:
    """The base model ("") and the adapters, in the order requests take them."""
    return ["", *(f"bench-{i}" for i in range(workload.adapters))]


def make_requests(workload: Workload) -> list[Request]:
    rng = np.random.default_rng(workload.seed)
    names = adapter_names(workload)
    return [
        Request(names[i % len(names)], rng.integers(3, 259, workload.prompt_tokens).tolist())
        for i in range(workload.requests)
    ]


OneRequest = Callable[[Request], Awaitable[tuple[int, float]]]


async def closed_loop(requests: list[Request], concurrency: int, one: OneRequest) -> RunResult:
    """`concurrency` clients draining one list; (tokens, time to first token) per request."""
    pending = list(reversed(requests))
    result = RunResult("", 0, 0.0, 0, 0, 0)

    async def client() -> None:
        while pending:
            request = pending.pop()
            try:
                tokens, ttft = await one(request)
            except Exception:
                result.errors += 1
                continue
            result.tokens += tokens
            result.requests += 1
            result.ttft_s.append(ttft)

    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - start
    return result


def grpc_one(client: AsyncManyloraClient, max_tokens: int) -> OneRequest:
    async def one(request: Request) -> tuple[int, float]:
        start = time.perf_counter()
        ttft = 0.0
        tokens = 0
        async for chunk in client.generate(
            request.prompt, adapter=request.adapter, max_new_tokens=max_tokens, ignore_eos=True
        ):
            if not tokens and chunk.token_ids:
                ttft = time.perf_counter() - start
            tokens += len(chunk.token_ids)
        if tokens != max_tokens:
            raise RuntimeError(f"{tokens} tokens, not {max_tokens}")
        return tokens, ttft

    return one


def http_one(session: aiohttp.ClientSession, url: str, max_tokens: int) -> OneRequest:
    async def one(request: Request) -> tuple[int, float]:
        body = {
            "model": request.adapter or MODEL,
            "prompt": request.prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        start = time.perf_counter()
        ttft = 0.0
        usage = None
        async with session.post(f"{url}/completions", json=body) as reply:
            if reply.status != 200:
                raise RuntimeError(f"HTTP {reply.status}: {await reply.text()}")
            async for event in read_sse_events(reply.content):
                if not ttft:
                    ttft = time.perf_counter() - start
                usage = event.get("usage") or usage
        tokens = int(usage["completion_tokens"]) if usage else 0
        if tokens != max_tokens:
            raise RuntimeError(f"{tokens} tokens, not {max_tokens}")
        return tokens, ttft

    return one


async def compare(stack: StackAddresses, workload: Workload, rounds: int) -> list[RunResult]:
    requests = make_requests(workload)
    with tempfile.TemporaryDirectory() as tmp:
        await upload_adapters(
            stack.store,
            MODEL,
            [(n, 8) for n in adapter_names(workload)[1:]],
            Path(tmp),
            progress=False,
        )
    # One connection pool wide enough for every client: no request waits for a socket.
    connector = aiohttp.TCPConnector(limit=workload.concurrency)
    timeout = aiohttp.ClientTimeout(total=600)
    async with (
        AsyncManyloraClient(stack.router, timeout=600) as grpc_client,
        aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
    ):
        paths = {
            "grpc": grpc_one(grpc_client, workload.max_tokens),
            "http": http_one(session, stack.front_url, workload.max_tokens),
        }
        results = []
        pids = {**stack.pids, "client": os.getpid()}
        for round_ in range(rounds + 1):  # round 0 warms both paths up and is not reported
            for name, one in paths.items():
                before = {n: cpu_seconds(pid) for n, pid in pids.items()}
                result = await closed_loop(requests, workload.concurrency, one)
                result.path, result.round = name, round_
                result.cpu_s = {n: cpu_seconds(pid) - before[n] for n, pid in pids.items()}
                if round_:
                    results.append(result)
                    print(json.dumps(result.summary()), flush=True)
        return results


def ratio(results: Sequence[RunResult]) -> dict[str, float]:
    """HTTP / gRPC tokens per second: over all rounds, and the median of the per-round ones."""
    by_path = {p: [r for r in results if r.path == p] for p in ("grpc", "http")}
    total = {p: sum(r.tokens for r in rs) / sum(r.seconds for r in rs) for p, rs in by_path.items()}
    per_round = [h.tokens_per_s / g.tokens_per_s for g, h in zip(*by_path.values(), strict=True)]
    # CPU microseconds the whole stack (client included) spent per token on each path: on a
    # CPU-bound machine, throughput goes as its inverse, whatever else the machine runs.
    cpu_us = {
        p: 1e6 * sum(sum(r.cpu_s.values()) for r in rs) / sum(r.tokens for r in rs)
        for p, rs in by_path.items()
    }
    return {
        "grpc_tokens_per_s": round(total["grpc"], 1),
        "http_tokens_per_s": round(total["http"], 1),
        "ratio_overall": round(total["http"] / total["grpc"], 3),
        "ratio_median_of_rounds": round(statistics.median(per_round), 3),
        "ratio_min_of_rounds": round(min(per_round), 3),
        "grpc_cpu_us_per_token": round(cpu_us["grpc"], 1),
        "http_cpu_us_per_token": round(cpu_us["http"], 1),
        "ratio_from_cpu": round(cpu_us["grpc"] / cpu_us["http"], 3),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Workload()
    add_workload_args(parser, defaults)
    parser.add_argument("--rounds", type=int, default=3, help="reported rounds of each path")
    parser.add_argument(
        "--worker-threads",
        type=int,
        default=1,
        help="torch threads of the worker (0: one per core); 1 leaves a core to the relays",
    )
    parser.add_argument("--out", type=Path, help="append the runs and the ratio as JSON lines")
    args = parser.parse_args(argv)
    workload = workload_from_args(args, defaults)
    with running_stack(MODEL, args.worker_threads) as stack:
        results = asyncio.run(compare(stack, workload, args.rounds))
    summary = {
        "workload": asdict(workload),
        "rounds": args.rounds,
        "worker_threads": args.worker_threads,
        **ratio(results),
    }
    print(json.dumps(summary), flush=True)
    if args.out:
        with args.out.open("a") as out:
            for result in results:
                out.write(json.dumps(result.summary()) + "\n")
            out.write(json.dumps(summary) + "\n")


if __name__ == "__main__":
    main()
