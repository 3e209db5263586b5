"""A LoRA backend that asks for decode batches in descending adapter rank
(`LoraBackend.decode_in_rank_order`) gets them so, and every request's tokens are the ones it
gets in admission order: ordering a batch moves its rows, nothing else. The Triton kernels
that ask for it (`LoraLaunch.row_request_major`) are checked against HF+PEFT in
test_triton_path_oracle.py."""

from __future__ import annotations

from collections.abc import Sequence as Seq
from pathlib import Path

import pytest
import torch

from services.common.peft_adapter import load_peft_folder
from services.common.random_adapters import save_random_peft_adapter
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import Sequence, StepOutput
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.memory.adapter_manager import ResidentAdapter
from services.gpu_worker.model.lora_backend import LoraGroup, TorchLoraBackend
from tests.oracle import TINY_MHA, build_pair

RANKS = (4, None, 16, 8, 32, 4, None, 16)  # admission order; None: the base model


class RankOrdered(TorchLoraBackend):
    """The reference backend asking for rank order, recording each decode batch's ranks."""

    decode_in_rank_order = True

    def __init__(self) -> None:
        super().__init__()
        self.decode_ranks: list[list[int]] = []

    def prepare(
        self, residents: Seq[ResidentAdapter | None], q_lens: Seq[int], device: torch.device
    ) -> list[LoraGroup]:
        if all(n == 1 for n in q_lens):
            self.decode_ranks.append([r.rank if r is not None else 0 for r in residents])
        return super().prepare(residents, q_lens, device)


def _run(engine: Engine, adapters: list, seeded: bool) -> list[list[int]]:
    tokens: list[list[int]] = []
    for i, adapter in enumerate(adapters):
        got: list[int] = []
        tokens.append(got)

        def sink(out: StepOutput, got: list[int] = got) -> None:
            got.extend(out.token_ids)

        opts = SamplingOptions(max_new_tokens=6, ignore_eos=True)
        if seeded and i % 2:
            opts = SamplingOptions(max_new_tokens=6, ignore_eos=True, temperature=0.9, seed=i)
        prompt = list(range(30 + i, 40 + 2 * i))
        engine.add(Sequence(f"r{i}", prompt, opts, ByteTokenizer(), sink, adapter))
    while engine.has_work():
        engine.step()
    return tokens


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlap"])
def test_decode_batches_run_in_rank_order_with_the_same_tokens(tmp_path: Path, overlap: bool):
    model = build_pair(TINY_MHA)[0]
    shape = model.config.shape
    adapters = [
        None
        if rank is None
        else load_peft_folder(
            save_random_peft_adapter(tmp_path / f"a{i}", shape, rank, seed=i), shape, 64, f"a{i}"
        )
        for i, rank in enumerate(RANKS)
    ]
    config = EngineConfig(pool_slots=8192, overlap_schedule=overlap)
    plain = _run(Engine(model, config, TorchLoraBackend()), adapters, seeded=True)
    backend = RankOrdered()
    ordered = _run(Engine(model, config, backend), adapters, seeded=True)
    assert ordered == plain and all(len(t) == 6 for t in plain)
    assert backend.decode_ranks
    for ranks in backend.decode_ranks:
        assert ranks == sorted(ranks, reverse=True), ranks
    assert max(len(set(r)) for r in backend.decode_ranks) == len(set(RANKS))
