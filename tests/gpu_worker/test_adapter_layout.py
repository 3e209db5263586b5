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
from services.gpu_worker.memory.adapter_layout import (
    adapter_slot_count,
    segments_of,
    write_adapter,
)
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


def _written(adapter: CanonicalAdapter) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """The pool buffer after `adapter` was written into shuffled slots of a pool whose every
    slot held garbage first, the slots, and its segments."""
    segments = segments_of(adapter, WIDTH)
    total = sum(s.a_len + s.b_len for s in segments.values())
    buffer = torch.full((LAYERS, total + 7, WIDTH), float("nan"))
    slots = torch.randperm(total + 7, generator=torch.Generator().manual_seed(3))[:total]
    write_adapter(buffer, slots, adapter, segments)
    return buffer, slots, segments


def test_each_row_takes_ceil_len_over_width_slots_and_pads_with_zeros():
    ranks = {"q_proj": 4, "v_proj": 16, "gate_proj": 8, "down_proj": 2}
    adapter = _adapter(ranks)
    buffer, slots, segments = _written(adapter)
    want_slots = sum(
        r * (math.ceil(DIMS[p][0] / WIDTH) + math.ceil(DIMS[p][1] / WIDTH))
        for p, r in ranks.items()
    )
    assert slots.numel() == want_slots == adapter_slot_count(adapter, WIDTH)
    for proj, rank in ranks.items():
        seg = segments[proj]
        assert seg.rank == rank  # its own rank, not the adapter's largest (16)
        for start, matrix in (
            (seg.a_start, adapter.lora_a[proj]),
            (seg.b_start, adapter.lora_b[proj].transpose(1, 2)),
        ):
            features = matrix.shape[2]
            per_row = math.ceil(features / WIDTH)
            for row in range(rank):
                first = start + row * per_row
                flat = buffer[:, slots[first : first + per_row]].reshape(LAYERS, -1)
                assert torch.equal(flat[:, :features], matrix[:, row])
                assert not flat[:, features:].any()  # the padded tail is zeros


def test_an_adapter_stored_in_another_dtype_is_written_in_the_pools():
    adapter = _adapter({"o_proj": 3, "up_proj": 5}, seed=4)
    half = CanonicalAdapter("h", 5, 1.0, 1.0, "")
    half.lora_a = {p: t.half() for p, t in adapter.lora_a.items()}
    half.lora_b = {p: t.half() for p, t in adapter.lora_b.items()}
    ours, slots, _ = _written(half)
    from_fp32, _, _ = _written(_adapter({"o_proj": 3, "up_proj": 5}, seed=4))
    assert ours.dtype == torch.float32
    assert torch.equal(ours[:, slots], from_fp32[:, slots].half().float())


@pytest.mark.gpu
@pytest.mark.parametrize("background", [False, True], ids=["foreground", "prefetch"])
def test_on_cuda_loads_lay_out_each_row_like_the_host_does(background: bool):
    """The CUDA path: fp32 weights staged through pinned memory, laid out on the device in
    bf16 (by a prefetch on the side stream, too), equal to the host's layout of them."""
    device = torch.device("cuda")
    pool = UnifiedMemoryPool(LAYERS, 512, WIDTH, torch.bfloat16, device)
    manager = AdapterManager(pool, max_loras=4, max_adapter_slots=256)
    adapter = _adapter({"q_proj": 4, "v_proj": 16, "gate_proj": 8, "down_proj": 2})
    pool.buffer.fill_(float("nan"))  # what a slot held before must not show through
    resident = manager.acquire(adapter) if not background else manager.load(adapter, True)
    if background:
        assert resident.ready is not None
        manager.acquire(adapter)  # the compute stream waits for the side stream's copy
        assert resident.ready is None
    on_host, host_slots, _ = _written(_as_bf16(adapter))
    got = pool.buffer[:, resident.slots].float().cpu()
    assert torch.equal(got, on_host[:, host_slots].float())


def _as_bf16(adapter: CanonicalAdapter) -> CanonicalAdapter:
    """The adapter rounded to bf16 (kept in fp32): what a bf16 pool holds of it."""
    rounded = CanonicalAdapter(adapter.adapter_id, adapter.rank, 1.0, 1.0, "")
    rounded.lora_a = {p: t.bfloat16().float() for p, t in adapter.lora_a.items()}
    rounded.lora_b = {p: t.bfloat16().float() for p, t in adapter.lora_b.items()}
    return rounded


def test_meta_holds_each_projections_rank_and_zero_for_the_rest():
    ranks = {"k_proj": 8, "up_proj": 32, "down_proj": 16}
    segments = segments_of(_adapter(ranks), WIDTH)
    total = sum(s.a_len + s.b_len for s in segments.values())
    tables = AdapterTables(4, total, torch.device("cpu"))
    row = tables.add(torch.arange(total), segments)
    assert tables.meta.shape[1] == 7
    for proj, index in PROJ_INDEX.items():
        rank, a_start, b_start = tables.meta[row, index].tolist()
        assert rank == ranks.get(proj, 0)
        if proj in ranks:
            assert (a_start, b_start) == (segments[proj].a_start, segments[proj].b_start)


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
