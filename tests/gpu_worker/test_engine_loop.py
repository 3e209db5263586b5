"""The engine thread's inbox: each request is checked once, at submission, and the
waiting-queue bound counts what is queued, however far the engine thread has got."""

from __future__ import annotations

import threading
import time

import pytest

from services.common.errors import InvalidArgument, ResourceExhausted
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.engine_loop import EngineLoop
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import Sequence, StepOutput
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from tests.oracle import TINY_MHA, build_pair


@pytest.fixture(scope="module")
def model():
    return build_pair(TINY_MHA)[0]


class Finished:
    """Collects finishing outputs from the engine thread."""

    def __init__(self) -> None:
        self.outputs: list[StepOutput] = []
        self._lock = threading.Lock()

    def __call__(self, out: StepOutput) -> None:
        if out.finish_reason is not None:
            with self._lock:
                self.outputs.append(out)

    def wait_for(self, count: int, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.outputs) < count:
            assert time.monotonic() < deadline, f"{len(self.outputs)} of {count} finished"
            time.sleep(0.005)


def _seq(sink: Finished, prompt_len: int = 8, max_new: int = 4) -> Sequence:
    options = SamplingOptions(max_new_tokens=max_new, ignore_eos=True)
    return Sequence("r", list(range(3, 3 + prompt_len)), options, ByteTokenizer(), sink)


def test_each_request_is_checked_once(model, monkeypatch):
    engine = Engine(model, EngineConfig(pool_slots=512, max_num_seqs=4))
    checked: list[int] = []
    real_check = engine.check

    def check(seq: Sequence) -> None:
        checked.append(seq.seq_id)
        real_check(seq)

    monkeypatch.setattr(engine, "check", check)
    loop = EngineLoop(engine)
    loop.start()
    try:
        sink = Finished()
        seqs = [_seq(sink) for _ in range(5)]
        for seq in seqs:
            loop.submit(seq)
        with pytest.raises(InvalidArgument, match="can never fit"):
            loop.submit(_seq(sink, max_new=1000))
        sink.wait_for(5)
        assert all(o.error is None for o in sink.outputs)
    finally:
        loop.stop()
    assert sorted(checked[:5]) == sorted(s.seq_id for s in seqs) and len(checked) == 6


def test_the_waiting_bound_counts_queued_requests_and_frees_as_they_run(model):
    engine = Engine(model, EngineConfig(pool_slots=2048, max_num_seqs=1, max_waiting=2))
    loop = EngineLoop(engine)  # not started yet: submissions pile up in its inbox
    sink = Finished()
    loop.submit(_seq(sink))
    loop.submit(_seq(sink))
    with pytest.raises(ResourceExhausted, match=r"waiting queue full \(2\)"):
        loop.submit(_seq(sink))
    loop.start()
    try:
        sink.wait_for(2)
        # Both ran: the bound frees again, round after round.
        for round_ in range(3):
            deadline = time.monotonic() + 10
            while loop.stats.waiting_requests or loop.stats.running_requests:
                assert time.monotonic() < deadline
                time.sleep(0.005)
            loop.submit(_seq(sink))
            loop.submit(_seq(sink))
            sink.wait_for(4 + 2 * round_)
    finally:
        loop.stop()
    assert len(sink.outputs) == 8 and all(o.error is None for o in sink.outputs)
