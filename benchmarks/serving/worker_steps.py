"""A worker's engine steps over a run of the deployed stack, from its GetStats counters (the
in-process runs time each step themselves: metrics.StepLog)."""

from __future__ import annotations

import asyncio
import time
from typing import Any, NamedTuple

import grpc

from benchmarks.serving.metrics import PoolTimeline
from manylora.v1 import gpu_worker_pb2, gpu_worker_pb2_grpc
from services.gpu_worker.memory.memory_pool import PoolStats


async def worker_stats(address: str) -> gpu_worker_pb2.GetStatsResponse:
    """The worker's GetStats now (host:port)."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)
        return await stub.GetStats(gpu_worker_pb2.GetStatsRequest(), timeout=10)


async def poll_worker(address: str, timeline: PoolTimeline, interval_s: float = 0.1) -> None:
    """Sample the worker's pool and its running and waiting requests into `timeline` every
    `interval_s` (times from the first sample), until cancelled."""
    start = time.perf_counter()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = gpu_worker_pb2_grpc.GpuWorkerStub(channel)
        while True:
            try:
                s = await stub.GetStats(gpu_worker_pb2.GetStatsRequest(), timeout=10)
            except grpc.aio.AioRpcError:  # a gap in the timeline; the run's records tell more
                await asyncio.sleep(interval_s)
                continue
            pool = PoolStats(
                s.total_slots, s.free_slots, s.kv_slots, s.adapter_slots, s.promised_slots
            )
            timeline.add(time.perf_counter() - start, pool, s.running_requests, s.waiting_requests)
            await asyncio.sleep(interval_s)


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
    total = sum(delta.seconds for delta in kinds.values())
    return {
        kind: {
            "steps": d.steps,
            "avg_ms": d.seconds / d.steps * 1e3,
            "avg_wait_ms": d.wait / d.steps * 1e3,
            "avg_cpu_ms": d.cpu / d.steps * 1e3,
            "avg_tokens": d.tokens / d.steps,
            "time_share": d.seconds / total if total > 0 else None,
        }
        if d.steps
        else {"steps": 0}
        for kind, d in kinds.items()
    }


class _Delta(NamedTuple):
    steps: int
    seconds: float
    wait: float  # for the device
    cpu: float  # the engine thread's
    tokens: int


def _delta(
    start: gpu_worker_pb2.GetStatsResponse, end: gpu_worker_pb2.GetStatsResponse, prefix: str
) -> _Delta:
    """One kind's counters between the two answers."""
    names = ("steps", "step_seconds", "step_wait_seconds", "step_cpu_seconds", "step_tokens")
    steps, seconds, wait, cpu, tokens = (
        getattr(end, f"{prefix}_{n}") - getattr(start, f"{prefix}_{n}") for n in names
    )
    return _Delta(int(steps), float(seconds), float(wait), float(cpu), int(tokens))
