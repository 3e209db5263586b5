"""Prefetch on the CPU: adapters of waiting requests are loaded before those requests are
admitted, and prefetching changes no output (with eviction under a tight pool too)."""

from __future__ import annotations

import pytest
import torch

from services.common.lora_format import CanonicalAdapter
from services.common.peft_adapter import load_peft_folder
from services.common.random_adapters import save_random_peft_adapter
from services.gpu_worker.engine import scheduler as scheduler_module
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.offline import Completion, generate_offline
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import Sequence, StepOutput
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from tests.gpu_worker.adapter_copies import AdapterCopies
from tests.oracle import TINY_MHA, build_pair

NUM_ADAPTERS = 12
OPTIONS = SamplingOptions(max_new_tokens=4, ignore_eos=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    ours, _ = build_pair(TINY_MHA)
    folder = tmp_path_factory.mktemp("adapters")
    shape = ours.config.shape
    adapters = [
        load_peft_folder(
            save_random_peft_adapter(folder / f"a{i:02d}", shape, 8, seed=i, std=0.2), shape, 64
        )
        for i in range(NUM_ADAPTERS)
    ]
    gen = torch.Generator().manual_seed(7)
    prompts = [
        torch.randint(3, 259, (6 + i % 4,), generator=gen).tolist() for i in range(NUM_ADAPTERS)
    ]
    return ours, adapters, prompts


def _submit(
    engine: Engine, prompts: list[list[int]], adapters: list[CanonicalAdapter]
) -> list[Sequence]:
    sequences = []
    for i, (prompt, adapter) in enumerate(zip(prompts, adapters, strict=True)):

        def sink(out: StepOutput) -> None:
            assert out.error is None

        seq = Sequence(f"r{i}", prompt, OPTIONS, ByteTokenizer(), sink, adapter)
        engine.add(seq)
        sequences.append(seq)
    return sequences


def test_adapters_of_waiting_requests_are_resident_before_their_admission(setup, monkeypatch):
    ours, adapters, prompts = setup
    engine = Engine(ours, EngineConfig(pool_slots=8192, max_num_seqs=2))
    manager = engine.adapters
    copies = AdapterCopies(engine.pool, monkeypatch)
    sequences = _submit(engine, prompts[:5], adapters[:5])
    engine.step()
    waiting = [s for s in sequences if s in engine.scheduler.waiting]
    assert len(waiting) == 3  # two running, three behind them
    # Loaded ahead of their turn: all five adapters are in, two acquired by running requests.
    assert all(manager.is_resident(s.adapter) for s in waiting if s.adapter is not None)
    assert copies.count == 5
    assert (manager.hits, manager.misses) == (0, 2)
    while engine.has_work():
        engine.step()
    # The three waiting requests found their adapters resident; nothing was loaded twice.
    assert (manager.hits, manager.misses, copies.count) == (3, 2, 5)


def _run(
    engine: Engine, adapters: list[CanonicalAdapter | None], prompts: list[list[int]]
) -> list[list[int]]:
    n = len(prompts)
    done: list[Completion] = generate_offline(
        engine, ByteTokenizer(), prompts, [OPTIONS] * n, list(adapters)
    )
    return [c.token_ids for c in done]


@pytest.mark.parametrize("unified", [True, False], ids=["unified", "split"])
def test_prefetch_changes_no_output_when_the_pool_evicts(setup, monkeypatch, unified: bool):
    ours, adapters, prompts = setup

    def engine() -> Engine:
        # A rank-8 adapter takes 64 slots: room for about five of the twelve at once.
        return Engine(
            ours,
            EngineConfig(
                pool_slots=420,
                max_num_seqs=2,
                unified_pool=unified,
                adapter_region_fraction=330 / 420,
            ),
        )

    with_prefetch = engine()
    prefetched = _run(with_prefetch, adapters, prompts)
    monkeypatch.setattr(scheduler_module, "PREFETCH_WINDOW", 0)
    without = engine()
    plain = _run(without, adapters, prompts)
    assert prefetched == plain
    base = _run(engine(), [None] * NUM_ADAPTERS, prompts)
    assert sum(b != p for b, p in zip(base, plain, strict=True)) >= NUM_ADAPTERS // 2, (
        "adapters too weak for the comparison to mean anything"
    )
    # Every request has its own adapter: only a prefetch can make an admission a hit.
    assert without.adapters.hits == 0
    assert with_prefetch.adapters.hits > 0
    assert with_prefetch.adapters.evictions > 0 and without.adapters.evictions > 0
