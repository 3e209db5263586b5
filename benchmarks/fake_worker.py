"""A stand-in GPU worker for router benchmarks: the worker's gRPC surface (Generate,
GetStats, health) with no model behind it, so that what is measured is the relay alone.

Each Generate streams `params.max_new_tokens` tokens: token ids 0, 1, 2, ... (a client checks
that none is lost, duplicated or reordered), the last message carrying the finish reason and
usage, as the real worker's last message does. Two ways to pace them:

- `--step-ms` 0 (the default): `--tokens-per-message` tokens per message, sent as fast as
  gRPC takes them (with `--interval-ms`, one message per interval);
- `--step-ms S`: like an engine, each stream makes one token every S ms from its start, and
  each message carries every token made since the previous one, as the real worker's
  servicer merges what a stream owes when its sends fall behind
  (services/gpu_worker/serving/servicer.py). A small S asks for tokens faster than messages
  can go out: messages then grow to match, as they would at engine speed.

Each message's text is the CLOCK_MONOTONIC time (ns) at which it was handed to gRPC, so that a
client on the same host can tell how long it took to reach it (benchmarks/router_hop_bench.py).

    python -m benchmarks.fake_worker --port 50151 [--tokens-per-message 1] [--step-ms 0]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import AsyncIterator, Sequence

import grpc

from manylora.v1 import common_pb2, gpu_worker_pb2, gpu_worker_pb2_grpc
from services.common.grpc_server import RunningServer, start_server, wait_for_signal_then
from services.router.worker_pool import WORKER_SERVICE


class FakeWorker(gpu_worker_pb2_grpc.GpuWorkerServicer):
    def __init__(self, tokens_per_message: int = 1, interval_s: float = 0.0, step_s: float = 0.0):
        if tokens_per_message < 1:
            raise ValueError("tokens_per_message must be >= 1")
        self.tokens_per_message = tokens_per_message
        self.interval_s = interval_s
        self.step_s = step_s
        self.running = 0

    async def _batches(self, total: int) -> AsyncIterator[range]:
        """The token ids of each message, paced as configured."""
        if not self.step_s:
            for start in range(0, total, self.tokens_per_message):
                if self.interval_s:
                    await asyncio.sleep(self.interval_s)
                yield range(start, min(start + self.tokens_per_message, total))
            return
        begun = time.monotonic()
        sent = 0
        while sent < total:
            made = min(total, int((time.monotonic() - begun) / self.step_s) + 1)
            if made <= sent:  # caught up: wait for the next token
                await asyncio.sleep(begun + sent * self.step_s - time.monotonic())
                continue
            yield range(sent, made)
            sent = made

    async def Generate(
        self, request: common_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        total = request.params.max_new_tokens
        self.running += 1
        try:
            async for ids in self._batches(total):
                response = common_pb2.GenerateResponse(
                    request_id=request.request_id,
                    token_ids=ids,
                    text=str(time.monotonic_ns()),
                    adapter_version=request.adapter_version,
                )
                if ids[-1] == total - 1:
                    response.finish_reason = common_pb2.LENGTH
                    response.usage.prompt_tokens = len(request.prompt_token_ids.ids)
                    response.usage.completion_tokens = total
                yield response
        finally:
            self.running -= 1

    async def GetStats(
        self, request: gpu_worker_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.GetStatsResponse:
        return gpu_worker_pb2.GetStatsResponse(
            running_requests=self.running, model="fake", free_slots=1, total_slots=1
        )


async def serve_fake_worker(
    port: int, tokens_per_message: int = 1, interval_s: float = 0.0, step_s: float = 0.0
) -> RunningServer:
    fake = FakeWorker(tokens_per_message, interval_s, step_s)
    return await start_server(
        [lambda s: gpu_worker_pb2_grpc.add_GpuWorkerServicer_to_server(fake, s)],
        [WORKER_SERVICE],
        "127.0.0.1",
        port,
    )


async def _serve(
    ports: list[int], tokens_per_message: int, interval_s: float, step_s: float
) -> None:
    servers = [await serve_fake_worker(p, tokens_per_message, interval_s, step_s) for p in ports]

    async def stop() -> None:
        for server in servers:
            await server.stop(None)

    await wait_for_signal_then(stop)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, action="append", required=True, help="repeatable")
    parser.add_argument("--tokens-per-message", type=int, default=1)
    parser.add_argument("--interval-ms", type=float, default=0.0)
    parser.add_argument("--step-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(
        _serve(args.port, args.tokens_per_message, args.interval_ms / 1000, args.step_ms / 1000)
    )


if __name__ == "__main__":
    main()
