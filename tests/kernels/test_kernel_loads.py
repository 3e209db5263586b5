"""The LoRA and paged-attention kernels load weights and K/V as 16-byte vectors, never two
bytes at a time: each kernel compiled to PTX for sm_90 on the CPU (benchmarks/kernel_loads.py)
and its global loads counted. Two-byte loads cost the decode LoRA 1.4-1.7x (BENCHMARKS.md,
eleventh session), and nothing else would notice them: results stay correct."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_lora_kernels_load_weights_as_16_byte_vectors():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.kernel_loads", "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    counts = json.loads(run.stdout)
    assert set(counts) == {
        "lora._shrink_kernel",
        "lora._expand_kernel",
        "lora_rows._row_shrink_kernel",
        "lora_rows._row_expand_kernel",
        "lora_rows._row_expand_kernel chunk",
        "lora_rows._row_expand_kernel tile",
        "paged_attention._decode_kernel",
        "paged_attention._prefill_kernel",
    }
    for kernel, loads in counts.items():
        assert "ld.global.b16" not in loads, f"{kernel} loads bf16 one at a time: {loads}"
        vectors = sum(loads.get(k, 0) for k in ("ld.global.v4.b32", "cp.async.cg 16B"))
        assert vectors, f"{kernel} has no 16-byte load: {loads}"
