"""Every per-request tensor a kernel reads starts 16-byte aligned, whatever the batch's size:
Triton compiles a kernel per pointer alignment, so a row that is misaligned for some batch
sizes would stall those steps with a compilation (seen on the device before the rows were
padded)."""

from __future__ import annotations

import threading
from typing import Any

from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.engine_loop import EngineLoop
from services.gpu_worker.engine.forward_batch import ForwardBatch
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import Sequence, StepOutput
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from tests.oracle import TINY_MHA, build_pair

PER_REQUEST = ("req_rows", "q_lens", "ctx_lens", "req_lora", "q_starts", "seq_lens")


def test_per_request_rows_are_aligned_for_every_batch_size(monkeypatch):
    engine = Engine(build_pair(TINY_MHA)[0], EngineConfig(pool_slots=4096, max_num_seqs=8))
    build = engine.batches.build
    misaligned: list[tuple[int, str]] = []
    sizes: set[int] = set()

    def checked_build(*args: Any, **kwargs: Any) -> ForwardBatch:
        batch = build(*args, **kwargs)
        sizes.add(len(batch.host_q_lens))
        for name in PER_REQUEST:
            if getattr(batch, name).data_ptr() % 16:
                misaligned.append((len(batch.host_q_lens), name))
        return batch

    monkeypatch.setattr(engine.batches, "build", checked_build)
    loop = EngineLoop(engine)
    done = threading.Semaphore(0)

    def sink(out: StepOutput) -> None:
        if out.finish_reason is not None:
            done.release()

    # Requests ending one step apart: the batch shrinks through every size from 7 to 1.
    for i in range(7):
        options = SamplingOptions(max_new_tokens=2 + i, ignore_eos=True)
        loop.submit(Sequence(f"r{i}", list(range(3, 6 + i)), options, ByteTokenizer(), sink))
    loop.start()
    try:
        for _ in range(7):
            assert done.acquire(timeout=60)
    finally:
        loop.stop()
    assert sizes >= set(range(1, 8))
    assert misaligned == []
