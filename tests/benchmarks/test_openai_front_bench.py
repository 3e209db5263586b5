"""The front benchmark's arithmetic: the closed loop sends every request once with at most
`concurrency` in flight, and the ratios are HTTP over gRPC, computed by hand here."""

from __future__ import annotations

import asyncio

import pytest

from benchmarks.openai_front_bench import RunResult, Workload, closed_loop, make_requests, ratio


async def test_closed_loop_sends_each_request_once_within_the_concurrency():
    requests = make_requests(Workload(requests=20, adapters=3, prompt_tokens=4))
    assert [r.adapter for r in requests[:5]] == ["", "bench-0", "bench-1", "bench-2", ""]
    in_flight, most, seen = 0, 0, []

    async def one(request):
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.001)
        in_flight -= 1
        seen.append(id(request))
        if len(seen) == 7:
            raise RuntimeError("a failed request counts as an error, not as tokens")
        return 10, 0.5

    result = await closed_loop(requests, 4, one)
    assert sorted(seen) == sorted(id(r) for r in requests)
    assert most == 4
    assert (result.requests, result.errors, result.tokens) == (19, 1, 190)


def test_ratios_are_http_over_grpc():
    def run(path, round_, seconds, tokens, cpu):
        return RunResult(path, round_, seconds, tokens, 1, 0, cpu_s={"worker": cpu, "x": 1.0})

    results = [
        run("grpc", 1, 10.0, 1000, 9.0),
        run("http", 1, 12.5, 1000, 11.5),
        run("grpc", 2, 10.0, 1000, 9.0),
        run("http", 2, 10.0, 1000, 9.0),
    ]
    got = ratio(results)
    assert got["grpc_tokens_per_s"] == 100.0
    assert got["http_tokens_per_s"] == pytest.approx(2000 / 22.5, abs=0.1)
    assert got["ratio_overall"] == pytest.approx(20 / 22.5, abs=1e-3)
    assert got["ratio_median_of_rounds"] == pytest.approx((0.8 + 1.0) / 2, abs=1e-3)
    assert got["ratio_min_of_rounds"] == 0.8
    assert got["grpc_cpu_us_per_token"] == 10_000.0  # (10 + 10) s over 2000 tokens
    assert got["http_cpu_us_per_token"] == 11_250.0
    assert got["ratio_from_cpu"] == pytest.approx(10 / 11.25, abs=1e-3)
