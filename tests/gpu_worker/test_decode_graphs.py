"""The static inputs of the decode graphs: what a replay would read (CPU, no capture)."""

from __future__ import annotations

import pytest
import torch

from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.decode_graphs import DecodeGraphs
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import Sequence
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.model.lora_backend import TritonLoraBackend
from tests.oracle import TINY_MHA, build_pair


def _decode_batch(engine: Engine, count: int):
    for i in range(count):
        opts = SamplingOptions(max_new_tokens=8, ignore_eos=True)
        prompt = list(range(10 + i, 20 + 2 * i))
        engine.add(Sequence(f"r{i}", prompt, opts, ByteTokenizer(), lambda _: None))
    engine.step()  # prefill
    seqs = engine.scheduler.schedule().decode
    return engine.build_batch(seqs)


def test_padding_rows_are_harmless_and_reset_after_a_larger_batch():
    model, _ = build_pair(TINY_MHA)
    # The graphs' LoRA backend must be graph-safe (the CPU's default is not); no adapter runs.
    # Batches are built between steps from the host's tokens: no step left in flight.
    config = EngineConfig(pool_slots=2048, max_num_seqs=8, overlap_schedule=False)
    engine = Engine(model, config, TritonLoraBackend())
    graphs = DecodeGraphs(model, engine.build_batch([]), 8, (1000, 1001), max_rank=64)
    assert graphs.buckets == [1, 2, 4, 8]

    big = _decode_batch(engine, 5)
    assert graphs.fill(big) == 8
    small_engine = Engine(model, config)
    small = _decode_batch(small_engine, 3)
    assert graphs.fill(small) == 4
    view = graphs._view(4, lora="all")
    for name in ("input_ids", "positions", "new_k_slots", "new_v_slots", "req_rows", "seq_lens"):
        assert torch.equal(
            getattr(view, name)[:3], getattr(small, name).to(getattr(view, name).dtype)
        )
    # Row 3 held request 4 of the big batch; as padding it must now write only to scratch
    # slots, attend to nothing and use no adapter.
    assert view.new_k_slots[3] == 1000 and view.new_v_slots[3] == 1001
    assert view.seq_lens[3] == 0 and view.req_lora[3] == -1
    assert view.max_rank == 64 and view.mlp_lora
    attention_only = graphs._view(4, lora="attention")
    assert attention_only.max_rank == 64 and not attention_only.mlp_lora
    assert graphs._view(4, lora="none").max_rank == 0


def test_a_backend_that_plans_per_batch_is_refused():
    """The torch reference finds each adapter's rows through a per-batch plan, which a graph
    would freeze at capture time: replays would silently skip LoRA."""
    model, _ = build_pair(TINY_MHA)
    engine = Engine(model, EngineConfig(pool_slots=2048, max_num_seqs=8))
    with pytest.raises(ValueError, match="TorchLoraBackend cannot run inside CUDA graphs"):
        DecodeGraphs(model, engine.build_batch([]), 8, (1000, 1001), max_rank=64)
