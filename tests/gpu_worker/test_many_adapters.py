"""More adapters than the pool holds: 200 adapters, room for about 10 beside the KV cache.

Every request uses its own adapter, so adapters must be evicted and reloaded all the time;
each output must still be exactly the HF + PEFT oracle's."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from services.common.peft_adapter import load_peft_folder
from services.common.random_adapters import save_random_peft_adapter
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.offline import generate_offline
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from tests.gpu_worker.adapter_copies import AdapterCopies
from tests.oracle import TINY_MHA, build_pair, greedy_oracle

# The oracle loads and deletes one PEFT adapter at a time; PEFT warns on each delete.
pytestmark = pytest.mark.filterwarnings("ignore:Adapter .* was active which is now deleted")

NUM_ADAPTERS = 200
NEW_TOKENS = 4


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    ours, hf = build_pair(TINY_MHA)
    folder = tmp_path_factory.mktemp("adapters")
    shape = ours.config.shape
    paths = [
        save_random_peft_adapter(folder / f"a{i:03d}", shape, (8, 16)[i % 2], seed=i, std=0.2)
        for i in range(NUM_ADAPTERS)
    ]
    adapters = [load_peft_folder(path, shape, 64) for path in paths]
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, 259, (6 + i % 5,), generator=gen).tolist() for i in range(200)]
    # PEFT reads each folder itself; one adapter loaded at a time keeps the oracle fast.
    peft_model = PeftModel.from_pretrained(hf, str(paths[0]), adapter_name=paths[0].name).eval()
    expected = []
    for i, (path, prompt) in enumerate(zip(paths, prompts, strict=True)):
        if i:
            peft_model.load_adapter(str(path), adapter_name=path.name)
        expected.append(greedy_oracle(peft_model, prompt, path.name, NEW_TOKENS)[0])
        if i:
            peft_model.delete_adapter(path.name)
    base = [greedy_oracle(peft_model, p, None, NEW_TOKENS)[0] for p in prompts[:20]]
    assert sum(b != e for b, e in zip(base, expected, strict=False)) >= 10, "adapters too weak"
    return ours, adapters, prompts, expected


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "split"])
def test_two_hundred_adapters_through_a_pool_that_holds_ten(setup, monkeypatch, unified: bool):
    ours, adapters, prompts, expected = setup
    # rank 8 takes 64 slots, rank 16 128; 8 running requests take at most 8 * 2 * 14 slots;
    # split, adapters get 960 of the 1200.
    engine = Engine(
        ours,
        EngineConfig(
            pool_slots=1200, max_num_seqs=8, unified_pool=unified, adapter_region_fraction=0.8
        ),
    )
    copies = AdapterCopies(engine.pool, monkeypatch)
    options = SamplingOptions(max_new_tokens=NEW_TOKENS, ignore_eos=True)
    done = generate_offline(engine, ByteTokenizer(), prompts, [options] * NUM_ADAPTERS, adapters)
    for i, completion in enumerate(done):
        assert completion.token_ids == expected[i], (
            f"request {i} (adapter {adapters[i].adapter_id})"
        )
    manager = engine.adapters
    assert manager.hits + manager.misses == NUM_ADAPTERS  # one acquire per request
    assert copies.count >= NUM_ADAPTERS  # each adapter copied in at least once
    assert manager.evictions >= copies.count - 12
    assert len(engine.adapters.resident_ids()) <= 12
    assert engine.pool.kv_used == 0 and engine.pool.promised == 0
