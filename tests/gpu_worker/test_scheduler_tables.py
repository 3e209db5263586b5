"""The scheduler's slot tables: every token of every running request owns one K and one V slot
of the pool, and no slot is owned twice."""

from __future__ import annotations

import torch

from services.common.base_model import load_hf_config
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import Sequence
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.model.model_config import ModelConfig
from services.gpu_worker.model.weights import build_dummy_model


def test_each_cached_token_owns_distinct_k_and_v_slots() -> None:
    config = ModelConfig.from_hf(load_hf_config("tiny"))
    model = build_dummy_model(config, 0, torch.float32, torch.device("cpu"))
    engine = Engine(model, pool_slots=4096, max_num_seqs=8)
    options = SamplingOptions(max_new_tokens=6, ignore_eos=True)
    for i, length in enumerate((5, 17, 2)):
        prompt = list(range(3, 3 + length))
        engine.add(Sequence(f"r{i}", prompt, options, ByteTokenizer(), lambda out: None))
    sched = engine.scheduler
    for step in range(4):  # one prefill step, then decode steps
        engine.step()
        owned: list[int] = []
        for seq in sched.running:
            n = seq.num_allocated
            assert n == len(seq.prompt_ids) + step  # the prompt, then one token a step
            owned += sched.k_table[seq.table_row, :n].tolist()
            owned += sched.v_table[seq.table_row, :n].tolist()
        assert len(set(owned)) == len(owned) == engine.pool.kv_used
    while engine.has_work():
        engine.step()
    assert engine.pool.kv_used == 0
