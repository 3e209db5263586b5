"""Every Triton specialization a decode batch's row kernels can need is one that a batch of a
decode-graph bucket size needs too, so the engine's graph capture compiles them all before it
serves: a compilation inside a served step stalls its whole batch for a second or more. The
row expand's shape depends on the batch size (`LoraLaunch.row_small_batch`, and column blocks
halved below `row_expand_min_programs`); this walks every batch size with the kernels'
launches recorded instead of run (CPU, no interpreter)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import kernels.lora_rows as lora_rows
from kernels.lora_launch import DEFAULT_LAUNCH, LoraLaunch, proj_ids
from services.gpu_worker.engine.decode_graphs import BUCKETS

W = 4096
GROUPS = (  # Llama-7B: (projections, in_features, widths)
    ((0, 1, 2), 4096, (4096, 4096, 4096)),
    ((3,), 4096, (4096,)),
    ((4, 5), 4096, (11008, 11008)),
    ((6,), 11008, (4096,)),
)


class _Recorder:
    def __init__(self, name: str, keys: set[tuple[Any, ...]]) -> None:
        self.name, self.keys = name, keys

    def __getitem__(self, grid: Any) -> Any:
        def launch(*args: Any, **constexprs: Any) -> None:
            # What Triton specializes on: constexprs, and each integer's being 1 or a
            # multiple of 16 (tensors: dtype; torch's allocations are 16-byte aligned).
            ints = tuple((a == 1, a % 16 == 0) for a in args if isinstance(a, int))
            dtypes = tuple(a.dtype for a in args if isinstance(a, torch.Tensor))
            self.keys.add((self.name, ints, dtypes, tuple(sorted(constexprs.items()))))

        return launch


def _specializations(batch: int, launch: LoraLaunch, monkeypatch) -> set[tuple[Any, ...]]:
    keys: set[tuple[Any, ...]] = set()
    monkeypatch.setattr(lora_rows, "_row_shrink_kernel", _Recorder("shrink", keys))
    monkeypatch.setattr(lora_rows, "_row_expand_kernel", _Recorder("expand", keys))
    i32 = torch.int32
    pool = torch.zeros(4, W, dtype=torch.bfloat16)
    tables = (
        pool,
        torch.zeros(8, 64, dtype=i32),
        torch.zeros(8, 7, 3, dtype=i32),
        torch.zeros(batch, dtype=i32),
        torch.arange(batch, dtype=i32),
        torch.ones(batch, dtype=i32),
    )
    for projs, in_features, widths in GROUPS:
        x = torch.zeros(batch, in_features, dtype=torch.bfloat16)
        out = torch.zeros(batch, sum(widths), dtype=torch.bfloat16)
        ids = proj_ids(projs, x.device)
        lora_rows.lora_apply_rows(x, out, tables, ids, widths, 128, launch)
    return keys


@pytest.mark.parametrize(
    "launch",
    [DEFAULT_LAUNCH, LoraLaunch(row_request_major=True)],
    ids=["default", "request-major"],
)
def test_every_batch_size_needs_only_what_the_graph_buckets_compile(launch, monkeypatch):
    at_buckets: set[tuple[Any, ...]] = set()
    for bucket in BUCKETS:
        at_buckets |= _specializations(bucket, launch, monkeypatch)
    for batch in range(1, BUCKETS[-1] + 1):
        extra = _specializations(batch, launch, monkeypatch) - at_buckets
        assert not extra, f"batch {batch} needs a kernel no bucket compiles: {extra}"
