"""Async output processing: a step's outputs are built while the next step runs, and what
every request receives is exactly what it receives with the outputs built at once
(`EngineConfig.async_output` off): the same outputs, in the same order, each once, and the
pool given back whole. Each scenario runs both ways and compares them; a `Steered` model
scripts some requests' tokens (or fails their rows, or the pass) by their token index."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from services.common.errors import Internal, WorkerFault
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.engine_loop import EngineLoop
from services.gpu_worker.engine.forward_batch import ForwardBatch
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import FinishReason, Sequence, StepOutput
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.model.model import LlamaForCausalLM
from tests.gpu_worker.step_log import record_syncs
from tests.oracle import TINY_MHA, build_pair

PROMPT = list(range(40, 50))
EOS = 2  # the tiny model's


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return build_pair(TINY_MHA)[0]


def byte_ids(text: str) -> list[int]:
    return [b + ByteTokenizer.OFFSET for b in text.encode()]


class Sink:
    """One request's outputs, as comparable tuples, and the thread-safe count of its ends."""

    def __init__(self) -> None:
        self.outs: list[StepOutput] = []
        self.lock = threading.Lock()
        self.on_output: Callable[[StepOutput], None] | None = None  # told of each output

    def __call__(self, out: StepOutput) -> None:
        with self.lock:
            self.outs.append(out)
        if self.on_output is not None:
            self.on_output(out)

    def record(self) -> list[tuple[object, ...]]:
        return [
            (
                o.token_ids,
                o.text,
                o.finish_reason,
                o.prompt_tokens,
                o.completion_tokens,
                type(o.error).__name__ if o.error else None,
            )
            for o in self.outs
        ]

    @property
    def ended(self) -> bool:
        return any(o.finish_reason is not None for o in self.outs)

    @property
    def text(self) -> str:
        return "".join(o.text for o in self.outs)

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outs for t in o.token_ids]


@dataclass
class Steered:
    """The model, with some rows' logits scripted: `script[request_id][i]` forces token i
    of that request (a token id), or makes its logits NaN (None). `fail_at` makes the
    pass with that number (1-based) raise. Records each launch's (request_id, token index)."""

    model: LlamaForCausalLM
    engine: Engine | None = None
    script: dict[str, dict[int, int | None]] = field(default_factory=dict)
    fail_at: int = 0
    calls: int = 0
    launched: list[list[tuple[str, int]]] = field(default_factory=list)
    on_launch: Callable[[], None] | None = None  # told of each pass

    def __call__(self, batch: ForwardBatch) -> torch.Tensor:
        assert self.engine is not None
        by_row = {s.table_row: s for s in self.engine.scheduler.running}
        ends = torch.cumsum(batch.q_lens, 0).sub(1).tolist()
        sampled = set(batch.logits_rows.tolist())
        rows = batch.req_rows.tolist()
        seqs = [by_row[r] for r, e in zip(rows, ends, strict=True) if e in sampled]
        self.launched.append([(s.request_id, s.next_token_index) for s in seqs])
        self.calls += 1
        if self.on_launch is not None:
            self.on_launch()
        if self.calls == self.fail_at:
            raise RuntimeError("device lost")
        logits = self.model(batch).clone()  # an inference tensor cannot be written
        for row, seq in enumerate(seqs):
            plan = self.script.get(seq.request_id, {})
            index = seq.next_token_index
            if index in plan:
                forced = plan[index]
                logits[row] = float("nan") if forced is None else -1e4
                if forced is not None:
                    logits[row, forced] = 1e4
        return logits


def engine_for(
    model: LlamaForCausalLM, async_output: bool, *, overlap: bool = False, **script: object
) -> Engine:
    """An engine whose launches the tests count: without overlap scheduling unless asked
    (test_overlap_schedule.py compares the modes), which draws one more launch of a request
    ended by what its token says."""
    config = EngineConfig(
        pool_slots=4096, max_num_seqs=8, async_output=async_output, overlap_schedule=overlap
    )
    engine = Engine(model, config)
    engine.model = Steered(model, engine, **script)  # type: ignore[assignment,arg-type]
    return engine


def add(engine: Engine, rid: str, max_new: int = 12, **opts: object) -> Sink:
    sink = Sink()
    options = SamplingOptions(max_new_tokens=max_new, **{"ignore_eos": True, **opts})  # type: ignore[arg-type]
    engine.add(Sequence(rid, PROMPT, options, ByteTokenizer(), sink))
    return sink


def run(engine: Engine, max_steps: int = 100) -> None:
    """Step while there is work (a bounded number of times: work that never ends fails)."""
    for _ in range(max_steps):
        if not engine.has_work():
            return
        engine.step()
    raise AssertionError(f"still working after {max_steps} steps")


def assert_all_given_back(engine: Engine) -> None:
    """Every KV slot, promise and table row back, none twice (a double free would drive
    `kv_used` below zero or give a row back twice)."""
    pool = engine.pool
    assert (pool.kv_used, pool.promised) == (0, 0)
    assert engine.kv_tables.free_rows == engine.config.max_num_seqs
    assert not engine.has_work() and not engine.scheduler.running


def both_ways(scenario: Callable[[bool], dict[str, Sink]]) -> dict[str, Sink]:
    """The scenario with outputs deferred and not; their outputs must be the same."""
    deferred, direct = scenario(True), scenario(False)
    assert {k: s.record() for k, s in deferred.items()} == {
        k: s.record() for k, s in direct.items()
    }
    return deferred


def launches_of(engine: Engine, rid: str) -> list[int]:
    steered = engine.model
    assert isinstance(steered, Steered)
    return [i for launch in steered.launched for r, i in launch if r == rid]


# --- tests --------------------------------------------------------------------------------


def stop_and_other(
    model: LlamaForCausalLM, text: str, launched: dict[bool, list[int]], **engine_args: Any
) -> Callable[[bool], dict[str, Sink]]:
    """A scenario for `both_ways`: request `stop` (scripted to draw `text`, stop string
    "END") beside an unscripted `other`, run to the end; records `stop`'s launches in
    `launched` under the run's async_output."""
    script = {"stop": dict(enumerate(byte_ids(text)))}

    def scenario(async_output: bool) -> dict[str, Sink]:
        engine = engine_for(model, async_output, script=script, **engine_args)
        sinks = {"stop": add(engine, "stop", stop=("END",)), "other": add(engine, "other")}
        run(engine)
        assert_all_given_back(engine)
        launched[async_output] = launches_of(engine, "stop")
        return sinks

    return scenario


def test_a_stop_string_ends_a_request_the_next_step_already_holds(model):
    """'ab END cd': the stop string ends at token 5 ('D'); with deferral the next step
    already holds the request and draws its token 6, which is discarded: never streamed,
    never counted, and its slots are freed once."""
    launched: dict[bool, list[int]] = {}
    sinks = both_ways(stop_and_other(model, "ab END cd more", launched))
    assert launched[True] == list(range(7))  # token 6 was drawn, and dropped
    assert launched[False] == list(range(6))
    stop = sinks["stop"]
    assert stop.text == "ab " and stop.tokens == byte_ids("ab END")
    last = stop.outs[-1]
    assert last.finish_reason is FinishReason.STOP and last.completion_tokens == 6
    assert sinks["other"].outs[-1].completion_tokens == 12


def test_eos_and_max_new_tokens_end_requests_at_the_same_step(model):
    """Token 3: `eos` draws EOS, `length` reaches max_new_tokens, `both` does both (EOS
    wins); all three end at once, before the next step is scheduled, so no later step
    holds them, deferred or not."""
    script = {"eos": {3: EOS}, "both": {3: EOS}}
    launched = {}

    def scenario(async_output: bool) -> dict[str, Sink]:
        engine = engine_for(model, async_output, script=script)
        sinks = {
            "eos": add(engine, "eos", ignore_eos=False),
            "length": add(engine, "length", max_new=4),
            "both": add(engine, "both", max_new=4, ignore_eos=False),
            "long": add(engine, "long"),
        }
        run(engine)
        assert_all_given_back(engine)
        launched[async_output] = {r: launches_of(engine, r) for r in sinks}
        return sinks

    sinks = both_ways(scenario)
    for rid in ("eos", "length", "both"):
        assert launched[True][rid] == launched[False][rid] == [0, 1, 2, 3]
        assert [o.finish_reason is not None for o in sinks[rid].outs] == [False] * 3 + [True]
    assert sinks["eos"].outs[-1].finish_reason is FinishReason.EOS
    assert sinks["both"].outs[-1].finish_reason is FinishReason.EOS
    assert sinks["length"].outs[-1].finish_reason is FinishReason.LENGTH
    assert sinks["eos"].tokens[-1] == EOS and sinks["eos"].outs[-1].completion_tokens == 4
    assert sinks["long"].outs[-1].completion_tokens == 12


def test_aborting_a_request_whose_output_waits_delivers_it_first(model):
    """Aborted after three steps: its third token's output (still waiting, when deferred)
    comes before the abort, as it would have come without deferral. A request whose
    waiting output ends it is not aborted: its finish goes out instead."""
    aborted = {}

    def scenario(async_output: bool) -> dict[str, Sink]:
        engine = engine_for(model, async_output)
        sinks = {"victim": add(engine, "victim"), "done": add(engine, "done", max_new=3)}
        sinks["other"] = add(engine, "other")
        seqs = {s.request_id: s for s in engine.scheduler.waiting}
        for _ in range(3):
            engine.step()
        aborted[async_output] = [engine.abort(seqs[r].seq_id) for r in ("victim", "done")]
        run(engine)
        assert_all_given_back(engine)
        return sinks

    sinks = both_ways(scenario)
    assert aborted[True] == aborted[False] == [True, False]
    victim = sinks["victim"].outs
    assert [len(o.token_ids) for o in victim] == [1, 1, 1, 0]
    assert victim[-1].finish_reason is FinishReason.ABORTED and victim[-1].completion_tokens == 3
    assert sinks["done"].outs[-1].finish_reason is FinishReason.LENGTH
    assert sinks["other"].outs[-1].completion_tokens == 12


def test_a_request_failing_on_non_finite_logits_fails_alone(model):
    """`bad`'s token 4 has NaN logits: its four tokens' outputs, then its error; the others
    run on as without it."""
    script: dict[str, dict[int, int | None]] = {"bad": {4: None}}

    def scenario(async_output: bool) -> dict[str, Sink]:
        engine = engine_for(model, async_output, script=script)
        sinks = {r: add(engine, r) for r in ("a", "bad", "b")}
        run(engine)
        assert_all_given_back(engine)
        return sinks

    sinks = both_ways(scenario)
    bad = sinks["bad"].outs
    assert [len(o.token_ids) for o in bad] == [1, 1, 1, 1, 0]
    assert isinstance(bad[-1].error, Internal) and "non-finite" in str(bad[-1].error)
    for rid in ("a", "b"):
        assert sinks[rid].outs[-1].completion_tokens == 12 and sinks[rid].outs[-1].error is None


def test_a_failing_pass_fails_its_requests_after_the_last_steps_outputs(model):
    """The sixth pass raises. The fifth step's outputs (waiting, when deferred) go out once,
    before the failures; among them a stop string that ends `stop`, which the sixth pass
    held when deferred: it finishes, it does not fail."""
    launched: dict[bool, list[int]] = {}
    sinks = both_ways(stop_and_other(model, "abEND more text", launched, fail_at=6))
    assert launched[True] == list(range(6)) and launched[False] == list(range(5))
    assert sinks["stop"].text == "ab" and sinks["stop"].outs[-1].finish_reason is FinishReason.STOP
    other = sinks["other"].outs
    assert [len(o.token_ids) for o in other] == [1] * 5 + [0]
    assert isinstance(other[-1].error, WorkerFault)


@pytest.mark.parametrize("overlap", [False, True], ids=["overlap-off", "overlap-on"])
def test_a_step_failing_outside_the_pass_fails_everyone_after_the_last_outputs(model, overlap):
    """The engine loop: the fourth schedule raises; the third step's outputs go out once
    (with overlap scheduling: the step in flight is read back first), then every request
    fails with a WorkerFault."""

    def scenario(async_output: bool) -> dict[str, Sink]:
        engine = engine_for(model, async_output, overlap=overlap)
        real, calls = engine.scheduler.schedule, []

        def schedule() -> object:
            calls.append(1)
            if len(calls) == 4:
                raise RuntimeError("scheduler broke")
            return real()

        engine.scheduler.schedule = schedule  # type: ignore[method-assign,assignment]
        loop = EngineLoop(engine)
        sinks = {r: Sink() for r in ("a", "b")}
        for rid, sink in sinks.items():
            options = SamplingOptions(max_new_tokens=12, ignore_eos=True)
            loop.submit(Sequence(rid, PROMPT, options, ByteTokenizer(), sink))
        wait_for_ends(loop, sinks)
        return sinks

    sinks = both_ways(scenario)
    for sink in sinks.values():
        assert [len(o.token_ids) for o in sink.outs] == [1, 1, 1, 0]
        assert isinstance(sink.outs[-1].error, WorkerFault)


def test_the_engine_loop_delivers_every_output_when_work_stops(model):
    """Requests of different lengths through the engine thread: each gets every token and
    its end, the last step's outputs included (no step follows them)."""

    def scenario(async_output: bool) -> dict[str, Sink]:
        engine = engine_for(model, async_output)
        loop = EngineLoop(engine)
        sinks = {}
        for i, new in enumerate((1, 5, 9)):
            sinks[f"r{i}"] = sink = Sink()
            options = SamplingOptions(max_new_tokens=new, ignore_eos=True)
            loop.submit(Sequence(f"r{i}", PROMPT, options, ByteTokenizer(), sink))
        wait_for_ends(loop, sinks)
        assert_all_given_back(engine)
        return sinks

    sinks = both_ways(scenario)
    for rid, new in (("r0", 1), ("r1", 5), ("r2", 9)):
        outs = sinks[rid].outs
        assert len(outs) == new and outs[-1].completion_tokens == new
        assert outs[-1].finish_reason is FinishReason.LENGTH


def wait_for_ends(loop: EngineLoop, sinks: dict[str, Sink], timeout_s: float = 20) -> None:
    """Run `loop` until every sink has its end, then stop it."""
    loop.start()
    try:
        deadline = time.monotonic() + timeout_s
        while not all(s.ended for s in sinks.values()):
            assert time.monotonic() < deadline, {k: s.record() for k, s in sinks.items()}
            time.sleep(0.005)
        time.sleep(0.05)  # anything streamed after an end would show up now
    finally:
        loop.stop()


def test_a_steps_outputs_are_built_while_the_next_step_runs(model, monkeypatch):
    """The overlap itself: with deferral, step k's outputs go out after step k+1's pass and
    draw are launched and before its tokens are read back (the sync); without, before
    step k+1 is launched. The last step's go out in a step with nothing to run."""
    events: list[str] = []
    record_syncs(monkeypatch, events)

    def scenario(async_output: bool) -> list[str]:
        events.clear()
        engine = engine_for(model, async_output)
        steered = engine.model
        assert isinstance(steered, Steered)
        steered.on_launch = lambda: events.append("launch")
        for rid in ("a", "b"):
            sink = add(engine, rid, max_new=3)
            sink.on_output = lambda out, rid=rid: events.append(f"{rid}{len(out.token_ids)}")
        run(engine)
        return list(events)

    assert scenario(True) == [
        *("launch", "sync"),
        *("launch", "a1", "b1", "sync"),
        *("launch", "a1", "b1", "sync"),
        *("a1", "b1"),
    ]
    assert scenario(False) == [*("launch", "sync", "a1", "b1")] * 3
