"""--max-num-seqs 0 (the default): the running-request limit sized from the memory pool, by the
rule stated in engine/running_limit.py (min(256, pool tokens // min(context, 512)) on CUDA,
64 on the CPU, below --max-loras minus the prefetch window); a limit given by hand is kept."""

from __future__ import annotations

import pytest
import torch

from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.running_limit import auto_max_num_seqs
from services.gpu_worker.engine.setup import build_engine
from services.gpu_worker.model.model_config import ModelConfig
from services.gpu_worker.model.weights import build_dummy_model
from tests.oracle import TINY_MHA, build_pair

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize(
    ("kv_tokens", "max_model_len", "max_loras", "device", "expected"),
    [
        (217_000, 4096, 512, CUDA, 256),  # Llama-7B on an H200: capped at the largest bucket
        (17_000, 4096, 512, CUDA, 33),  # the same model on a 24 GB GPU: 17000 // 512
        (4096, 128, 512, CUDA, 32),  # a short context counts whole: 4096 // 128
        (217_000, 4096, 40, CUDA, 31),  # room for 40 adapters: 40 - 8 (prefetch) - 1
        (100, 4096, 512, CUDA, 1),  # a pool smaller than one request still runs one
        (217_000, 4096, 512, CPU, 64),  # the CPU's fixed limit
        (217_000, 4096, 20, CPU, 11),  # ... also below max_loras - prefetch
    ],
)
def test_the_auto_limit_follows_the_stated_rule(
    kv_tokens: int, max_model_len: int, max_loras: int, device: torch.device, expected: int
):
    assert auto_max_num_seqs(kv_tokens, max_model_len, max_loras, device) == expected


@pytest.fixture(scope="module")
def model():
    return build_pair(TINY_MHA)[0]


def test_the_engine_resolves_auto_before_sizing_its_tables(model):
    engine = Engine(model, EngineConfig(pool_slots=4096))
    assert EngineConfig().max_num_seqs == 0
    assert engine.config.max_num_seqs == 64  # the CPU's
    assert engine.scheduler.config.max_num_seqs == 64
    assert engine.kv_tables.k_table.shape[0] == 64
    small = Engine(model, EngineConfig(pool_slots=4096, max_loras=30))
    assert small.config.max_num_seqs == small.kv_tables.k_table.shape[0] == 21


def test_a_limit_given_by_hand_is_kept(model):
    engine = Engine(model, EngineConfig(pool_slots=4096, max_num_seqs=300, max_loras=400))
    assert engine.config.max_num_seqs == engine.kv_tables.k_table.shape[0] == 300


@pytest.mark.gpu
def test_on_cuda_the_limit_and_the_decode_graphs_follow_the_pool():
    config = ModelConfig.from_hf(TINY_MHA)
    model = build_dummy_model(config, 0, torch.bfloat16, torch.device("cuda"))
    small = build_engine(model, EngineConfig(pool_slots=2 * 20 * 512, cuda_graphs=False))
    assert small.max_model_len == 512  # TINY_MHA's context: 20 requests of it
    assert small.config.max_num_seqs == small.kv_tables.k_table.shape[0] == 20
    big = build_engine(model, EngineConfig(gpu_memory_fraction=0.05))
    assert big.pool.kv_capacity() // 2 >= 256 * 512
    assert big.config.max_num_seqs == big.kv_tables.k_table.shape[0] == 256
    assert big.graphs is not None and big.graphs.buckets[-1] == 256
