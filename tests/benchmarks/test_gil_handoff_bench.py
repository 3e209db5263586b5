"""The worker-threads model of benchmarks/gil_handoff_bench.py runs whole: every output of every
step reaches its consumer (the run would hang otherwise), and the device's busy share it
reports is a share."""

from __future__ import annotations

import pytest

from benchmarks.gil_handoff_bench import run_once


@pytest.mark.parametrize("overlap", [True, False])
def test_the_model_runs_every_step_and_reports_a_share(overlap):
    share = run_once(0.002, 0.001, 4, 10, 0.0005, 0.00001, overlap)
    assert 0.0 < share <= 1.0
