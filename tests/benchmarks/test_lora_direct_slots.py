"""The direct-slot-table decode LoRA experiment (benchmarks/lora_variants/direct_slots.py)
against the torch reference with the cases and checks of tests/kernels/test_lora_kernels.py:
the tables a batch looks up once must send every program to its own request's slots, for
rows of A over one or several slots and Bᵀ rows past a slot's end."""

from __future__ import annotations

import pytest
import torch

from benchmarks.lora_variants.direct_slots import lora_apply_direct_slots, request_slot_tables
from tests.kernels.test_lora_kernels import (
    DECODE_CASES,
    LLAMA3_8B,
    LLAMA_7B,
    check_all_projections,
    make_case,
)


def apply(x, out, pool, slots, meta, req_lora, q_starts, q_lens, projs, widths, max_rank):
    """As `lora_apply` is called, with the tables made first (once a batch in the worker)."""
    tables = request_slot_tables(
        slots, meta, req_lora, projs, x.shape[1], widths, max_rank, pool.shape[1]
    )
    return lora_apply_direct_slots(x, out, pool, q_starts, tables, widths, max_rank)


@pytest.mark.parametrize("name", DECODE_CASES)
def test_direct_slots_match_reference_fp32(name):
    shapes, ranks, adapters = DECODE_CASES[name]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    case = make_case(shapes, ranks, [1] * len(adapters), adapters, torch.float32, device, 9)
    check_all_projections(case, shapes, max(ranks), 1e-5, 9, apply=apply)


@pytest.mark.gpu
@pytest.mark.parametrize("shapes", [LLAMA_7B, LLAMA3_8B], ids=["llama-7b", "llama3-8b"])
@pytest.mark.parametrize("batch", [32, 128])
def test_direct_slots_match_reference_bf16_real_shapes(shapes, batch):
    ranks = [8, 16, 32, 64]
    adapters = [(-1 if i % 9 == 4 else i % len(ranks)) for i in range(batch)]
    case = make_case(shapes, ranks, [1] * batch, adapters, torch.bfloat16, "cuda", seed=batch)
    check_all_projections(case, shapes, 64, tol=1e-2, seed=batch, apply=apply)
