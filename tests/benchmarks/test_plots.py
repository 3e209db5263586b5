"""Plots from a small results file: PNG files, one per fixed context of the sweep."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("matplotlib")  # in the test extra; the device has none

from benchmarks import plots

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def row(variant: str, n: int, rate: float, mode: str = "inprocess") -> dict[str, Any]:
    return {
        "mode": mode,
        "variant": variant,
        "preset": "S2",
        "num_adapters": n,
        "rate": rate,
        "alpha": 1.0,
        "cv": 1.0,
        "throughput_req_s": rate * 0.9,
        "avg_latency_s": n / 1000,
        "p99_ttft_s": 0.5,
    }


def test_pngs_against_adapter_count_and_rate(tmp_path: Path) -> None:
    rows = [row(v, n, 2.0) for v in ("manylora", "bmm") for n in (5, 100, 1000)]
    rows += [row("manylora", 100, r, mode) for r in (1.0, 4.0) for mode in ("inprocess", "grpc")]
    rows.append(row("hf-peft", 5, 2.0) | {"avg_latency_s": None})  # a missing value is skipped
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plots.main([str(results), "--out", str(tmp_path / "plots")])
    names = sorted(p.name for p in written)
    assert names == [
        "vs_num_adapters_presetS2_rate2_alpha1_cv1.png",
        "vs_rate_presetS2_num_adapters100_alpha1_cv1.png",
    ]
    for path in written:
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 10_000


def test_nothing_to_plot_writes_nothing(tmp_path: Path) -> None:
    results = tmp_path / "one.jsonl"
    results.write_text(json.dumps(row("manylora", 5, 2.0)) + "\n")
    assert plots.main([str(results), "--out", str(tmp_path / "p")]) == []


def test_alpha_and_cv_sweeps_get_their_own_figures(tmp_path: Path) -> None:
    rows = [row("manylora", 100, 2.0) | {"alpha": a} for a in (0.0, 1.0, 2.0)]
    rows += [row("manylora", 100, 2.0) | {"cv": cv} for cv in (2.0, 4.0)]  # and cv = 1 above
    results = tmp_path / "sweeps.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    names = sorted(p.name for p in plots.main([str(results), "--out", str(tmp_path / "p")]))
    assert names == [
        "vs_alpha_presetS2_num_adapters100_rate2_cv1.png",
        "vs_cv_presetS2_num_adapters100_rate2_alpha1.png",
    ]
