"""The serving benchmark through the whole stack (store, worker, router) on the CPU."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from benchmarks import serving_bench, workload
from benchmarks.serving import grpc_replay
from benchmarks.serving.worker_steps import worker_stats
from benchmarks.workload import load
from services.common.grpc_server import free_port
from tests.e2e.stack import Stack, stack_at

REPO = Path(__file__).resolve().parents[2]


def test_grpc_mode_serves_every_request_with_its_token_count(tmp_path: Path) -> None:
    trace_file = tmp_path / "trace.jsonl"
    workload.main(
        [*shlex.split("--preset tiny --rate 12 --duration 1.5 --seed 2 --out"), str(trace_file)]
    )
    trace = load(trace_file)
    assert len(trace.requests) >= 10
    out = tmp_path / "results.jsonl"
    args = ["--trace", str(trace_file), "--mode", "grpc", "--device", "cpu", "--no-progress"]
    args += ["--out", str(out)]
    (row,) = serving_bench.main(args)
    assert json.loads(out.read_text()) == row
    assert row["mode"] == "grpc" and row["variant"] == "manylora"
    assert row["num_requests"] == row["finished"] == len(trace.requests)
    assert row["failed"] == 0 and row["errors"] == []
    # Every stream ended with finish reason "length" (anything else counts as an error), and
    # no stream can carry more than its max_new_tokens: so each got exactly its output_len.
    assert row["tokens"] == sum(r.output_len for r in trace.requests)
    assert row["avg_latency_s"] >= row["avg_ttft_s"] > 0
    # The engine's own share of the TTFT, from each stream's usage: some, never all of it
    # (the request reached the engine through gRPC, the token came back the same way).
    assert 0 < row["avg_engine_ttft_s"] < row["avg_ttft_s"]
    assert 0 <= row["avg_engine_queue_s"] < row["avg_engine_ttft_s"]
    # The warm-up's requests are not counted; each trace request looks its adapter up once.
    assert row["cache_hits"] + row["cache_misses"] == len(trace.requests)
    assert row["pool"]["samples"] > 0


def test_grpc_mode_with_warm_adapters_loads_none_inside_the_timed_run(tmp_path: Path) -> None:
    """--warm-adapters in the benchmark's own stack: each trace adapter was asked for once
    before the clock started, so no request of the run waits for its adapter (the pool holds
    every tiny adapter), and the run is labelled warm."""
    cli = "--preset tiny --num-adapters 5 --rate 12 --duration 1 --seed 4 --mode grpc"
    cli += " --device cpu --no-progress --warm-adapters"
    (row,) = serving_bench.main([*shlex.split(cli), "--out", str(tmp_path / "r.jsonl")])
    assert row["variant"] == "manylora, adapters warm"
    assert row["finished"] == row["num_requests"] > 0 and row["failed"] == 0
    assert row["cache_misses"] == 0 and row["cache_hits"] == row["num_requests"]


@pytest.fixture
async def stack(tmp_path: Path) -> AsyncIterator[Stack]:
    """The stack, stopped when the test ends, a failing one too (an `async for` over the
    generator inside a test would leave it running when an assertion fails)."""
    async for running in stack_at(tmp_path):
        yield running


async def test_target_drives_a_running_router_after_uploading_to_its_store(
    tmp_path: Path, stack: Stack
) -> None:
    await stack.start_store()
    worker = await stack.start_worker()
    router = await stack.start_router()
    cli = "--preset tiny --num-adapters 4 --rate 10 --duration 1 --no-progress --device cpu"
    targets = ["--target", f"127.0.0.1:{router.port}", "--store-target", stack.store_address]
    targets += ["--worker-stats", f"127.0.0.1:{worker.port}"]
    out = ["--out", str(tmp_path / "r.jsonl")]
    args = serving_bench.parse_args([*shlex.split(cli), *targets, *out])
    results = serving_bench.Results(args.out)
    traces = list(serving_bench.traces(args))
    await serving_bench.run_against(traces, args, serving_bench.run_options(args), results)
    (row,) = results.rows
    assert row["mode"] == "grpc-remote" and row["variant"] == "remote"
    assert row["num_requests"] == row["finished"] == len(traces[0].requests) > 0
    assert row["tokens"] == sum(r.output_len for r in traces[0].requests)
    # The worker's pool and queues, polled through GetStats over the run.
    assert row["pool"]["samples"] > 0 and row["pool"]["peak_running"] >= 1
    # The worker's adapter lookups over the run: one per trace request, the warm-up's out.
    assert row["cache_hits"] + row["cache_misses"] == len(traces[0].requests)
    # The worker's own count of its steps over the run (the warm-up's left out): every
    # token after a request's first comes from a decode step, one a step.
    steps = row["steps"]
    assert steps["mixed"]["steps"] > 0 and steps["mixed"]["avg_ms"] > 0
    longest = max(r.output_len for r in traces[0].requests)
    assert steps["decode"]["steps"] >= longest - 1 and steps["decode"]["avg_ms"] > 0
    # Each trace token after a request's first runs in a decode step, and every prompt
    # token and first token in a mixed one (GetStats' token counts, through the proto).
    decode_tokens = steps["decode"]["avg_tokens"] * steps["decode"]["steps"]
    mixed_tokens = steps["mixed"]["avg_tokens"] * steps["mixed"]["steps"]
    prompt_tokens = sum(r.prompt_len for r in traces[0].requests)
    assert mixed_tokens >= prompt_tokens
    assert decode_tokens + mixed_tokens == pytest.approx(
        prompt_tokens + sum(r.output_len - 1 for r in traces[0].requests)
    )
    for kind in ("decode", "mixed"):
        assert 0 <= steps[kind]["avg_wait_ms"] < steps[kind]["avg_ms"]
        assert 0 < steps[kind]["avg_cpu_ms"] <= steps[kind]["avg_ms"] + 1


async def test_warm_adapters_has_the_worker_hold_every_trace_adapter_before_the_timed_run(
    tmp_path: Path, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--warm-adapters: when the timed replay starts, the worker's host cache already holds
    each adapter of the trace, which a fresh worker does not (a cold one downloads them inside
    the run), and the run says it was warm."""
    await stack.start_store()
    worker = await stack.start_worker()
    router = await stack.start_router()
    held: list[set[str]] = []
    replay = grpc_replay.replay

    async def replay_after_looking(*args: Any, **kwargs: Any) -> Any:
        stats = await worker_stats(f"127.0.0.1:{worker.port}")
        held.append(set(stats.host_cached_adapters))
        return await replay(*args, **kwargs)

    monkeypatch.setattr(grpc_replay, "replay", replay_after_looking)
    cli = "--preset tiny --num-adapters 6 --rate 10 --duration 1 --no-progress --device cpu"
    cli += f" --target 127.0.0.1:{router.port} --store-target {stack.store_address}"
    args = serving_bench.parse_args([*shlex.split(cli), "--out", str(tmp_path / "r.jsonl")])
    traces = list(serving_bench.traces(args))
    used = {workload.adapter_id(r.adapter) for r in traces[0].requests}
    before = await worker_stats(f"127.0.0.1:{worker.port}")
    assert not used & set(before.host_cached_adapters)
    results = serving_bench.Results(args.out)
    args.warm_adapters = True
    await serving_bench.run_against(traces, args, serving_bench.run_options(args), results)
    assert len(held) == 1 and used <= held[0]
    (row,) = results.rows
    assert row["variant"] == "remote, adapters warm" and row["failed"] == 0


def test_separate_processes_script_serves_the_trace(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    ports = {name: str(free_port()) for name in ("STORE_PORT", "WORKER_PORT", "ROUTER_PORT")}
    env = {
        **os.environ,
        **ports,
        "PYTHON": sys.executable,
        "WORKER_ARGS": "--max-rank 16",
        # Keep what is already there: the device puts its carried wheels on the path.
        "PYTHONPATH": os.pathsep.join([".", "protos", os.environ.get("PYTHONPATH", "")]),
    }
    script = "benchmarks/serving/separate_processes.sh"
    cli = ["--preset", "tiny", "--duration", "1", "--no-progress", "--device", "cpu"]
    cli += ["--out", str(out)]
    done = subprocess.run(
        ["bash", script, "tiny", "cpu", *cli],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["mode"] == "grpc-remote"
    assert row["num_requests"] == row["finished"] > 0 and row["failed"] == 0
    assert row["steps"]["mixed"]["steps"] > 0  # the script asks the worker for its steps
    # And samples its pool and its queues over the run, through GetStats.
    pool = row["pool"]
    assert pool["samples"] >= 5 and pool["peak_running"] >= 1
    assert 0 < pool["peak_used_frac"] <= pool["peak_committed_frac"] <= 1
    assert "; pool: committed ≤ " in done.stdout


def test_grpc_mode_refuses_adapter_files_too_large_for_the_disk(tmp_path: Path) -> None:
    cli = "--preset S1 --num-adapters 1000 --mode grpc --max-upload-gb 20 --device cpu"
    with pytest.raises(SystemExit, match="would write 34 GB"):
        serving_bench.main([*shlex.split(cli), "--out", str(tmp_path / "r.jsonl")])
