"""How many streams and tokens one router process relays: a real router (`python -m
services.router`) in front of fake workers (benchmarks/fake_worker.py) that stream tokens as
fast as gRPC takes them, and one client holding `--concurrency` streams open at once, closed
loop, until `--requests` streams have ended.

Every stream is checked end to end: token ids 0, 1, ..., max_new_tokens - 1, each once and in
order, then a last message with the finish reason. A stream that fails or ends otherwise counts
as dropped (the target is none). Reported per round: streams/s and tokens/s (wall clock, on a
machine the fakes and the client share with the router), and the router's CPU time per token
(Linux's /proc), whose inverse is how many tokens/s one router process relays with a core of
its own: the steadier measure on a shared machine.

`--compare TREE` starts another router from another checkout (e.g. `git worktree add
/tmp/base main`) in front of the same fakes; rounds alternate between the routers.

    python -m benchmarks.router_bench --rounds 3 --tokens-per-message 1 --out results.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import grpc

from benchmarks.router_processes import REPO, Router, running_fakes, running_routers
from benchmarks.stack_processes import cpu_seconds
from benchmarks.workload_args import add_workload_args, workload_from_args
from manylora.v1 import common_pb2, router_pb2_grpc


@dataclass
class Workload:
    workers: int = 4
    concurrency: int = 256
    requests: int = 2048
    tokens: int = 64
    tokens_per_message: int = 1
    prompt_tokens: int = 16
    # > 0: the fakes make one token per stream every step_us and merge what a stream owes
    # into its next message, like the real worker (benchmarks/fake_worker.py).
    step_us: int = 0


@dataclass
class Round:
    router: str
    round: int
    seconds: float
    streams: int
    tokens: int
    messages: int
    dropped: int
    router_cpu_s: float
    fakes_cpu_s: float
    client_cpu_s: float
    first_error: str = ""

    def summary(self) -> dict[str, Any]:
        return {
            **asdict(self),
            "streams_per_s": round(self.streams / self.seconds, 1),
            "tokens_per_s": round(self.tokens / self.seconds, 1),
            "router_cpu_us_per_token": round(1e6 * self.router_cpu_s / max(self.tokens, 1), 2),
            "router_tokens_per_cpu_s": round(self.tokens / max(self.router_cpu_s, 1e-9), 1),
            "tokens_per_message": round(self.tokens / max(self.messages, 1), 2),
        }


class StreamError(Exception):
    pass


async def one_stream(stub: router_pb2_grpc.RouterStub, index: int, w: Workload) -> int:
    """Messages received; raises StreamError when a token is lost, repeated or out of order."""
    request = common_pb2.GenerateRequest(
        request_id=f"bench-{index}",
        prompt_token_ids=common_pb2.PromptTokenIds(ids=range(3, 3 + w.prompt_tokens)),
        params=common_pb2.SamplingParams(max_new_tokens=w.tokens),
    )
    expected = 0
    messages = 0
    finished = False
    async for response in stub.Generate(request, timeout=600):
        messages += 1
        if finished:
            raise StreamError("a message after the last one")
        for token in response.token_ids:
            if token != expected:
                raise StreamError(f"token {token} where {expected} was due")
            expected += 1
        finished = response.finish_reason != common_pb2.FINISH_REASON_UNSPECIFIED
    if not finished or expected != w.tokens:
        raise StreamError(f"ended after {expected} of {w.tokens} tokens, finished={finished}")
    return messages


async def run_round(
    channel: grpc.aio.Channel, router: Router, index: int, w: Workload, fakes_pid: int
) -> Round:
    stub = router_pb2_grpc.RouterStub(channel)
    pending = list(range(w.requests))
    result = Round(router.name, index, 0.0, 0, 0, 0, 0, 0.0, 0.0, 0.0)

    async def client() -> None:
        while pending:
            i = pending.pop()
            try:
                messages = await one_stream(stub, i, w)
            except (StreamError, grpc.aio.AioRpcError) as exc:
                result.dropped += 1
                result.first_error = result.first_error or repr(exc)[:300]
                continue
            result.streams += 1
            result.tokens += w.tokens
            result.messages += messages

    pids = {"router": router.pid, "fakes": fakes_pid, "client": 0}
    before = {name: cpu_seconds(pid) if pid else time.process_time() for name, pid in pids.items()}
    start = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(w.concurrency)))
    result.seconds = time.perf_counter() - start
    after = {name: cpu_seconds(pid) if pid else time.process_time() for name, pid in pids.items()}
    result.router_cpu_s = round(after["router"] - before["router"], 3)
    result.fakes_cpu_s = round(after["fakes"] - before["fakes"], 3)
    result.client_cpu_s = round(after["client"] - before["client"], 3)
    return result


async def run_all(routers: list[Router], w: Workload, rounds: int, fakes_pid: int) -> list[Round]:
    results = []
    channels = {r.address: grpc.aio.insecure_channel(r.address) for r in routers}
    try:
        for index in range(rounds + 1):  # round 0 warms every router up and is not kept
            for router in routers:
                result = await run_round(channels[router.address], router, index, w, fakes_pid)
                if index:
                    results.append(result)
                    print(json.dumps(result.summary()), flush=True)
    finally:
        for channel in channels.values():
            await channel.close()
    return results


def table(results: Sequence[Round]) -> str:
    lines = [
        "| router | rounds | tokens/message | streams/s | tokens/s (wall) | router CPU µs/token "
        "| tokens/s per router core (min – max of rounds) | dropped |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name in dict.fromkeys(r.router for r in results):
        mine = [r for r in results if r.router == name]
        seconds = sum(r.seconds for r in mine)
        tokens = sum(r.tokens for r in mine)
        cpu = sum(r.router_cpu_s for r in mine)
        per_round = [r.tokens / r.router_cpu_s for r in mine if r.router_cpu_s] or [0.0]
        lines.append(
            f"| {name} | {len(mine)} | {tokens / max(sum(r.messages for r in mine), 1):.2f} "
            f"| {sum(r.streams for r in mine) / seconds:,.0f} | {tokens / seconds:,.0f} "
            f"| {1e6 * cpu / max(tokens, 1):.1f} | {tokens / max(cpu, 1e-9):,.0f} "
            f"({min(per_round):,.0f} – {max(per_round):,.0f}) "
            f"| {sum(r.dropped for r in mine)} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = Workload()
    add_workload_args(parser, defaults)
    parser.add_argument("--rounds", type=int, default=3, help="kept rounds of each router")
    parser.add_argument(
        "--compare",
        type=Path,
        action="append",
        default=[],
        help="another checkout whose router runs in alternating rounds (repeatable)",
    )
    parser.add_argument(
        "--router-arg", action="append", default=[], help="extra router flag (repeatable)"
    )
    parser.add_argument(
        "--router-nice",
        type=int,
        default=0,
        help="niceness added to the routers (a router that falls behind, as at full load)",
    )
    parser.add_argument("--out", type=Path, help="append the rounds and the table as JSON lines")
    args = parser.parse_args(argv)
    w = workload_from_args(args, defaults)
    trees = [REPO, *args.compare]
    with (
        running_fakes(w.workers, w.tokens_per_message, step_ms=w.step_us / 1000) as (
            workers,
            fakes_pid,
        ),
        running_routers(workers, trees, args.router_arg, args.router_nice) as routers,
    ):
        results = asyncio.run(run_all(routers, w, args.rounds, fakes_pid))
    print(table(results), flush=True)
    if args.out:
        with args.out.open("a") as out:
            for result in results:
                line = {"bench": "router", "workload": asdict(w), **result.summary()}
                out.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
