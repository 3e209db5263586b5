"""The engine against HF transformers + PEFT: one batch mixing adapters of ranks 8-64
(one rsLoRA) and base-model requests, with prompts of different lengths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from services.common.lora_format import CanonicalAdapter
from services.common.peft_adapter import load_peft_folder
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.offline import Completion, generate_offline
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.model.lora_backend import LoraBackend
from tests.oracle import (
    MIXED_ADAPTERS,
    TINY_GQA,
    TINY_MHA,
    build_pair,
    greedy_oracle,
    make_peft_adapters,
)

NEW_TOKENS = 32


def _mixed_requests(names: list[str], seed: int) -> list[tuple[list[int], str | None]]:
    """Two requests per adapter and three base requests, prompt lengths 3..40, interleaved."""
    gen = torch.Generator().manual_seed(seed)
    plan: list[str | None] = [*names, None, *names, None, None]
    requests = []
    for i, adapter in enumerate(plan):
        length = 3 + (i * 7) % 38
        requests.append((torch.randint(3, 259, (length,), generator=gen).tolist(), adapter))
    return requests


def greedy_completions(
    engine: Engine,
    requests: list[tuple[list[int], str | None]],
    adapters: dict[str, CanonicalAdapter],
    new_tokens: int,
) -> list[Completion]:
    """(prompt, adapter name or None) requests run greedily to `new_tokens` tokens each,
    with logprobs."""
    options = SamplingOptions(max_new_tokens=new_tokens, ignore_eos=True, logprobs=True)
    return generate_offline(
        engine,
        ByteTokenizer(),
        [prompt for prompt, _ in requests],
        [options] * len(requests),
        [adapters[name] if name else None for _, name in requests],
    )


def check_engine_against_oracle(
    engine: Engine,
    peft_model: Any,
    requests: list[tuple[list[int], str | None]],
    adapters: dict[str, CanonicalAdapter],
    new_tokens: int,
) -> None:
    """Greedy tokens equal the HF+PEFT oracle's exactly, logprobs within 1e-4, and the pool's
    KV is all given back afterwards."""
    completions = greedy_completions(engine, requests, adapters, new_tokens)
    for (prompt, adapter), done in zip(requests, completions, strict=True):
        expected, oracle_logits = greedy_oracle(peft_model, prompt, adapter, new_tokens)
        assert done.token_ids == expected, f"adapter={adapter} prompt_len={len(prompt)}"
        oracle_logprobs = torch.log_softmax(oracle_logits, -1)[torch.arange(new_tokens), expected]
        torch.testing.assert_close(
            torch.tensor(done.logprobs), oracle_logprobs, atol=1e-4, rtol=1e-4
        )
    assert engine.pool.kv_used == 0


def run_mixed_batch(
    hf_config: dict[str, Any], folder: Path, lora_backend: LoraBackend | None = None
) -> None:
    """MIXED_ADAPTERS' batch through an engine with `lora_backend` (None: the device's)."""
    ours, hf = build_pair(hf_config)
    peft_model, paths = make_peft_adapters(hf, MIXED_ADAPTERS, folder)
    shape = ours.config.shape
    adapters = {name: load_peft_folder(path, shape, max_rank=64) for name, path in paths.items()}
    requests = _mixed_requests(list(adapters), seed=1)

    engine = Engine(ours, EngineConfig(pool_slots=8192, max_num_seqs=64), lora_backend)
    check_engine_against_oracle(engine, peft_model, requests, adapters, NEW_TOKENS)


@pytest.mark.parametrize("hf_config", [TINY_MHA, TINY_GQA], ids=["mha", "gqa"])
def test_mixed_adapter_batch_matches_hf_peft_greedy(hf_config: dict[str, Any], tmp_path: Path):
    """The engine's own LoRA path (on the CPU its torch reference)."""
    run_mixed_batch(hf_config, tmp_path)


def test_adapters_change_the_output(tmp_path: Path):
    """Guards the oracle test against adapters too weak to matter: each adapter's greedy
    tokens differ from the base model's for the same prompt."""
    _, hf = build_pair(TINY_MHA)
    peft_model, _ = make_peft_adapters(hf, MIXED_ADAPTERS, tmp_path)
    prompt = list(range(10, 30))
    base, _ = greedy_oracle(peft_model, prompt, None, 8)
    for spec in MIXED_ADAPTERS:
        tuned, _ = greedy_oracle(peft_model, prompt, spec.name, 8)
        assert tuned != base, spec.name
