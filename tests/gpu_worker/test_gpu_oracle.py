"""The engine in bf16 on CUDA against the fp32 HF + PEFT oracle, on the mixed-adapter batch.

Random-weight models have near-ties between their top logits, and bf16 moves logits by about
1e-2, so a bf16 run may legitimately pick the runner-up where the oracle's margin is smaller
than that. Each of our greedy tokens is therefore checked against the oracle run on *our*
prefix (teacher forcing): it must be the oracle's argmax, or lose to it by less than
MARGIN_TOL. The logprob we report for it must match the oracle's within LOGPROB_TOL.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from services.common.peft_adapter import load_peft_folder
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.model.lora_backend import LoraBackend
from services.gpu_worker.model.model_config import ModelConfig
from services.gpu_worker.model.weights import build_dummy_model
from tests.gpu_worker.test_engine_oracle import NEW_TOKENS, _mixed_requests, greedy_completions
from tests.oracle import (
    MIXED_ADAPTERS,
    TINY_GQA,
    TINY_MHA,
    AdapterSpec,
    build_pair,
    greedy_oracle,
    make_peft_adapters,
)

MARGIN_TOL = 0.05
LOGPROB_TOL = 0.05
MIN_EXACT_SHARE = 0.95


@torch.no_grad()
def _teacher_forced_logits(peft_model: Any, ids: list[int], adapter: str | None) -> torch.Tensor:
    batch = torch.tensor([ids])
    if adapter is None:
        with peft_model.disable_adapter():
            return peft_model(input_ids=batch).logits[0].float()
    peft_model.set_adapter(adapter)
    return peft_model(input_ids=batch).logits[0].float()


@pytest.mark.gpu
@pytest.mark.parametrize("graphs", [False, True], ids=["eager", "cuda-graphs"])
@pytest.mark.parametrize("hf_config", [TINY_MHA, TINY_GQA], ids=["mha", "gqa"])
def test_bf16_cuda_engine_matches_hf_peft_oracle(
    hf_config: dict[str, Any], graphs: bool, tmp_path: Path
):
    check_bf16_engine_against_oracle(hf_config, MIXED_ADAPTERS, graphs, tmp_path)


@pytest.mark.gpu
@pytest.mark.parametrize("budget", [3, 7])
@pytest.mark.parametrize("hf_config", [TINY_MHA, TINY_GQA], ids=["mha", "gqa"])
def test_bf16_cuda_engine_with_chunked_prefill_matches_hf_peft_oracle(
    hf_config: dict[str, Any], budget: int, tmp_path: Path
):
    """Prompts of 3..40 tokens in chunks of at most `budget` tokens a step, beside decodes
    replayed from CUDA graphs: the paged prefill kernel over earlier chunks' K/V."""
    check_bf16_engine_against_oracle(
        hf_config, MIXED_ADAPTERS, True, tmp_path, max_prefill_tokens=budget
    )


def check_bf16_engine_against_oracle(
    hf_config: dict[str, Any],
    specs: tuple[AdapterSpec, ...],
    graphs: bool,
    folder: Path,
    lora_backend: LoraBackend | None = None,
    new_tokens: int = NEW_TOKENS,
    device: str = "cuda",
    dtype: torch.dtype = torch.bfloat16,
    max_prefill_tokens: int = 4096,
) -> None:
    """The mixed batch of `specs` (see _mixed_requests) through a bf16 CUDA engine, each token
    checked against the fp32 HF + PEFT oracle on our prefix (see the module docstring).
    LoRA through `lora_backend` (None: the device's)."""
    _, hf = build_pair(hf_config)
    peft_model, paths = make_peft_adapters(hf, specs, folder)
    config = ModelConfig.from_hf(hf_config)
    ours = build_dummy_model(config, 0, dtype, torch.device(device))
    adapters = {n: load_peft_folder(p, config.shape, max_rank=64) for n, p in paths.items()}
    requests = _mixed_requests(list(adapters), seed=1)
    settings = EngineConfig(pool_slots=8192, max_num_seqs=64, max_prefill_tokens=max_prefill_tokens)
    engine = Engine(ours, settings, lora_backend)
    if graphs:
        engine.capture_decode_graphs()
    completions = greedy_completions(engine, requests, adapters, new_tokens)

    full_matches = sum(
        done.token_ids == greedy_oracle(peft_model, prompt, adapter, new_tokens)[0]
        for (prompt, adapter), done in zip(requests, completions, strict=True)
    )
    exact = total = 0
    worst_margin = worst_logprob = 0.0
    for (prompt, adapter), done in zip(requests, completions, strict=True):
        assert len(done.token_ids) == new_tokens
        logits = _teacher_forced_logits(peft_model, prompt + done.token_ids, adapter)
        steps = logits[len(prompt) - 1 : len(prompt) - 1 + new_tokens]
        ours_ids = torch.tensor(done.token_ids)
        best = steps.max(dim=-1).values
        margin = best - steps.gather(1, ours_ids[:, None])[:, 0]
        oracle_lp = torch.log_softmax(steps, -1).gather(1, ours_ids[:, None])[:, 0]
        lp_err = (torch.tensor(done.logprobs) - oracle_lp).abs()
        assert float(margin.max()) < MARGIN_TOL, (adapter, margin.tolist())
        assert float(lp_err.max()) < LOGPROB_TOL, (adapter, lp_err.tolist())
        exact += int((margin == 0).sum())
        total += new_tokens
        worst_margin = max(worst_margin, float(margin.max()))
        worst_logprob = max(worst_logprob, float(lp_err.max()))
    print(
        f"\n[{hf_config['num_key_value_heads']} kv heads, graphs={graphs}, "
        f"budget {max_prefill_tokens}, "
        f"{type(engine.lora_backend).__name__}] "
        f"{full_matches}/{len(requests)} requests "
        f"equal the oracle's greedy run; oracle argmax on {exact}/{total} tokens; "
        f"worst margin {worst_margin:.4f}; worst logprob error {worst_logprob:.4f}"
    )
    assert exact / total >= MIN_EXACT_SHARE
    assert engine.pool.kv_used == 0
