"""What a serving run measures: per-request timings, pool usage over time, and their summary.

Times are seconds from the run's start (the trace's time 0). A request's latency and time to
first token count from its *scheduled* arrival in the trace, so time a busy replay loop takes
to get to it counts as queueing, as it would for a real client.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from services.gpu_worker.engine.engine import StepResult
from services.gpu_worker.memory.memory_pool import PoolStats


@dataclass
class RequestRecord:
    index: int
    adapter: int
    arrival_s: float
    output_len: int  # tokens the trace asks for
    first_token_s: float | None = None
    finish_s: float | None = None
    tokens: int = 0  # tokens received
    error: str = ""
    # From its arrival at the worker's engine to its first token, and to its admission, as
    # the worker reported them (through the stack): TTFT less the first is the time spent
    # before the engine and on the way back; the second is its wait in the engine's queue.
    engine_ttft_s: float | None = None
    engine_queue_s: float | None = None

    @property
    def finished(self) -> bool:
        return self.finish_s is not None and not self.error

    def on_tokens(self, now: float, count: int) -> None:
        if count and self.first_token_s is None:
            self.first_token_s = now
        self.tokens += count


@dataclass
class PoolTimeline:
    """Pool occupancy and the engine's running and waiting requests, sampled during a run
    (every engine step in-process; GetStats polled through the stack). What admission counts
    as taken is the held slots plus the promised ones (`committed`): when it nears the pool,
    requests wait however little KV they hold."""

    times: list[float] = field(default_factory=list)
    kv_slots: list[int] = field(default_factory=list)
    adapter_slots: list[int] = field(default_factory=list)
    promised_slots: list[int] = field(default_factory=list)
    running: list[int] = field(default_factory=list)
    waiting: list[int] = field(default_factory=list)
    total_slots: int = 0

    def add(self, now: float, stats: PoolStats, running: int, waiting: int) -> None:
        self.times.append(now)
        self.kv_slots.append(stats.kv_slots)
        self.adapter_slots.append(stats.adapter_slots)
        self.promised_slots.append(stats.promised_slots)
        self.running.append(running)
        self.waiting.append(waiting)
        self.total_slots = stats.total_slots

    def summary(self, max_points: int = 100) -> dict[str, Any]:
        if not self.times:
            return {}
        used = np.array(self.kv_slots) + np.array(self.adapter_slots)
        committed = used + np.array(self.promised_slots)
        # Keep at most max_points evenly spaced samples so result lines stay small.
        keep = np.unique(np.linspace(0, len(self.times) - 1, max_points).astype(int))
        return {
            "total_slots": self.total_slots,
            "samples": len(self.times),
            "peak_used_frac": float(used.max() / self.total_slots),
            "mean_used_frac": float(used.mean() / self.total_slots),
            "peak_committed_frac": float(committed.max() / self.total_slots),
            "peak_kv_slots": int(max(self.kv_slots)),
            "peak_adapter_slots": int(max(self.adapter_slots)),
            "peak_running": int(max(self.running)),
            "peak_waiting": int(max(self.waiting)),
            "mean_waiting": float(np.mean(self.waiting)),
            # [time, kv, adapter, promised slots, running, waiting]
            "timeline": [
                [
                    round(self.times[i], 3),
                    self.kv_slots[i],
                    self.adapter_slots[i],
                    self.promised_slots[i],
                    self.running[i],
                    self.waiting[i],
                ]
                for i in keep
            ],
        }


@dataclass
class StepLog:
    """Wall time of every engine step, by kind: `decode` steps (decode rows only) and `mixed`
    steps (with a prefill, which run without CUDA graphs). On the GPU a step ends with the
    sampled tokens on the host, so its wall time includes its device time."""

    seconds: list[float] = field(default_factory=list)
    waits: list[float] = field(default_factory=list)  # of `seconds`, waiting for the device
    cpus: list[float] = field(default_factory=list)  # of `seconds`, the stepping thread's CPU
    infos: list[StepResult] = field(default_factory=list)

    def add(
        self, seconds: float, info: StepResult | None, wait_seconds: float, cpu_seconds: float
    ) -> None:
        if info is not None:  # a step that ran nothing
            self.seconds.append(seconds)
            self.waits.append(wait_seconds)
            self.cpus.append(cpu_seconds)
            self.infos.append(info)

    def summary(self) -> dict[str, Any]:
        kinds = {
            "decode": [i for i, info in enumerate(self.infos) if info.prefill_seqs == 0],
            "mixed": [i for i, info in enumerate(self.infos) if info.prefill_seqs > 0],
        }
        total = sum(self.seconds)
        return {kind: self._kind(rows, total) for kind, rows in kinds.items()}

    def _kind(self, rows: list[int], total_s: float) -> dict[str, Any]:
        if not rows:
            return {"steps": 0}
        ms = np.array([self.seconds[i] for i in rows]) * 1e3
        infos = [self.infos[i] for i in rows]
        return {
            "steps": len(rows),
            "time_share": float(ms.sum() / 1e3 / total_s) if total_s > 0 else None,
            "avg_ms": float(ms.mean()),
            "avg_wait_ms": float(np.mean([self.waits[i] for i in rows]) * 1e3),
            "avg_cpu_ms": float(np.mean([self.cpus[i] for i in rows]) * 1e3),
            "p50_ms": float(np.percentile(ms, 50)),
            "p99_ms": float(np.percentile(ms, 99)),
            "avg_seqs": float(np.mean([i.prefill_seqs + i.decode_seqs for i in infos])),
            "avg_tokens": float(np.mean([i.tokens for i in infos])),
            "graph_share": float(np.mean([i.graph for i in infos])),
        }


def _engine_ttft(records: list[RequestRecord]) -> dict[str, float | None]:
    """The engine's own TTFT and queue-wait statistics, where the records carry them (runs
    through gRPC)."""
    ttfts = [r.engine_ttft_s for r in records if r.engine_ttft_s is not None]
    queued = [r.engine_queue_s for r in records if r.engine_queue_s is not None]
    if not ttfts:
        return {}
    return {**_stats(ttfts, "engine_ttft_s"), **_stats(queued, "engine_queue_s")}


def _stats(values: list[float], prefix: str) -> dict[str, float | None]:
    if not values:
        return {f"avg_{prefix}": None, f"p50_{prefix}": None, f"p99_{prefix}": None}
    arr = np.array(values)
    return {
        f"avg_{prefix}": float(arr.mean()),
        f"p50_{prefix}": float(np.percentile(arr, 50)),
        f"p99_{prefix}": float(np.percentile(arr, 99)),
    }


def summarize(
    records: list[RequestRecord],
    duration_s: float,
    slo_s: float,
    hits: int | None = None,
    misses: int | None = None,
) -> dict[str, Any]:
    """Throughput over `duration_s` (run start to end), latency and TTFT of finished
    requests, SLO attainment over all requests (a failed one misses it), cache hit rate, and
    how many distinct adapters the finished requests were served with (a trace of n adapters
    with a steep popularity asks for far fewer than n in a short run)."""
    done = [r for r in records if r.finished]
    ttfts = [r.first_token_s - r.arrival_s for r in records if r.first_token_s is not None]
    in_slo = sum(
        1
        for r in records
        if r.first_token_s is not None and not r.error and r.first_token_s - r.arrival_s <= slo_s
    )
    lookups = (hits or 0) + (misses or 0)
    return {
        "num_requests": len(records),
        "finished": len(done),
        "failed": len(records) - len(done),
        "errors": sorted({r.error for r in records if r.error})[:5],
        "distinct_adapters": len({r.adapter for r in done}),
        "distinct_adapters_requested": len({r.adapter for r in records}),
        "duration_s": duration_s,
        "tokens": sum(r.tokens for r in records),
        "throughput_req_s": len(done) / duration_s if duration_s > 0 else 0.0,
        "throughput_tok_s": sum(r.tokens for r in records) / duration_s if duration_s > 0 else 0.0,
        **_stats([r.finish_s - r.arrival_s for r in done if r.finish_s is not None], "latency_s"),
        **_stats(ttfts, "ttft_s"),
        **_engine_ttft(records),
        "slo_s": slo_s,
        "slo_attainment": in_slo / len(records) if records else None,
        "cache_hits": hits,
        "cache_misses": misses,
        "cache_hit_rate": hits / lookups if hits is not None and lookups else None,
    }
