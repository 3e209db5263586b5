"""Graph capture with Python's garbage collector held off (engine/graph_capture.py): a cycle
freed mid-capture that holds a pinned buffer makes torch's host allocator call the CUDA event
API, which the capture forbids (run on the device)."""

from __future__ import annotations

import gc

import pytest
import torch

from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.setup import build_engine
from services.gpu_worker.model.model_config import ModelConfig
from services.gpu_worker.model.weights import build_dummy_model
from tests.oracle import TINY_MHA


class _Cycle:
    """Garbage only the cyclic collector frees, holding a pinned buffer a queued copy used."""

    def __init__(self) -> None:
        self.me = self
        self.pinned = torch.ones(1024).pin_memory()
        self.pinned.to("cuda", non_blocking=True)


@pytest.mark.gpu
def test_every_captured_forward_runs_with_the_collector_off_and_it_is_back_on_after():
    model = build_dummy_model(
        ModelConfig.from_hf(TINY_MHA), 0, torch.bfloat16, torch.device("cuda")
    )
    seen: list[tuple[bool, bool]] = []  # (capturing, collector enabled) per forward
    model.register_forward_pre_hook(
        lambda *_: seen.append((torch.cuda.is_current_stream_capturing(), gc.isenabled()))
    )
    for _ in range(200):
        _Cycle()  # left for the collector, as a dropped engine's buffers would be
    engine = build_engine(model, EngineConfig(pool_slots=4096, prefill_graphs=True))
    captured = [enabled for capturing, enabled in seen if capturing]
    assert engine.graphs is not None and engine.prefill_graphs is not None
    assert captured, "no forward ran under capture"
    assert not any(captured)
    assert gc.isenabled()
