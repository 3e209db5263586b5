"""A worker's engine steps over a run of the deployed stack, from its GetStats counters (the
in-process runs time each step themselves: metrics.StepLog)."""

from __future__ import annotations

from typing import Any

import grpc

from manylora.v1 import gpu_worker_pb2, gpu_worker_pb2_grpc


async def worker_stats(address: str) -> gpu_worker_pb2.GetStatsResponse:
    """The worker's GetStats now (host:port)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)
        return await stub.GetStats(gpu_worker_pb2.GetStatsRequest(), timeout=10)


def steps_between(
    start: gpu_worker_pb2.GetStatsResponse, end: gpu_worker_pb2.GetStatsResponse
) -> dict[str, Any]:
    """Steps and mean step time, by kind, between two GetStats answers of one worker, in the
    form of `StepLog.summary` (what GetStats counts: no sequences or percentiles)."""
    kinds = {
        "decode": (
            end.decode_steps - start.decode_steps,
            end.decode_step_seconds - start.decode_step_seconds,
        ),
        "mixed": (
            end.prompt_steps - start.prompt_steps,
            end.prompt_step_seconds - start.prompt_step_seconds,
        ),
    }
    total = sum(seconds for _, seconds in kinds.values())
    return {
        kind: {
            "steps": steps,
            "avg_ms": seconds / steps * 1e3,
            "time_share": seconds / total if total > 0 else None,
        }
        if steps
        else {"steps": 0}
        for kind, (steps, seconds) in kinds.items()
    }
