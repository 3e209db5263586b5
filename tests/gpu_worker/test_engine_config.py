"""EngineConfig: one set of engine defaults, checked once when made, shared by the worker's
flags and the engine."""

from __future__ import annotations

import pytest
import torch

from services.common.config import ConfigError, load_config
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.memory.memory_pool import CPU_DEFAULT_SLOTS
from services.gpu_worker.serving.config import WorkerConfig
from tests.oracle import TINY_MHA, build_pair


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (
            {"max_loras": 72, "max_num_seqs": 64},
            r"^--max-loras \(MANYLORA_MAX_LORAS\): 72 must exceed --max-num",
        ),
        ({"max_loras": 9}, r"^--max-loras \(MANYLORA_MAX_LORAS\): 9 must exceed --max-num"),
        ({"max_num_seqs": -1}, r"^--max-num-seqs \(MANYLORA_MAX_NUM_SEQS\): -1 is below"),
        ({"max_waiting": 0}, r"^--max-waiting \(MANYLORA_MAX_WAITING\): 0 is below"),
        ({"pool_slots": -1}, r"^--pool-slots \(MANYLORA_POOL_SLOTS\): -1 is below"),
        ({"gpu_memory_fraction": 0.0}, r"^--gpu-memory-fraction \(.*\): 0.0 is not in"),
        ({"adapter_region_fraction": 1.0}, r"^--adapter-region-fraction \(.*\): 1.0 is not"),
        ({"dtype": "fp8"}, r"^--dtype \(MANYLORA_DTYPE\): 'fp8' is not one of"),
    ],
)
def test_a_setting_that_cannot_work_is_refused_naming_its_flag(settings, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(**settings)
    with pytest.raises(ConfigError, match=message):
        WorkerConfig(**settings)


def test_the_worker_flags_fill_the_engine_config():
    env = {"MANYLORA_MAX_LORAS": "20"}
    config = load_config(WorkerConfig, ["--max-num-seqs", "3", "--no-unified-pool"], env=env)
    assert config.engine_config() == EngineConfig(max_num_seqs=3, max_loras=20, unified_pool=False)
    with pytest.raises(ConfigError, match=r"^--max-loras \(MANYLORA_MAX_LORAS\): 20 must"):
        load_config(WorkerConfig, ["--max-num-seqs", "12"], env=env)


@pytest.fixture(scope="module")
def model():
    return build_pair(TINY_MHA)[0]


def test_the_engine_sizes_its_pool_from_the_config(model):
    assert Engine(model, EngineConfig()).pool.num_slots == CPU_DEFAULT_SLOTS  # 0: sized
    split = Engine(model, EngineConfig(pool_slots=1000, unified_pool=False)).pool
    assert (split.kv_capacity(), split.adapter_capacity()) == (750, 250)  # a quarter
    engine = Engine(model, EngineConfig(pool_slots=1000, max_num_seqs=5, max_model_len=40))
    assert engine.kv_tables.k_table.shape == (5, 40)
    assert engine.model_config.max_position_embeddings > 40
    assert engine.pool.buffer.dtype == torch.float32  # the model's, wherever it lies
