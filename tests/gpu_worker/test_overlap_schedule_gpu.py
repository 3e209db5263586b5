"""Overlap scheduling on CUDA, with decode and prefill graphs: the same tokens as without it,
and a decode step that never waits for the device but for the previous step's tokens.

Every request is admitted at once and ends by its length, so both runs compute the same
batches (overlap leaves a length-ended request out of the next step, as its end would): the
tokens must agree bit for bit, bf16 included."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from services.common.lora_format import CanonicalAdapter
from services.common.peft_adapter import load_peft_folder
from services.common.random_adapters import save_random_peft_adapter
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.offline import generate_offline
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import Sequence
from services.gpu_worker.engine.setup import build_engine
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.model.model import LlamaForCausalLM
from services.gpu_worker.model.model_config import ModelConfig
from services.gpu_worker.model.weights import build_dummy_model
from tests.oracle import TINY_GQA

CUDA = torch.device("cuda")


def _model() -> LlamaForCausalLM:
    return build_dummy_model(ModelConfig.from_hf(TINY_GQA), 0, torch.bfloat16, CUDA)


def _engine(model: LlamaForCausalLM, overlap: bool, **config: object) -> Engine:
    settings = {"pool_slots": 60_000, "max_num_seqs": 32, "max_prefill_tokens": 64, **config}
    return build_engine(model, EngineConfig(overlap_schedule=overlap, **settings))  # type: ignore[arg-type]


@pytest.mark.gpu
def test_overlap_on_cuda_gives_the_tokens_it_gives_without(tmp_path: Path):
    """Chunked prompts, adapters and base, greedy and seeded: the same tokens, bit for bit."""
    model = _model()
    shape = model.config.shape
    adapters: list[CanonicalAdapter | None] = [None]
    for rank in (8, 32):
        folder = save_random_peft_adapter(tmp_path / f"r{rank}", shape, rank, rank, std=0.2)
        adapters.append(load_peft_folder(folder, shape, 64))
    gen = torch.Generator().manual_seed(5)
    count = 24
    prompts = [
        torch.randint(3, 259, (4 + 9 * i % 90,), generator=gen).tolist() for i in range(count)
    ]
    options = [
        SamplingOptions(max_new_tokens=3 + i % 11, ignore_eos=True, seed=i)
        if i % 2
        else SamplingOptions(max_new_tokens=3 + i % 11, ignore_eos=True, temperature=0.8, seed=i)
        for i in range(count)
    ]
    chosen = [adapters[i % 3] for i in range(count)]

    def tokens(overlap: bool) -> list[list[int]]:
        engine = _engine(model, overlap)
        done = generate_offline(engine, ByteTokenizer(), prompts, options, chosen)
        assert engine.pool.kv_used == 0
        return [c.token_ids for c in done]

    assert tokens(True) == tokens(False)


@pytest.mark.gpu
def test_an_overlapped_decode_step_waits_only_for_the_last_steps_tokens():
    """Decode steps under CUDA graphs with overlap: nothing in a step synchronizes the device
    (torch's sync debug mode raises on a blocking copy, `.item()`, `.tolist()` of a device
    tensor...); the step waits only on the previous draw's event, which the mode allows."""
    model = _model()
    engine = _engine(model, overlap=True, max_prefill_tokens=512)
    for i in range(16):
        opts = SamplingOptions(max_new_tokens=40, ignore_eos=True, temperature=0.7, top_k=8)
        prompt = list(range(10 + i, 30 + i))
        engine.add(Sequence(f"r{i}", prompt, opts, ByteTokenizer(), lambda _: None))
    for _ in range(4):  # prompts, then decodes: the allocator and the graphs settle
        engine.step()
    torch.cuda.set_sync_debug_mode("error")
    try:
        results = [engine.step() for _ in range(8)]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(r is not None and r.graph and r.decode_seqs == 16 for r in results)
    engine.flush()
    assert all(len(s.output_ids) == 12 for s in engine.scheduler.running)
