"""The engine's KV slot tables: every token of every running request owns one K and one V slot
of the pool, and no slot is owned twice."""

from __future__ import annotations

import pytest
import torch

from services.common.base_model import load_hf_config
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import Sequence
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.memory.kv_slot_tables import KvSlotTables
from services.gpu_worker.model.model_config import ModelConfig
from services.gpu_worker.model.weights import build_dummy_model


def test_each_cached_token_owns_distinct_k_and_v_slots() -> None:
    config = ModelConfig.from_hf(load_hf_config("tiny"))
    model = build_dummy_model(config, 0, torch.float32, torch.device("cpu"))
    engine = Engine(model, EngineConfig(pool_slots=4096, max_num_seqs=8))
    options = SamplingOptions(max_new_tokens=6, ignore_eos=True)
    for i, length in enumerate((5, 17, 2)):
        prompt = list(range(3, 3 + length))
        engine.add(Sequence(f"r{i}", prompt, options, ByteTokenizer(), lambda out: None))
    sched, tables = engine.scheduler, engine.kv_tables
    for step in range(4):  # one prefill step, then decode steps
        engine.step()
        owned: list[int] = []
        for seq in sched.running:
            n = seq.num_allocated
            assert n == len(seq.prompt_ids) + step  # the prompt, then one token a step
            owned += tables.k_table[seq.table_row, :n].tolist()
            owned += tables.v_table[seq.table_row, :n].tolist()
        assert len(set(owned)) == len(owned) == engine.pool.kv_used
    while engine.has_work():
        engine.step()
    assert engine.pool.kv_used == 0


def test_kv_slot_tables_write_new_tokens_and_give_rows_back() -> None:
    tables = KvSlotTables(max_rows=3, max_len=6, device=torch.device("cpu"))
    first, second = tables.take_row(), tables.take_row()
    assert first != second and tables.free_rows == 1
    # Row `first` gets 2 tokens from position 0, row `second` 1 token from position 4:
    # K slots 10, 11, 12 then V slots 20, 21, 22, in row order.
    slots = torch.tensor([10, 11, 12, 20, 21, 22], dtype=torch.int32)
    tables.write([first, second], [0, 4], [2, 1], slots)
    assert tables.k_table[first, :2].tolist() == [10, 11]
    assert tables.v_table[first, :2].tolist() == [20, 21]
    assert tables.k_table[second, 4].item() == 12 and tables.v_table[second, 4].item() == 22
    tables.write([first], [2], [1], torch.tensor([13, 23], dtype=torch.int32))
    freed = tables.release_row(first, 3)
    assert freed.dtype == torch.int64 and freed.tolist() == [10, 11, 13, 20, 21, 23]
    assert tables.free_rows == 2
    assert {tables.take_row(), tables.take_row()} == {first, 3 - first - second}


def test_kv_slot_tables_live_on_the_pools_device() -> None:
    # The meta device stands for a GPU: the attention kernels read these tables there.
    meta = torch.device("meta")
    tables = KvSlotTables(max_rows=2, max_len=4, device=meta)
    assert tables.k_table.device == meta and tables.v_table.device == meta
    assert tables.k_table.dtype == tables.v_table.dtype == torch.int32


def test_kv_slot_tables_refuse_lists_of_different_lengths() -> None:
    # A missing start or count must fail, not write fewer tokens than the slots given.
    tables = KvSlotTables(max_rows=2, max_len=4, device=torch.device("cpu"))
    slots = torch.tensor([1, 2, 3, 4], dtype=torch.int32)
    with pytest.raises(ValueError):
        tables.write([0, 1], [0], [1, 1], slots)
    with pytest.raises(ValueError):
        tables.write([0], [0, 0], [2], slots)
