"""TokenHistogram.observe_many against the library's own Histogram.observe, called per token."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Histogram

from services.common.metrics import ITL_BUCKETS, TokenHistogram


def samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    return {
        (s.name.rsplit("_", 1)[-1], s.labels.get("le", "")): s.value
        for metric in registry.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


# Gaps below, on, between and above the bounds (0.005 is a bound: it counts in its own bucket).
OBSERVATIONS = [(0.0, 1), (0.0005, 3), (0.005, 4), (0.0051, 2), (0.3, 7), (2.0, 5), (0.01, 1)]


@pytest.mark.parametrize("observations", [OBSERVATIONS, OBSERVATIONS[2:3], OBSERVATIONS[::-1]])
def test_observe_many_counts_as_count_observations(observations):
    mine, oracle = CollectorRegistry(), CollectorRegistry()
    many = TokenHistogram("itl", "x", buckets=ITL_BUCKETS, registry=mine)
    one_by_one = Histogram("itl", "x", buckets=ITL_BUCKETS, registry=oracle)
    for gap, count in observations:
        many.observe_many(gap, count)
        for _ in range(count):
            one_by_one.observe(gap)
    got, want = samples(mine), samples(oracle)
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key
