"""The cold adapter-download benchmark on the CPU: every adapter arrives whole, once per
concurrency asked, with the timings and the event loop's lag it reports."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks import adapter_fetch_bench
from services.common.base_model import TARGET_MODULES, BaseModelShape, load_hf_config


def test_each_store_and_concurrency_fetches_every_adapter_whole(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    args = ["--model", "tiny", "--num-adapters", "3", "--rank", "4", "--repeats", "1"]
    args += ["--store-dtype", "as-uploaded,bfloat16"]
    rows = adapter_fetch_bench.main([*args, "--concurrency", "3,1", "--out", str(out)])
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert [(r["store_dtype"], r["concurrency"]) for r in rows] == [
        ("as-uploaded", 3),
        ("as-uploaded", 1),
        ("bfloat16", 3),
        ("bfloat16", 1),
    ]
    shape = BaseModelShape.from_hf_config(load_hf_config("tiny"))
    per_layer = sum(4 * sum(shape.proj_dims(m)) for m in TARGET_MODULES)  # rank 4: A and B
    bf16_bytes = 3 * shape.num_layers * per_layer * 2
    for row in rows:
        assert row["adapters"] == 3
        assert row["held_mb"] * 1e6 == bf16_bytes  # every adapter, converted to bf16
        assert 0 < row["first_s"] <= row["median_s"] <= row["seconds"]
        assert 0 <= row["loop_lag_p99_ms"] <= row["loop_lag_max_ms"]
