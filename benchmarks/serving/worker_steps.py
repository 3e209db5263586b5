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
    """Steps, mean step time, mean wait for the device within it and mean tokens, by kind,
    between two GetStats answers of one worker, in the form of `StepLog.summary` (what
    GetStats counts: no sequences or percentiles)."""
    kinds = {
        kind: _delta(start, end, prefix)
        for kind, prefix in (("decode", "decode"), ("mixed", "prompt"))
    }
    total = sum(seconds for _, seconds, _, _ in kinds.values())
    return {
        kind: {
            "steps": steps,
            "avg_ms": seconds / steps * 1e3,
            "avg_wait_ms": wait / steps * 1e3,
            "avg_tokens": tokens / steps,
            "time_share": seconds / total if total > 0 else None,
        }
        if steps
        else {"steps": 0}
        for kind, (steps, seconds, wait, tokens) in kinds.items()
    }


def _delta(
    start: gpu_worker_pb2.GetStatsResponse, end: gpu_worker_pb2.GetStatsResponse, prefix: str
) -> tuple[int, float, float, int]:
    """(steps, seconds, wait seconds, tokens) of one kind between the two answers."""
    names = ("steps", "step_seconds", "step_wait_seconds", "step_tokens")
    steps, seconds, wait, tokens = (
        getattr(end, f"{prefix}_{n}") - getattr(start, f"{prefix}_{n}") for n in names
    )
    return int(steps), float(seconds), float(wait), int(tokens)
