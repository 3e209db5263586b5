"""The serving benchmark in-process on the CPU with the tiny dummy model: short traces."""

from __future__ import annotations

import dataclasses
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks import serving_bench
from benchmarks.serving import inprocess
from benchmarks.serving.engine_setup import EngineVariant, build_engine, build_model
from benchmarks.serving.metrics import StepLog
from benchmarks.synthetic_adapters import AdapterBank
from benchmarks.workload import PRESETS, Trace, TraceRequest, generate
from services.common.lora_format import CanonicalAdapter
from services.gpu_worker.engine import sampling_draw
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.forward_batch import ForwardBatch
from services.gpu_worker.engine.sampling import SamplingOptions, request_seed, sample

# About 20 requests over 1.4 s for 10 adapters of ranks 8 and 16; on the CPU also where a GPU
# is present (the device runs the CPU suite too).
TRACE_ARGS = shlex.split(
    "--preset tiny --rate 15 --duration 1.4 --seed 1 --no-progress --device cpu"
)


@pytest.fixture(scope="module")
def trace() -> Trace:
    params = dataclasses.replace(PRESETS["tiny"], rate=15.0, duration_s=1.4, seed=1)
    trace = generate(params)
    assert 15 <= len(trace.requests) <= 30
    return trace


def test_replay_finishes_every_request_and_times_it(trace: Trace) -> None:
    device = torch.device("cpu")
    model = build_model("tiny", device)
    engine = build_engine(model, EngineVariant(), EngineConfig(max_rank=16))
    bank = AdapterBank(model.config.shape, trace.params.rank_of, torch.float32, device)

    def adapter_for(req: TraceRequest) -> CanonicalAdapter:
        return bank.adapter(req.adapter, req.adapter_id)

    steps = StepLog()
    records, duration, pool = inprocess.replay(
        engine, trace, adapter_for, progress=False, steps=steps
    )
    assert len(records) == len(trace.requests)
    for record, req in zip(records, trace.requests, strict=True):
        assert record.finished, record.error
        assert record.tokens == req.output_len
        assert record.first_token_s is not None and record.finish_s is not None
        assert req.arrival_s <= record.first_token_s <= record.finish_s <= duration
    assert duration >= trace.requests[-1].arrival_s
    assert pool.times and max(pool.kv_slots) > 0 and max(pool.adapter_slots) > 0
    assert not engine.has_work()
    assert engine.adapters.hits + engine.adapters.misses == len(records)
    # Every step that ran is timed once: each prompt went through one mixed step, and each
    # later token through a decode or mixed step.
    assert len(steps.seconds) == engine.steps
    assert sum(info.prefill_seqs for info in steps.infos) == len(records)
    decoded = sum(info.decode_seqs for info in steps.infos)
    assert decoded == sum(r.output_len - 1 for r in trace.requests)
    summary = steps.summary()
    assert summary["decode"]["steps"] + summary["mixed"]["steps"] == engine.steps
    assert summary["mixed"]["avg_tokens"] > summary["mixed"]["avg_seqs"]  # prompts are long
    # The steps' waits for the device are the engine's own count (less the read-back of the
    # last step, after the replay's steps), each within its step.
    assert 0 < sum(steps.waits) <= engine.device_wait_seconds
    assert all(0 <= w < s for w, s in zip(steps.waits, steps.seconds, strict=True))
    assert 0 < summary["decode"]["avg_wait_ms"] < summary["decode"]["avg_ms"]
    # The stepping thread's CPU time, within each step (thread_time ticks coarser than the
    # wall clock on some kernels: a millisecond of slack).
    assert all(0 <= c <= s + 1e-3 for c, s in zip(steps.cpus, steps.seconds, strict=True))
    assert summary["mixed"]["avg_cpu_ms"] > 0


def test_cli_runs_each_engine_variant_with_consistent_metrics(tmp_path: Path, trace: Trace) -> None:
    out = tmp_path / "results.jsonl"
    variants = "manylora,no-unified-pool,bmm"
    rows = serving_bench.main([*TRACE_ARGS, "--variant", variants, "--out", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert [r["variant"] for r in rows] == ["manylora", "no-unified-pool", "bmm"]
    wanted = sum(r.output_len for r in trace.requests)
    for row in rows:
        assert row["mode"] == "inprocess"
        assert row["num_requests"] == row["finished"] == len(trace.requests)
        assert row["failed"] == 0 and row["errors"] == []
        assert row["distinct_adapters"] == len({r.adapter for r in trace.requests})
        assert row["tokens"] == wanted
        assert row["throughput_req_s"] == pytest.approx(row["finished"] / row["duration_s"])
        assert row["throughput_tok_s"] == pytest.approx(wanted / row["duration_s"])
        assert row["duration_s"] >= trace.requests[-1].arrival_s
        assert row["avg_latency_s"] >= row["avg_ttft_s"] >= 0
        assert row["p99_latency_s"] >= row["p50_latency_s"] >= row["p50_ttft_s"] >= 0
        assert row["p99_ttft_s"] >= row["p50_ttft_s"]
        assert row["cache_hits"] + row["cache_misses"] == len(trace.requests)
        assert 0 < row["pool"]["peak_used_frac"] <= row["pool"]["peak_committed_frac"] <= 1
        assert 1 <= row["pool"]["peak_running"] <= row["max_num_seqs"]
        assert row["pool"]["peak_adapter_slots"] > 0


def test_a_timeout_cuts_the_run_and_counts_what_did_not_finish(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    args = shlex.split(
        "--preset tiny --rate 40 --duration 10 --timeout 0.5 --no-progress --device cpu"
    )
    (row,) = serving_bench.main([*args, "--out", str(out)])
    # Cut off long before the 10 s of arrivals end (the bound leaves room for a loaded CPU).
    assert 0.5 <= row["duration_s"] < 5
    assert row["failed"] > 0 and row["finished"] + row["failed"] == row["num_requests"]
    assert any("timeout" in e for e in row["errors"])
    assert row["slo_attainment"] <= row["finished"] / row["num_requests"] + 1e-9


def test_a_sweep_runs_every_combination_on_repeatable_traces(tmp_path: Path) -> None:
    args = shlex.split(
        "--preset tiny --duration 0.6 --num-adapters 2,50 --rate 8,16 --no-progress --device cpu"
    )
    rows = serving_bench.main([*args, "--out", str(tmp_path / "r.jsonl")])
    combos = [(r["num_adapters"], r["rate"]) for r in rows]
    assert combos == [(2, 8.0), (2, 16.0), (50, 8.0), (50, 16.0)]
    assert all(r["failed"] == 0 for r in rows)
    # Same seed: arrivals depend only on the rate, so both adapter counts see the same ones.
    assert rows[0]["num_requests"] == rows[2]["num_requests"]
    assert rows[1]["num_requests"] == rows[3]["num_requests"]


def test_a_refused_request_fails_and_the_others_still_finish() -> None:
    params = dataclasses.replace(PRESETS["tiny"], num_adapters=2)
    # The second prompt is longer than the tiny model's context of 1024 tokens.
    requests = [TraceRequest(i, 0.01 * i, i % 2, 8, n, 4) for i, n in enumerate((8, 2000, 9))]
    engine = build_engine(
        build_model("tiny", torch.device("cpu")), EngineVariant(), EngineConfig(max_rank=8)
    )
    records, _, _ = inprocess.replay(
        engine, Trace(params, requests), lambda r: None, progress=False
    )
    assert [r.finished for r in records] == [True, False, True]
    assert records[1].error.startswith("InvalidArgument") and records[1].tokens == 0


def test_warm_up_runs_mixed_steps_with_adapters_and_leaves_them_out_of_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The eager mixed step (prompts beside decodes, with adapters) compiles kernels that
    prompt-only steps never launch: the warm-up must run one, then free its adapters."""
    device = torch.device("cpu")
    model = build_model("tiny", device)
    engine = build_engine(model, EngineVariant(), EngineConfig(max_rank=16))
    bank = AdapterBank(model.config.shape, {0: 8, 1: 16}.__getitem__, torch.float32, device)
    adapters = [bank.adapter(k, f"warmup-{k}") for k in range(2)]
    build = engine.batches.build
    mixed_with_adapters = 0

    def watched(*args: Any, **kwargs: Any) -> ForwardBatch:
        nonlocal mixed_with_adapters
        batch = build(*args, **kwargs)
        lens = batch.host_q_lens
        if min(lens) == 1 < max(lens) and batch.max_rank > 0:
            mixed_with_adapters += 1
        return batch

    monkeypatch.setattr(engine.batches, "build", watched)
    inprocess.warm_up(engine, adapters, (5, 40))
    assert mixed_with_adapters >= 1
    assert not engine.has_work()
    assert engine.adapters.resident_ids() == ()


@pytest.mark.parametrize(
    "flags, label",
    [
        (["--sampled"], "T 0.8, p 0.9, k 50"),
        (["--sampling", "T 0.8, p 0.9", "--whole-sort"], "T 0.8, p 0.9, whole-row sort"),
    ],
)
def test_sampled_runs_finish_every_request_and_say_how_they_sampled(
    tmp_path: Path, trace: Trace, flags: list[str], label: str
) -> None:
    out = tmp_path / "results.jsonl"
    (row,) = serving_bench.main([*TRACE_ARGS, *flags, "--out", str(out)])
    assert row["sampling"] == label
    assert row["finished"] == len(trace.requests) and row["failed"] == 0
    assert row["tokens"] == sum(r.output_len for r in trace.requests)
    assert sampling_draw.NUCLEUS_WIDTH == 1024  # the experiment's switch is put back


@pytest.mark.parametrize("spread", [0.3, 8.0], ids=["wide-nucleus", "narrow-nucleus"])
def test_whole_row_sort_draws_the_same_tokens(spread: float) -> None:
    """The top-p experiment changes when whole rows are sorted, never a token: a flat row's
    nucleus is wider than the 1,024 best tokens, a peaked row's narrower."""
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 4096, generator=gen) * spread
    options = [
        SamplingOptions(max_new_tokens=1, temperature=0.8, top_p=0.9, seed=i) for i in range(6)
    ]
    seeds, steps = [request_seed(o) for o in options], list(range(6))
    default = sample(logits, options, seeds, steps).token_ids
    with inprocess.whole_row_sort(True):
        whole = sample(logits, options, seeds, steps).token_ids
    assert whole == default
