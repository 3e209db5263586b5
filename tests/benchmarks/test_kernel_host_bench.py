"""kernel_host_bench times the wrappers of this tree and of a baseline folder with their
launches stubbed, and leaves the kernels as they were."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

import kernels.lora
import kernels.lora_rows
from benchmarks import kernel_host_bench

ROOT = Path(__file__).resolve().parents[2]


def test_both_trees_are_timed_and_the_kernels_are_restored(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "kernels", tmp_path / "kernels")
    before = (kernels.lora._shrink_kernel, kernels.lora_rows._row_expand_kernel)
    real_sum = torch.Tensor.sum
    out = tmp_path / "rows.json"
    args = ["--baseline", str(tmp_path), "--calls", "20", "--repeats", "2", "--out", str(out)]
    rows = kernel_host_bench.main(args)
    assert json.loads(out.read_text()) == rows
    assert {(r["tree"], r["case"]) for r in rows} == {
        (tree, case)
        for tree in ("this tree", "baseline")
        for case in ("prompt chunks (tiled)", "decode batch (rows)")
    }
    assert all(r["us_per_call"] > 0 for r in rows)
    assert (kernels.lora._shrink_kernel, kernels.lora_rows._row_expand_kernel) == before
    assert torch.Tensor.sum is real_sum
