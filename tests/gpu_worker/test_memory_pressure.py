"""A pool too small for the load: requests wait their turn, finish, or are refused with a
clear status; none hangs; aborts and deadlines free memory within one step."""

from __future__ import annotations

import time

import pytest

from services.common.errors import DeadlineExceeded, InvalidArgument
from services.common.peft_adapter import load_peft_folder
from services.common.random_adapters import save_random_peft_adapter
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import FinishReason, Sequence, StepOutput
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from tests.oracle import TINY_MHA, build_pair


@pytest.fixture(scope="module")
def model():
    return build_pair(TINY_MHA)[0]


def _seq(rid: str, outs: list[StepOutput], max_new: int = 20, adapter=None) -> Sequence:
    return Sequence(
        rid,
        list(range(10, 20)),
        SamplingOptions(max_new_tokens=max_new, ignore_eos=True),
        ByteTokenizer(),
        outs.append,
        adapter,
    )


def _run_until_idle(engine: Engine, max_steps: int = 2000) -> int:
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < max_steps, "engine did not drain: something hangs"
    return steps


def test_more_requests_than_fit_all_finish_and_the_pool_ends_free(model, tmp_path):
    shape = model.config.shape
    adapters = [
        load_peft_folder(save_random_peft_adapter(tmp_path / f"a{i}", shape, 16, seed=i), shape, 64)
        for i in range(3)
    ]
    # Each request promises 2 * 30 slots; a rank-16 adapter takes 128: about 3 fit at once.
    engine = Engine(model, EngineConfig(pool_slots=320, max_num_seqs=64))
    outs: list[StepOutput] = []
    for i in range(30):
        engine.add(_seq(f"r{i}", outs, adapter=adapters[i % 3] if i % 4 else None))
    most_running = 0
    while engine.has_work():
        engine.step()
        most_running = max(most_running, len(engine.scheduler.running))
        stats = engine.pool.stats()
        assert stats.kv_slots + stats.adapter_slots + stats.free_slots == 320
    finished = [o for o in outs if o.finish_reason is not None]
    assert len(finished) == 30 and all(o.finish_reason == FinishReason.LENGTH for o in finished)
    assert 1 < most_running < 30  # memory, not the request count, limited the batch
    assert engine.pool.kv_used == 0 and engine.pool.promised == 0
    assert engine.adapters.evictions > 0


def test_request_that_can_never_fit_is_refused_at_once(model):
    engine = Engine(model, EngineConfig(pool_slots=100))
    with pytest.raises(InvalidArgument, match="can never fit"):
        engine.add(_seq("big", [], max_new=60))


def test_abort_frees_a_running_requests_slots_within_one_step(model):
    engine = Engine(model, EngineConfig(pool_slots=1000))
    outs: list[StepOutput] = []
    victim = _seq("victim", outs, max_new=200)
    engine.add(victim)
    engine.add(_seq("other", outs, max_new=200))
    for _ in range(3):
        engine.step()
    used_before = engine.pool.kv_used
    assert engine.abort(victim.seq_id)
    assert outs[-1].finish_reason == FinishReason.ABORTED and outs[-1].request_id == "victim"
    assert engine.pool.kv_used == used_before // 2
    engine.step()
    assert [s.request_id for s in engine.scheduler.running] == ["other"]


def test_waiting_request_past_its_deadline_is_dropped_before_prefill(model):
    engine = Engine(model, EngineConfig(pool_slots=1000))
    outs: list[StepOutput] = []
    late = _seq("late", outs)
    late.deadline = time.monotonic() - 0.01
    engine.add(late)
    engine.add(_seq("on-time", outs, max_new=2))
    _run_until_idle(engine)
    late_out = [o for o in outs if o.request_id == "late"]
    assert len(late_out) == 1 and isinstance(late_out[0].error, DeadlineExceeded)
    assert late_out[0].completion_tokens == 0
    assert engine.pool.kv_used == 0
