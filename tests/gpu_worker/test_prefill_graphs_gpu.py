"""Prefill graphs captured on CUDA: the engine serving chunked prompts beside decodes, with
adapters, replays them for its prompt-only steps and gives what it gives without them (run on
the device)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from services.common.peft_adapter import load_peft_folder
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine, StepResult
from services.gpu_worker.engine.forward_batch import ForwardBatch
from services.gpu_worker.engine.offline import Completion
from services.gpu_worker.engine.setup import build_engine
from services.gpu_worker.model.model_config import ModelConfig
from services.gpu_worker.model.weights import build_dummy_model
from tests.gpu_worker.step_log import record_steps
from tests.gpu_worker.test_engine_oracle import greedy_completions
from tests.gpu_worker.test_triton_path_oracle import ADAPTERS
from tests.oracle import TINY_MHA, build_pair, make_peft_adapters

NEW_TOKENS = 8


def _requests() -> list[tuple[list[int], str | None]]:
    """Prompts of 20..146 tokens (a budget of 200 chunks the later ones beside decodes),
    every adapter kind and base requests."""
    names: list[str | None] = [*(a.name for a in ADAPTERS), None]
    gen = torch.Generator().manual_seed(5)
    return [
        (torch.randint(3, 259, (20 + 14 * i,), generator=gen).tolist(), names[i % len(names)])
        for i in range(10)
    ]


def _serve(
    engine: Engine, requests: list[tuple[list[int], str | None]], adapters: dict[str, Any]
) -> tuple[list[Completion], list[StepResult | None]]:
    results = record_steps(engine)
    completions = greedy_completions(engine, requests, adapters, NEW_TOKENS)
    return completions, results


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_cuda_prefill_graphs_replay_and_match_the_eager_engine(dtype: torch.dtype, tmp_path: Path):
    _, hf = build_pair(TINY_MHA)
    _, paths = make_peft_adapters(hf, ADAPTERS, tmp_path)
    config = ModelConfig.from_hf(TINY_MHA)
    ours = build_dummy_model(config, 0, dtype, torch.device("cuda"))
    adapters = {n: load_peft_folder(p, config.shape, max_rank=32) for n, p in paths.items()}
    requests = _requests()

    def engine(prefill_graphs: bool) -> Engine:
        settings = EngineConfig(
            pool_slots=8192,
            max_num_seqs=16,
            max_prefill_tokens=200,
            max_rank=32,
            prefill_graphs=prefill_graphs,
        )
        return build_engine(ours, settings)

    graphed = engine(True)
    graphs = graphed.prefill_graphs
    assert graphs is not None and graphs.pairs == [(64, 4), (64, 16), (128, 4), (128, 16),
                                                   (200, 4), (200, 16)]  # fmt: skip
    # Each replay against the eager pass of the same batch, run first (the replay's K/V are
    # the ones later steps read).
    replay = graphs.run
    worst = [0.0]

    def checked(batch: ForwardBatch) -> torch.Tensor:
        eager = ours(batch)
        got = replay(batch)
        assert got.shape == eager.shape
        worst[0] = max(worst[0], float((got - eager).abs().max()) if got.numel() else 0.0)
        return got

    graphs.run = checked  # type: ignore[method-assign]
    with_graphs, results = _serve(graphed, requests, adapters)
    without, _ = _serve(engine(False), requests, adapters)
    ran = [r for r in results if r is not None and r.prefill_seqs]
    assert graphs.replays == sum(r.prompt_graph for r in ran) > 0
    assert not any(r.prompt_graph and r.decode_seqs for r in ran)  # mixed steps: eager
    assert worst[0] < (1e-3 if dtype == torch.float32 else 0.1), worst[0]
    same = sum(a.token_ids == b.token_ids for a, b in zip(with_graphs, without, strict=True))
    print(f"\n[{dtype}] {graphs.replays} replays, worst logit gap {worst[0]:.2e}, {same}/10 same")
    if dtype == torch.float32:
        assert same == len(requests)
        for a, b in zip(with_graphs, without, strict=True):
            torch.testing.assert_close(
                torch.tensor(a.logprobs), torch.tensor(b.logprobs), atol=1e-3, rtol=1e-3
            )
    else:  # bf16 GEMMs of another row count may round differently: near-ties can flip
        assert same >= len(requests) - 2
    assert graphed.pool.kv_used == 0
