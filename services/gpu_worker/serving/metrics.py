"""The worker's Prometheus metrics: per-request ones fed by the servicer's Generate, and load,
memory-pool and adapter-cache ones read from the same numbers `GetStats` reports.

The engine's state is read on the event loop only (as GetStats does), never on the scrape
thread: a refresher task stores a snapshot that scrapes then read.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from manylora.v1 import gpu_worker_pb2
from services.common.metrics import (
    PREFIX,
    GenerationMetrics,
    StreamTracker,
    start_metrics_server,
)
from services.common.tasks import cancel_task

logger = logging.getLogger(__name__)

StatsSource = Callable[[], gpu_worker_pb2.GetStatsResponse]


def _fraction(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


class _StatsCollector(Collector):
    def __init__(self) -> None:
        self.stats: gpu_worker_pb2.GetStatsResponse | None = None

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        s = self.stats
        if s is None:
            return
        used = s.total_slots - s.free_slots
        gauges = {
            "num_requests_running": ("Requests being prefilled or decoded.", s.running_requests),
            "num_requests_waiting": ("Requests queued in the engine.", s.waiting_requests),
            "pool_slots_total": ("Slots of the memory pool.", s.total_slots),
            "pool_slots_free": ("Free slots of the memory pool.", s.free_slots),
            "pool_usage_perc": (
                "Fraction of pool slots in use (KV cache and adapters).",
                _fraction(used, s.total_slots),
            ),
            "kv_cache_usage_perc": (
                "Fraction of pool slots holding KV cache.",
                _fraction(s.kv_slots, s.total_slots),
            ),
            "adapter_slots": ("Pool slots holding adapter weights.", s.adapter_slots),
            "pool_slots_promised": (
                "KV slots promised to admitted requests and not allocated yet.",
                s.promised_slots,
            ),
            "num_resident_adapters": ("Adapters on the GPU.", len(s.resident_adapters)),
            "num_host_cached_adapters": (
                "Adapters in host memory.",
                len(s.host_cached_adapters),
            ),
        }
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(PREFIX + name, doc, value=value)
        counters = {
            "adapter_cache_hits": ("Adapter lookups served from memory.", s.adapter_cache_hits),
            "adapter_cache_misses": ("Adapter lookups that loaded.", s.adapter_cache_misses),
            "adapter_evictions": ("Adapters evicted from the GPU.", s.adapter_evictions),
            "engine_decode_steps": ("Engine steps that decoded only.", s.decode_steps),
            "engine_decode_step_seconds": (
                "Seconds the engine thread spent in decode-only steps.",
                s.decode_step_seconds,
            ),
            "engine_prompt_steps": ("Engine steps that ran prompt chunks.", s.prompt_steps),
            "engine_prompt_step_seconds": (
                "Seconds the engine thread spent in steps with prompt chunks.",
                s.prompt_step_seconds,
            ),
            "engine_decode_step_wait_seconds": (
                "Of the decode-only steps' seconds, those spent waiting for the device.",
                s.decode_step_wait_seconds,
            ),
            "engine_prompt_step_wait_seconds": (
                "Of the prompt steps' seconds, those spent waiting for the device.",
                s.prompt_step_wait_seconds,
            ),
            "engine_decode_step_cpu_seconds": (
                "Of the decode-only steps' seconds, the engine thread's CPU time.",
                s.decode_step_cpu_seconds,
            ),
            "engine_prompt_step_cpu_seconds": (
                "Of the prompt steps' seconds, the engine thread's CPU time.",
                s.prompt_step_cpu_seconds,
            ),
            "engine_decode_step_tokens": ("Tokens decode-only steps ran.", s.decode_step_tokens),
            "engine_prompt_step_tokens": (
                "Tokens steps with prompt chunks ran (prompt chunks and decodes).",
                s.prompt_step_tokens,
            ),
            "engine_kernel_compiles": (
                "Triton kernels compiled during engine steps (each stalls its batch).",
                s.kernel_compiles,
            ),
            "engine_kernel_compile_seconds": (
                "Seconds those compilations took.",
                s.kernel_compile_seconds,
            ),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(PREFIX + name, doc, value=value)


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.generation = GenerationMetrics(self.registry)
        self._stats = _StatsCollector()
        self.registry.register(self._stats)

    def track(self) -> StreamTracker:
        return self.generation.track(queue_time_from_usage=True)

    def observe_stats(self, stats: gpu_worker_pb2.GetStatsResponse) -> None:
        self._stats.stats = stats

    async def refresh_forever(self, source: StatsSource, interval_s: float = 1.0) -> None:
        """Keep the snapshot fresh between GetStats calls."""
        while True:
            try:
                self.observe_stats(source())
            except Exception:
                logger.exception("reading stats for metrics failed")
            await asyncio.sleep(interval_s)


async def serve_worker_metrics(
    metrics: WorkerMetrics, port: int, host: str, source: StatsSource
) -> Callable[[], Awaitable[None]]:
    """Serve `/metrics` on host:port with a fresh stats snapshot; returns what stops it."""
    server = start_metrics_server(port, metrics.registry, host)
    refresher = asyncio.create_task(metrics.refresh_forever(source), name="metrics-refresh")
    logger.info("metrics on http://%s:%d/metrics", host, server.port)

    async def stop() -> None:
        await cancel_task(refresher)
        await asyncio.to_thread(server.stop)

    return stop
