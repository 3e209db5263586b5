"""Summaries of hand-made request records: each number as the README defines it."""

from __future__ import annotations

import pytest

from benchmarks.serving.metrics import PoolTimeline, RequestRecord, StepLog, summarize
from services.gpu_worker.engine.engine import StepResult
from services.gpu_worker.memory.memory_pool import PoolStats


def record(
    arrival: float, first: float | None, finish: float | None, tokens: int, error: str = ""
) -> RequestRecord:
    return RequestRecord(0, 0, arrival, tokens, first, finish, tokens, error)


def test_summary_of_finished_and_failed_requests() -> None:
    records = [
        record(0.0, 1.0, 3.0, 10),  # TTFT 1, latency 3
        record(1.0, 8.0, 9.0, 20),  # TTFT 7: misses a 6 s SLO
        record(2.0, 2.5, None, 5, error="aborted"),  # failed after 5 tokens
        record(3.0, None, None, 0, error="not sent"),
    ]
    s = summarize(records, duration_s=10.0, slo_s=6.0, hits=3, misses=1)
    assert (s["num_requests"], s["finished"], s["failed"]) == (4, 2, 2)
    assert s["errors"] == ["aborted", "not sent"]
    assert s["throughput_req_s"] == pytest.approx(0.2)
    assert s["tokens"] == 35 and s["throughput_tok_s"] == pytest.approx(3.5)
    assert s["avg_latency_s"] == pytest.approx(5.5)  # finished ones: 3 and 8
    assert s["p50_latency_s"] == pytest.approx(5.5)
    assert s["p99_latency_s"] == pytest.approx(3 + 0.99 * 5)
    assert s["avg_ttft_s"] == pytest.approx((1 + 7 + 0.5) / 3)  # whoever got a first token
    assert s["slo_attainment"] == pytest.approx(1 / 4)  # only the first: failed ones miss
    assert s["cache_hit_rate"] == pytest.approx(0.75)


def test_distinct_adapters_count_those_the_finished_requests_were_served_with() -> None:
    records = [
        RequestRecord(0, 3, 0.0, 2, 0.1, 0.2, 2),
        RequestRecord(1, 3, 0.1, 2, 0.2, 0.3, 2),  # adapter 3 again: counted once
        RequestRecord(2, 7, 0.2, 2, 0.3, 0.4, 2),
        RequestRecord(3, 9, 0.3, 2, 0.4, None, 1, error="aborted"),  # asked for, not served
        RequestRecord(4, 11, 0.4, 2, 0.5, 0.6, 2),
    ]
    s = summarize(records, duration_s=1.0, slo_s=6.0)
    assert s["distinct_adapters"] == 3  # 3, 7 and 11
    assert s["distinct_adapters_requested"] == 4  # and 9


def test_empty_values_are_none() -> None:
    s = summarize([record(0.0, None, None, 0, error="x")], 1.0, 6.0)
    assert s["avg_latency_s"] is None and s["p99_ttft_s"] is None
    assert s["cache_hit_rate"] is None and s["slo_attainment"] == 0.0


def test_pool_timeline_summary_keeps_at_most_max_points() -> None:
    pool = PoolTimeline()
    for i in range(500):
        # Promises shrink as the KV they promised is taken; 3 running, then waiting grows.
        stats = PoolStats(1000, 1000 - i, kv_slots=i, adapter_slots=100, promised_slots=500 - i)
        pool.add(i * 0.01, stats, running=3, waiting=i // 100)
    s = pool.summary(max_points=50)
    assert s["samples"] == 500 and len(s["timeline"]) == 50
    assert s["peak_kv_slots"] == 499 and s["peak_adapter_slots"] == 100
    assert s["peak_used_frac"] == pytest.approx(0.599)
    assert s["peak_committed_frac"] == pytest.approx(0.6)  # 100 + i + (500 - i)
    assert (s["peak_running"], s["peak_waiting"]) == (3, 4)
    assert s["mean_waiting"] == pytest.approx(2.0)
    assert s["timeline"][0] == [0.0, 0, 100, 500, 3, 0]
    assert s["timeline"][-1] == [4.99, 499, 100, 1, 3, 4]
    assert PoolTimeline().summary() == {}


def test_step_log_splits_decode_and_mixed_steps() -> None:
    log = StepLog()
    log.add(0.010, StepResult(0, 4, 4, graph=True), 0.008, 0.002)
    log.add(0.030, StepResult(0, 4, 4, graph=False), 0.004, 0.010)
    # A 100-token prompt joins 3 decodes.
    log.add(0.060, StepResult(1, 3, 103, graph=False), 0.001, 0.050)
    log.add(0.005, None, 0.0, 0.005)  # a step that ran nothing is not a step
    s = log.summary()
    assert s["decode"]["steps"] == 2 and s["mixed"]["steps"] == 1
    assert s["decode"]["avg_ms"] == pytest.approx(20.0)
    assert s["decode"]["avg_wait_ms"] == pytest.approx(6.0)
    assert s["mixed"]["avg_wait_ms"] == pytest.approx(1.0)
    assert (s["decode"]["avg_cpu_ms"], s["mixed"]["avg_cpu_ms"]) == pytest.approx((6.0, 50.0))
    assert s["decode"]["graph_share"] == pytest.approx(0.5)
    assert s["decode"]["time_share"] == pytest.approx(0.4)
    assert s["mixed"]["time_share"] == pytest.approx(0.6)
    assert (s["mixed"]["avg_seqs"], s["mixed"]["avg_tokens"]) == (4.0, 103.0)
    assert StepLog().summary() == {"decode": {"steps": 0}, "mixed": {"steps": 0}}
