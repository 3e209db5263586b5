"""S-LoRA's padded-bmm baseline (benchmarks/baselines/bmm_lora.py), which the serving
benchmark compares against, must be as right as the engine's own LoRA path: the engine's
HF + PEFT oracle checks with the baseline as its LoRA backend."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from benchmarks.baselines.bmm_lora import BmmLoraBackend
from tests.gpu_worker.test_all_linear_oracle import ALL_LINEAR_ADAPTERS, run_all_linear_batch
from tests.gpu_worker.test_all_linear_oracle import NEW_TOKENS as ALL_LINEAR_TOKENS
from tests.gpu_worker.test_engine_oracle import run_mixed_batch
from tests.gpu_worker.test_gpu_oracle import check_bf16_engine_against_oracle
from tests.oracle import MIXED_ADAPTERS, TINY_GQA, TINY_MHA

CONFIGS = pytest.mark.parametrize("hf_config", [TINY_MHA, TINY_GQA], ids=["mha", "gqa"])


@CONFIGS
def test_mixed_adapter_batch_matches_hf_peft_greedy(hf_config: dict[str, Any], tmp_path: Path):
    run_mixed_batch(hf_config, tmp_path, BmmLoraBackend())


@CONFIGS
def test_all_linear_adapter_batch_matches_hf_peft_greedy(hf_config: dict[str, Any], tmp_path: Path):
    run_all_linear_batch(hf_config, ALL_LINEAR_TOKENS, tmp_path, BmmLoraBackend())


@pytest.mark.gpu
@CONFIGS
@pytest.mark.parametrize(
    "specs", [MIXED_ADAPTERS, ALL_LINEAR_ADAPTERS], ids=["mixed", "all-linear"]
)
def test_bf16_cuda_graphs_batch_matches_hf_peft(
    hf_config: dict[str, Any], specs: Any, tmp_path: Path
):
    """Inside the decode CUDA graphs it pads to the engine's max rank."""
    check_bf16_engine_against_oracle(hf_config, specs, True, tmp_path, BmmLoraBackend())
