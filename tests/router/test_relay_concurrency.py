"""Many streams through one router at once: each client gets exactly its own worker stream,
every message once, in order, with the worker's message boundaries (the router neither drops,
repeats, reorders, mixes nor splits what a worker merged)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from manylora.v1 import common_pb2, gpu_worker_pb2, gpu_worker_pb2_grpc, router_pb2_grpc
from services.common.grpc_server import RunningServer, start_server
from services.router.worker_pool import WORKER_SERVICE

# Message sizes a worker sends in turn: one token when it keeps up, several when it merged
# what a stream owed (services/gpu_worker/serving/servicer.py).
CHUNKS = (1, 3, 1, 2, 5)
STREAMS = 48
TOKENS = 40


def chunks(total: int) -> list[range]:
    """The token positions of each message of a stream of `total` tokens."""
    out, start, i = [], 0, 0
    while start < total:
        end = min(total, start + CHUNKS[i % len(CHUNKS)])
        out.append(range(start, end))
        start, i = end, i + 1
    return out


def token(stream: int, position: int) -> int:
    return stream * 1000 + position  # distinct per stream: a mixed-up token shows


class SequenceWorker(gpu_worker_pb2_grpc.GpuWorkerServicer):
    """Streams, for a request whose prompt is [k], the tokens token(k, 0..n-1) in CHUNKS,
    handing control to other streams between messages so that they interleave."""

    async def Generate(
        self, request: common_pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[common_pb2.GenerateResponse]:
        k = request.prompt_token_ids.ids[0]
        total = request.params.max_new_tokens
        for positions in chunks(total):
            ids = [token(k, p) for p in positions]
            response = common_pb2.GenerateResponse(
                request_id=request.request_id,
                token_ids=ids,
                text="".join(f"<{t}>" for t in ids),
                logprobs=[-float(p) for p in positions],
            )
            if positions[-1] == total - 1:
                response.finish_reason = common_pb2.LENGTH
                response.usage.completion_tokens = total
                response.usage.prompt_tokens = 1
            yield response
            await asyncio.sleep(0)

    async def GetStats(
        self, request: gpu_worker_pb2.GetStatsRequest, context: grpc.aio.ServicerContext
    ) -> gpu_worker_pb2.GetStatsResponse:
        return gpu_worker_pb2.GetStatsResponse(model="tiny", free_slots=1, total_slots=1)


async def serve_sequence_worker() -> RunningServer:
    return await start_server(
        [lambda s: gpu_worker_pb2_grpc.add_GpuWorkerServicer_to_server(SequenceWorker(), s)],
        [WORKER_SERVICE],
        "127.0.0.1",
        0,
    )


async def test_concurrent_streams_arrive_whole_in_order_and_unmixed(start_router_for):
    servers = [await serve_sequence_worker() for _ in range(2)]
    try:
        router = await start_router_for([f"127.0.0.1:{s.port}" for s in servers])
        async with grpc.aio.insecure_channel(f"127.0.0.1:{router.port}") as channel:
            stub = router_pb2_grpc.RouterStub(channel)

            async def stream(k: int) -> list[common_pb2.GenerateResponse]:
                request = common_pb2.GenerateRequest(
                    request_id=f"s{k}",
                    prompt_token_ids=common_pb2.PromptTokenIds(ids=[k]),
                    params=common_pb2.SamplingParams(max_new_tokens=TOKENS + k % 3),
                )
                return [r async for r in stub.Generate(request, timeout=30)]

            results = await asyncio.gather(*(stream(k) for k in range(1, STREAMS + 1)))
    finally:
        for server in servers:
            await server.stop(None)
    for k, responses in enumerate(results, start=1):
        total = TOKENS + k % 3
        expected = chunks(total)
        # The oracle is the worker's own sequence, computed here, not read from the router.
        assert [list(r.token_ids) for r in responses] == [
            [token(k, p) for p in positions] for positions in expected
        ], f"stream {k}"
        assert "".join(r.text for r in responses) == "".join(
            f"<{token(k, p)}>" for p in range(total)
        )
        assert [lp for r in responses for lp in r.logprobs] == [-float(p) for p in range(total)]
        assert {r.request_id for r in responses} == {f"s{k}"}
        finishes = [r.finish_reason for r in responses]
        assert finishes == [common_pb2.FINISH_REASON_UNSPECIFIED] * (len(expected) - 1) + [
            common_pb2.LENGTH
        ]
        assert responses[-1].usage.completion_tokens == total
