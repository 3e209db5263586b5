"""The engine on its Triton path against HF transformers + PEFT: the LoRA kernels, the paged
attention kernels and the elementwise kernels, fed the slot and adapter tables the engine
builds, run on the CPU under Triton's interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py).

One batch mixes an all-linear adapter whose modules have different ranks (4 to 32, so some
span two rank tiles of the kernels), an MLP-only rsLoRA adapter with a layer-specific rank,
an attention-only adapter and base-model rows. A prefill budget of 16 tokens admits the
requests over three steps, some prompts in chunks, so prefill rows share passes with decode
rows before the last steps decode alone; a budget of 4 runs most prompts in chunks, each
attending over its earlier chunks' K/V through the paged prefill kernel (q_len > 1 and
ctx_len > 0). The interpreter is slow: tiny models, short prompts, three tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from kernels.lora_launch import LoraLaunch
from services.common.peft_adapter import load_peft_folder
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.model.attention import TritonPagedAttention
from services.gpu_worker.model.backends import ModelBackends
from services.gpu_worker.model.fused_ops import ElementwiseOps
from services.gpu_worker.model.lora_backend import TritonLoraBackend
from tests.gpu_worker.test_engine_oracle import check_engine_against_oracle
from tests.oracle import TINY_GQA, TINY_MHA, AdapterSpec, build_pair, make_peft_adapters

ADAPTERS = (
    AdapterSpec(
        "all-mixed",
        8,
        16,
        "all-linear",
        rank_pattern={"gate_proj": 32, "down_proj": 4, "q_proj": 16},
        alpha_pattern={"up_proj": 8},
    ),
    AdapterSpec(
        "mlp-rslora",
        16,
        16,
        ("gate_proj", "up_proj", "down_proj"),
        use_rslora=True,
        rank_pattern={"model.layers.1.mlp.down_proj": 8},
    ),
    AdapterSpec("qvo-r32", 32, 8, ("q_proj", "v_proj", "o_proj")),
)
# MHA: slot width 64, MLP rows of 160 over padded slots. GQA: 4 query heads over 2 KV heads,
# smaller than tests.oracle's TINY_GQA (the interpreter runs one program at a time).
GQA = {**TINY_GQA, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 160}
NEW_TOKENS = 3


def _requests() -> list[tuple[list[int], str | None]]:
    plan = [("all-mixed", 5), (None, 9), ("mlp-rslora", 3), ("qvo-r32", 12), (None, 7)]
    gen = torch.Generator().manual_seed(3)
    return [(torch.randint(3, 259, (n,), generator=gen).tolist(), name) for name, n in plan]


# The row kernels with the request as the grid's slowest axis and the rank-by-rank expand at
# every batch size; the engine then orders its decode batches by descending rank.
REQUEST_MAJOR = LoraLaunch(row_request_major=True, row_small_batch=0)


@pytest.mark.parametrize(
    ("hf_config", "budget", "launch"),
    [(TINY_MHA, 16, None), (GQA, 16, None), (GQA, 4, None), (TINY_MHA, 16, REQUEST_MAJOR)],
    ids=["mha", "gqa", "gqa-chunks-of-4", "mha-request-major"],
)
def test_engine_on_the_triton_kernels_matches_hf_peft(
    hf_config: dict[str, Any], budget: int, launch: LoraLaunch | None, tmp_path: Path
):
    backends = ModelBackends(TritonPagedAttention(), ElementwiseOps.kernels())
    ours, hf = build_pair(hf_config, backends=backends)
    peft_model, paths = make_peft_adapters(hf, ADAPTERS, tmp_path)
    adapters = {n: load_peft_folder(p, ours.config.shape, max_rank=32) for n, p in paths.items()}
    config = EngineConfig(pool_slots=4096, max_num_seqs=8, max_prefill_tokens=budget, max_rank=32)
    engine = Engine(ours, config, TritonLoraBackend(launch))
    assert engine.lora_backend.decode_in_rank_order == (launch is REQUEST_MAJOR)
    check_engine_against_oracle(engine, peft_model, _requests(), adapters, NEW_TOKENS)
