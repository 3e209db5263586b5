"""How adapters on any of the seven linear layers lie over pool slots and in the adapter
tables: each projection at its own rank, rows longer than a slot over ceil(len / W) slots
with the last one zero-padded, and table rows wide enough for the largest adapter."""

from __future__ import annotations

import math

import pytest
import torch

from services.common.lora_format import CanonicalAdapter
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.offline import generate_offline
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.memory.adapter_layout import adapter_slot_count, pack_adapter
from services.gpu_worker.memory.adapter_manager import AdapterManager
from services.gpu_worker.memory.adapter_tables import PROJ_INDEX, AdapterTables
from services.gpu_worker.memory.memory_pool import UnifiedMemoryPool
from tests.oracle import TINY_MHA, build_pair

# TINY_MHA: hidden 64, 4 heads of 16, MLP 160; slot width W = 64 (4 kv heads x 16).
HIDDEN, INTER, WIDTH, LAYERS = 64, 160, 64, 2
DIMS = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (HIDDEN, HIDDEN),
    "v_proj": (HIDDEN, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (HIDDEN, INTER),
    "up_proj": (HIDDEN, INTER),
    "down_proj": (INTER, HIDDEN),
}


def _adapter(ranks: dict[str, int], seed: int = 0) -> CanonicalAdapter:
    gen = torch.Generator().manual_seed(seed)
    adapter = CanonicalAdapter(f"a{seed}", max(ranks.values()), 1.0, 1.0, "")
    for proj, rank in ranks.items():
        in_f, out_f = DIMS[proj]
        adapter.lora_a[proj] = torch.randn(LAYERS, rank, in_f, generator=gen)
        adapter.lora_b[proj] = torch.randn(LAYERS, out_f, rank, generator=gen)
    return adapter


def test_each_row_takes_ceil_len_over_width_slots_and_pads_with_zeros():
    ranks = {"q_proj": 4, "v_proj": 16, "gate_proj": 8, "down_proj": 2}
    adapter = _adapter(ranks)
    packed = pack_adapter(adapter, WIDTH, torch.float32, pin=False)
    want_slots = sum(
        r * (math.ceil(DIMS[p][0] / WIDTH) + math.ceil(DIMS[p][1] / WIDTH))
        for p, r in ranks.items()
    )
    assert packed.num_slots == want_slots == adapter_slot_count(adapter, WIDTH)
    for proj, rank in ranks.items():
        seg = packed.segments[proj]
        assert seg.rank == rank  # its own rank, not the adapter's largest (16)
        for start, matrix in (
            (seg.a_start, adapter.lora_a[proj]),
            (seg.b_start, adapter.lora_b[proj].transpose(1, 2)),
        ):
            features = matrix.shape[2]
            per_row = math.ceil(features / WIDTH)
            for row in range(rank):
                first = start + row * per_row
                flat = packed.data[:, first : first + per_row].reshape(LAYERS, -1)
                assert torch.equal(flat[:, :features], matrix[:, row])
                assert not flat[:, features:].any()  # the padded tail is zeros


def test_meta_holds_each_projections_rank_and_zero_for_the_rest():
    ranks = {"k_proj": 8, "up_proj": 32, "down_proj": 16}
    packed = pack_adapter(_adapter(ranks), WIDTH, torch.float32, pin=False)
    tables = AdapterTables(4, packed.num_slots, torch.device("cpu"))
    row = tables.add(torch.arange(packed.num_slots), packed.segments)
    assert tables.meta.shape[1] == 7
    for proj, index in PROJ_INDEX.items():
        rank, a_start, b_start = tables.meta[row, index].tolist()
        assert rank == ranks.get(proj, 0)
        if proj in ranks:
            assert (a_start, b_start) == (
                packed.segments[proj].a_start,
                packed.segments[proj].b_start,
            )


def test_table_rows_fit_an_adapter_of_max_rank_on_every_projection():
    model, _ = build_pair(TINY_MHA)
    engine = Engine(model, EngineConfig(pool_slots=4096, max_num_seqs=4, max_loras=16, max_rank=16))
    full = _adapter(dict.fromkeys(DIMS, 16))
    options = SamplingOptions(max_new_tokens=2, ignore_eos=True)
    (done,) = generate_offline(engine, ByteTokenizer(), [[5, 6, 7]], [options], [full])
    assert len(done.token_ids) == 2


def test_an_adapter_the_tables_refuse_gives_its_pool_slots_back():
    pool = UnifiedMemoryPool(LAYERS, 512, WIDTH, torch.float32, torch.device("cpu"))
    small = _adapter({"q_proj": 2}, seed=1)
    manager = AdapterManager(pool, max_loras=4, max_adapter_slots=adapter_slot_count(small, WIDTH))
    free = pool.free_adapter_slots()
    too_wide = _adapter({"q_proj": 2, "down_proj": 8}, seed=2)
    with pytest.raises(ValueError, match="table width"):
        manager.load(too_wide)
    assert pool.free_adapter_slots() == free
    manager.load(small)
    assert pool.free_adapter_slots() == free - adapter_slot_count(small, WIDTH)
