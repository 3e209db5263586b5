"""The synthetic workload: repeatable, and distributed as S-LoRA's trace says.

Every trace here comes from a fixed seed, so the statistical checks are deterministic; their
tolerances are still several standard errors wide, so that they would hold for any seed.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from benchmarks import workload
from benchmarks.workload import PRESETS, WorkloadParams, generate, load, popularity, save


def many(**overrides: object) -> WorkloadParams:
    base = WorkloadParams(num_adapters=10, rate=500.0, duration_s=40.0, seed=3)
    return dataclasses.replace(base, **overrides)  # type: ignore[arg-type]


def test_same_seed_same_trace_and_file_round_trip(tmp_path: Path) -> None:
    params = dataclasses.replace(PRESETS["S2"], num_adapters=1000, duration_s=30.0, seed=11)
    first, second = generate(params), generate(params)
    assert first == second
    assert len(first.requests) > 20
    assert generate(dataclasses.replace(params, seed=12)) != first
    path = tmp_path / "trace.jsonl"
    save(first, path)
    assert load(path) == first


def test_popularity_follows_the_power_law() -> None:
    trace = generate(many(alpha=1.0))
    counts = np.bincount([r.adapter for r in trace.requests], minlength=10)
    shares = counts / counts.sum()
    expected = popularity(10, 1.0)
    assert expected[0] == pytest.approx(1 / sum(1 / k for k in range(1, 11)))
    # ~20,000 draws: the standard error of a share is below 0.004.
    assert shares[0] == pytest.approx(expected[0], abs=0.02)
    assert np.abs(shares - expected).max() < 0.02
    assert list(np.argsort(-counts)[:3]) == [0, 1, 2]


def test_alpha_zero_is_uniform() -> None:
    trace = generate(many(alpha=0.0))
    shares = np.bincount([r.adapter for r in trace.requests], minlength=10) / len(trace.requests)
    assert np.abs(shares - 0.1).max() < 0.015


@pytest.mark.parametrize("cv", [0.5, 1.0, 2.0])
def test_gamma_arrivals_have_the_mean_rate_and_cv(cv: float) -> None:
    trace = generate(many(rate=5.0, cv=cv, duration_s=4000.0))
    arrivals = np.array([r.arrival_s for r in trace.requests])
    gaps = np.diff(arrivals)
    assert len(gaps) > 15_000
    assert np.all(gaps >= 0) and arrivals.max() < 4000.0
    assert gaps.mean() == pytest.approx(1 / 5.0, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(cv, rel=0.1)


def test_cv_zero_arrives_at_a_fixed_interval() -> None:
    trace = generate(many(rate=4.0, cv=0.0, duration_s=10.0))
    gaps = np.diff([r.arrival_s for r in trace.requests])
    assert len(trace.requests) == 39  # 0.25, 0.5, ..., 9.75
    assert np.allclose(gaps, 0.25)


def test_lengths_stay_in_their_ranges() -> None:
    trace = generate(many(prompt_range=(8, 512), output_range=(3, 7)))
    prompts = [r.prompt_len for r in trace.requests]
    outputs = [r.output_len for r in trace.requests]
    assert min(prompts) == 8 and max(prompts) == 512
    assert set(outputs) == {3, 4, 5, 6, 7}


def test_s2_assigns_ranks_round_robin() -> None:
    params = dataclasses.replace(PRESETS["S2"], num_adapters=100)
    assert [params.rank_of(i) for i in range(6)] == [64, 32, 16, 8, 64, 32]
    trace = generate(params)
    assert all(r.rank == (64, 32, 16, 8)[r.adapter % 4] for r in trace.requests)
    assert all(r.rank == 8 for r in generate(PRESETS["S1"]).requests)


def test_cli_writes_the_trace_of_its_parameters(tmp_path: Path) -> None:
    out = tmp_path / "t.jsonl"
    args = "--preset S2 --num-adapters 50 --rate 3 --cv 2 --alpha 0.5 --duration 20 --seed 4"
    workload.main([*args.split(), "--out", str(out)])
    loaded = load(out)
    expected = dataclasses.replace(
        PRESETS["S2"], num_adapters=50, rate=3.0, cv=2.0, alpha=0.5, duration_s=20.0, seed=4
    )
    assert loaded.params == expected
    assert loaded == generate(expected)


def test_prompts_are_seeded_and_sized() -> None:
    trace = generate(PRESETS["tiny"])
    prompts = workload.prompt_tokens(trace)
    assert prompts == workload.prompt_tokens(trace)
    assert [len(p) for p in prompts] == [r.prompt_len for r in trace.requests]
    assert all(3 <= t < 259 for p in prompts for t in p)
