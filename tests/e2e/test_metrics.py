"""The Prometheus endpoints of the router and a worker serve the named metrics, counting
what actually went through them."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.client import AsyncManyloraClient, ManyloraError
from services.common.base_model import BaseModelShape, load_hf_config
from services.common.grpc_server import free_port
from services.common.random_adapters import save_random_peft_adapter
from tests.e2e.stack import Stack, worker_stats

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


async def test_router_worker_and_store_metrics(stack: Stack, tmp_path: Path):
    store_port = free_port()
    await stack.start_store(metrics_port=store_port)
    shape = BaseModelShape.from_hf_config(load_hf_config("tiny"))
    await stack.upload({"ad": save_random_peft_adapter(tmp_path / "ad", shape, 8, seed=1)})
    worker_port, router_port = free_port(), free_port()
    worker = await stack.start_worker(metrics_port=worker_port)
    router = await stack.start_router(metrics_port=router_port)
    async with AsyncManyloraClient(f"127.0.0.1:{router.port}", timeout=30) as client:
        for adapter in ("ad", "ad", ""):
            await client.complete("hello", adapter=adapter, max_new_tokens=4, ignore_eos=True)
        with pytest.raises(ManyloraError):
            await client.complete("hello", adapter="unknown", max_new_tokens=4)

    r = await asyncio.to_thread(scrape, router_port)
    assert value(r, "manylora:request_success_total", finished_reason="length") == 3
    assert value(r, "manylora:request_failure_total", code="NOT_FOUND") == 1
    assert value(r, "manylora:generation_tokens_total") == 12
    assert value(r, "manylora:prompt_tokens_total") == 3 * 6  # "hello" + <s>
    assert value(r, "manylora:time_to_first_token_seconds_count") == 3
    assert value(r, "manylora:inter_token_latency_seconds_count") == 9
    assert value(r, "manylora:e2e_request_latency_seconds_count") == 3
    assert value(r, "manylora:request_queue_time_seconds_count") == 3
    assert value(r, "manylora:num_requests_running") == 0
    assert value(r, "manylora:num_requests_waiting") == 0
    assert value(r, "manylora:router_workers", state="healthy") == 1
    routed = sum(v for (name, _), v in r.items() if name == "manylora:router_routed_requests_total")
    assert routed == 3

    await worker_stats(worker)  # GetStats refreshes the snapshot the load metrics come from
    w = await asyncio.to_thread(scrape, worker_port)
    assert value(w, "manylora:num_requests_running") == 0
    assert value(w, "manylora:request_success_total", finished_reason="length") == 3
    assert value(w, "manylora:generation_tokens_total") == 12
    assert value(w, "manylora:time_to_first_token_seconds_count") == 3
    assert value(w, "manylora:request_queue_time_seconds_count") == 3
    assert value(w, "manylora:num_requests_waiting") == 0
    total = value(w, "manylora:pool_slots_total")
    assert total > 0 and 0 <= value(w, "manylora:pool_slots_free") <= total
    assert 0 <= value(w, "manylora:pool_usage_perc") <= 1
    assert value(w, "manylora:kv_cache_usage_perc") == 0  # nothing running
    # Each adapter request looks its adapter up in the pool once (a prefetched one is a hit).
    lookups = value(w, "manylora:adapter_cache_hits_total")
    lookups += value(w, "manylora:adapter_cache_misses_total")
    assert lookups >= 2
    assert value(w, "manylora:num_resident_adapters") == 1
    # One request at a time: each one's 6 prompt tokens in a prompt step, its 3 later tokens
    # in decode steps; the steps' waits for the device are part of their time.
    assert value(w, "manylora:engine_prompt_step_tokens_total") == 3 * 6
    assert value(w, "manylora:engine_decode_step_tokens_total") == 3 * 3
    for kind in ("decode", "prompt"):
        wait = value(w, f"manylora:engine_{kind}_step_wait_seconds_total")
        assert 0 <= wait < value(w, f"manylora:engine_{kind}_step_seconds_total")
    assert value(w, "manylora:num_host_cached_adapters") == 1
    assert value(w, "manylora:engine_kernel_compiles_total") == 0  # nothing compiles on a CPU
    assert value(w, "manylora:engine_kernel_compile_seconds_total") == 0

    s = await asyncio.to_thread(scrape, store_port)

    def calls(method: str, code: str) -> float:
        labels = {"service": "AdapterStore", "method": method, "code": code}
        return value(s, "manylora:rpc_requests_total", **labels)

    assert calls("UploadAdapter", "OK") == 1
    assert calls("FetchAdapter", "OK") == 1  # the worker keeps it in host memory afterwards
    assert calls("GetAdapterInfo", "OK") == 1  # the router caches the answer
    assert calls("GetAdapterInfo", "NOT_FOUND") == 1
    assert (
        value(
            s, "manylora:rpc_duration_seconds_count", service="AdapterStore", method="UploadAdapter"
        )
        == 1
    )
