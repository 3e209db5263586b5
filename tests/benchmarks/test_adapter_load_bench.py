"""benchmarks/adapter_load_bench.py: one row per (targets, rank, host dtype, load kind), each
load a real miss (the pool is emptied between loads), timed on the host and until done."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from benchmarks import adapter_load_bench


def test_rows_cover_each_combination_and_every_load_is_a_miss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = ["adapter_load_bench", "--device", "cpu", "--ranks", "8", "--targets", "attention"]
    argv += ["--dtypes", "bf16,fp32", "--repeats", "2", "--out", str(tmp_path)]
    monkeypatch.setattr(sys, "argv", argv)
    loads: list[bool] = []
    real_load = adapter_load_bench.AdapterManager.load

    def counted(self, adapter, background=False):
        loads.append(adapter.key in self._resident)
        return real_load(self, adapter, background)

    monkeypatch.setattr(adapter_load_bench.AdapterManager, "load", counted)
    adapter_load_bench.main()
    rows = json.loads((tmp_path / "adapter_load.json").read_text())["rows"]
    kinds = {(r["targets"], r["rank"], r["host_dtype"], r["prefetch"]) for r in rows}
    assert kinds == {("attention", 8, d, p) for d in ("bf16", "fp32") for p in (False, True)}
    assert all(0 < r["host_ms"] <= r["until_on_device_ms"] for r in rows)
    assert len(loads) == 4 * 3 and not any(loads)  # 2 timed + 1 warm-up each, none resident
