"""The paged engine on CUDA: eviction and side-stream prefetch change nothing in the output.

One request runs at a time, so both runs compute exactly the same batches and must agree
bit for bit; only where adapter weights come from differs (a pool that holds all 120
adapters vs. one that holds a few, evicting and prefetching all the time)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.common.peft_adapter import load_peft_folder
from services.common.random_adapters import save_random_peft_adapter
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.offline import generate_offline
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.model.model_config import ModelConfig
from services.gpu_worker.model.weights import build_dummy_model
from tests.oracle import TINY_GQA

NUM_ADAPTERS = 120


@pytest.mark.gpu
def test_eviction_and_prefetch_on_cuda_match_an_all_resident_pool(tmp_path: Path):
    config = ModelConfig.from_hf(TINY_GQA)
    model = build_dummy_model(config, 0, torch.bfloat16, torch.device("cuda"))
    adapters = [
        load_peft_folder(
            save_random_peft_adapter(
                tmp_path / f"a{i}", config.shape, (8, 16, 32)[i % 3], i, std=0.2
            ),
            config.shape,
            64,
        )
        for i in range(NUM_ADAPTERS)
    ]
    gen = torch.Generator().manual_seed(3)
    prompts = [
        torch.randint(3, 259, (5 + i % 7,), generator=gen).tolist() for i in range(NUM_ADAPTERS)
    ]
    options = [SamplingOptions(max_new_tokens=6, ignore_eos=True)] * NUM_ADAPTERS

    def run(pool_slots: int) -> tuple[list[list[int]], Engine]:
        engine = Engine(model, EngineConfig(pool_slots=pool_slots, max_num_seqs=1))
        done = generate_offline(engine, ByteTokenizer(), prompts, options, list(adapters))
        torch.cuda.synchronize()
        return [c.token_ids for c in done], engine

    roomy, roomy_engine = run(pool_slots=400_000)
    tight, tight_engine = run(pool_slots=1_800)  # rank 32 takes 832 slots here
    assert roomy_engine.adapters.evictions == 0
    assert tight_engine.adapters.evictions > NUM_ADAPTERS // 2
    assert tight_engine.adapters.hits > 0  # some adapters arrived by prefetch before their turn
    assert tight == roomy
    assert tight_engine.pool.kv_used == 0
