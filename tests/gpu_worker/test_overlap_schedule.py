"""Overlap scheduling (`EngineConfig.overlap_schedule`): each step is launched before the
previous step's tokens are read back, its decodes taking their input ids from those tokens on
the device. What a request receives must not change: each scenario runs with overlap off
(the reference) and on, with async outputs on and off, and every request's outputs are
compared; the HF + PEFT oracle checks an overlapped engine's greedy tokens on its own. A
`Steered` model (test_async_output.py) scripts some requests' tokens by their token index."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from services.common.config import load_config
from services.common.errors import Internal, WorkerFault
from services.common.lora_format import CanonicalAdapter
from services.common.peft_adapter import load_peft_folder
from services.common.random_adapters import save_random_peft_adapter
from services.gpu_worker.engine import sampling
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import FinishReason, Sequence
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.model.model import LlamaForCausalLM
from services.gpu_worker.serving.config import WorkerConfig
from tests.gpu_worker.step_log import record_syncs
from tests.gpu_worker.test_async_output import (
    EOS,
    Sink,
    Steered,
    assert_all_given_back,
    byte_ids,
    launches_of,
    run,
)
from tests.gpu_worker.test_chunked_prefill import _setup
from tests.gpu_worker.test_engine_oracle import _mixed_requests, check_engine_against_oracle
from tests.oracle import TINY_GQA, TINY_MHA, build_pair

Mode = tuple[bool, bool]  # (overlap_schedule, async_output)
REFERENCE: Mode = (False, True)
MODES: list[Mode] = [REFERENCE, (True, True), (True, False)]


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    return build_pair(TINY_MHA)[0]


@pytest.fixture(scope="module")
def adapters(
    model: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory
) -> list[CanonicalAdapter]:
    shape = model.config.shape
    folder = tmp_path_factory.mktemp("adapters")
    return [
        load_peft_folder(save_random_peft_adapter(folder / f"r{r}", shape, r, seed=r), shape, 64)
        for r in (4, 16)
    ]


def engine_for(
    model: LlamaForCausalLM,
    mode: Mode,
    script: dict[str, dict[int, int | None]] | None = None,
    **config: object,
) -> Engine:
    overlap, async_output = mode
    settings = {"pool_slots": 4096, "max_num_seqs": 8, **config}
    engine = Engine(
        model,
        EngineConfig(overlap_schedule=overlap, async_output=async_output, **settings),  # type: ignore[arg-type]
    )
    engine.model = Steered(model, engine, script=script or {})  # type: ignore[assignment]
    return engine


def request(
    engine: Engine,
    rid: str,
    prompt_len: int,
    max_new: int,
    adapter: CanonicalAdapter | None = None,
    **opts: object,
) -> Sink:
    prompt = [3 + (i * 37 + prompt_len) % 250 for i in range(prompt_len)]
    options = SamplingOptions(max_new_tokens=max_new, **{"ignore_eos": True, **opts})  # type: ignore[arg-type]
    sink = Sink()
    engine.add(Sequence(rid, prompt, options, ByteTokenizer(), sink, adapter))
    return sink


def every_way(scenario: Callable[[Mode], dict[str, Sink]]) -> dict[Mode, dict[str, Sink]]:
    """The scenario in every mode; each request's outputs must be the reference's."""
    runs = {mode: scenario(mode) for mode in MODES}
    reference = {rid: sink.record() for rid, sink in runs[REFERENCE].items()}
    for mode in MODES[1:]:
        assert {rid: sink.record() for rid, sink in runs[mode].items()} == reference, mode
    return runs


SCRIPT: dict[str, dict[int, int | None]] = {
    "eos": {3: EOS},
    "stop-id": {5: 77},
    "stop-text": dict(enumerate(byte_ids("xy END z"))),
    "bad": {4: None},  # NaN logits at its token 4
}


def test_a_mixed_run_streams_the_same_outputs_with_overlap_on_and_off(model, adapters):
    """Chunked prompts (7 tokens a step) of 3-30 tokens, at most 4 running, arrivals between
    steps; greedy and seeded requests, base and two adapters; ends by EOS, a stop token id,
    a stop string, the length (one after its first token) and a row's non-finite logits."""
    launched: dict[Mode, dict[str, list[int]]] = {}

    def scenario(mode: Mode) -> dict[str, Sink]:
        engine = engine_for(model, mode, SCRIPT, max_prefill_tokens=7, max_num_seqs=4)
        a, b = adapters
        sinks = {
            "long": request(engine, "long", 23, 9),
            "eos": request(engine, "eos", 5, 12, ignore_eos=False),
            "seeded": request(
                engine, "seeded", 12, 8, a, temperature=0.8, top_k=20, top_p=0.9, seed=11
            ),
            "one": request(engine, "one", 9, 1),
            "stop-id": request(engine, "stop-id", 3, 12, b, stop_token_ids=frozenset({77})),
        }
        for _ in range(3):
            engine.step()
        sinks["stop-text"] = request(engine, "stop-text", 17, 12, stop=("END",))
        sinks["bad"] = request(engine, "bad", 4, 10, a)
        sinks["hot"] = request(engine, "hot", 30, 6, b, temperature=1.0, seed=3)
        for _ in range(3):
            engine.step()
        sinks["late"] = request(engine, "late", 8, 5)
        run(engine)
        assert_all_given_back(engine)
        launched[mode] = {rid: launches_of(engine, rid) for rid in sinks}
        return sinks

    sinks = every_way(scenario)[REFERENCE]
    ends = {
        rid: (s.outs[-1].finish_reason, s.outs[-1].completion_tokens) for rid, s in sinks.items()
    }
    assert ends["eos"] == (FinishReason.EOS, 4) and ends["stop-id"] == (FinishReason.STOP, 6)
    assert ends["stop-text"] == (FinishReason.STOP, 6) and sinks["stop-text"].text == "xy "
    assert isinstance(sinks["bad"].outs[-1].error, Internal) and len(sinks["bad"].tokens) == 4
    lengths = {"long": 9, "seeded": 8, "one": 1, "hot": 6, "late": 5}
    for mode in MODES:  # a request ended by its length is never launched past it
        for rid, max_new in lengths.items():
            assert ends[rid] == (FinishReason.LENGTH, max_new)
            assert launched[mode][rid] == list(range(max_new)), (mode, rid)
    # EOS is known only once its token is back, when the next step holds the request.
    assert launched[(True, True)]["eos"] == [0, 1, 2, 3, 4] and launched[REFERENCE]["eos"] == [
        0,
        1,
        2,
        3,
    ]


def test_an_overlapped_engine_matches_hf_peft_with_chunks_and_arrivals(tmp_path: Path):
    """Greedy tokens and logprobs against the oracle: prompts in chunks of 3 tokens, at most
    4 requests running, so the others are admitted as running ones end."""
    ours, peft_model, adapters = _setup(TINY_GQA, tmp_path)
    requests = _mixed_requests(list(adapters), seed=3)
    config = EngineConfig(
        pool_slots=8192, max_num_seqs=4, max_prefill_tokens=3, overlap_schedule=True
    )
    check_engine_against_oracle(Engine(ours, config), peft_model, requests, adapters, 6)


def test_an_abort_while_a_step_is_in_flight_drops_that_steps_token(model):
    """Aborted after three steps: with overlap the third step's tokens are still on the
    device, so the victim's third token is never streamed or counted, and `done`, whose
    third and last token is in flight, ends ABORTED instead of by its length."""
    aborted: dict[Mode, list[bool]] = {}

    def scenario(mode: Mode) -> dict[str, Sink]:
        engine = engine_for(model, mode)
        sinks = {rid: request(engine, rid, 10, n) for rid, n in (("victim", 12), ("done", 3))}
        sinks["other"] = request(engine, "other", 10, 12)
        seqs = {s.request_id: s for s in engine.scheduler.waiting}
        for _ in range(3):
            engine.step()
        aborted[mode] = [engine.abort(seqs[rid].seq_id) for rid in ("victim", "done")]
        run(engine)
        assert_all_given_back(engine)
        return sinks

    runs = {mode: scenario(mode) for mode in MODES}
    off, on = runs[REFERENCE], runs[(True, True)]
    assert aborted[REFERENCE] == [True, False] and aborted[(True, True)] == [True, True]
    for mode in MODES[1:]:
        assert runs[mode]["other"].record() == off["other"].record()
        for rid in ("victim", "done"):
            outs = runs[mode][rid].outs
            assert runs[mode][rid].tokens == off[rid].tokens[:2]
            assert outs[-1].finish_reason is FinishReason.ABORTED
            assert (
                outs[-1].completion_tokens == 2
                and sum(o.finish_reason is not None for o in outs) == 1
            )
    assert on["victim"].tokens == off["victim"].tokens[:-1]


def test_the_next_step_is_launched_before_the_last_ones_tokens_are_read(model, monkeypatch):
    """The overlap itself: each launch comes before the sync of the step before it, and
    the previous step's outputs go out in between."""
    events: list[str] = []
    record_syncs(monkeypatch, events)
    engine = engine_for(model, (True, True))
    steered = engine.model
    assert isinstance(steered, Steered)
    steered.on_launch = lambda: events.append("launch")
    for rid in ("a", "b"):
        sink = request(engine, rid, 10, 3)
        sink.on_output = lambda out, rid=rid: events.append(f"{rid}{len(out.token_ids)}")
    run(engine)
    outputs = ("a1", "b1")
    assert events == [
        *("launch", "launch", "sync"),
        *("launch", *outputs, "sync"),
        *(*outputs, "sync", *outputs),
    ]


def test_a_failing_pass_fails_its_requests_after_the_step_in_flight(model):
    """The fifth pass raises: the fourth step, in flight, is read back and its outputs
    delivered first, so every request gets the same tokens, then the same WorkerFault."""
    script: dict[str, dict[int, int | None]] = {"stop": dict(enumerate(byte_ids("abcEND more")))}

    def scenario(mode: Mode) -> dict[str, Sink]:
        engine = engine_for(model, mode, script)
        steered = engine.model
        assert isinstance(steered, Steered)
        steered.fail_at = 5
        sinks = {"stop": request(engine, "stop", 10, 12, stop=("END",))}
        sinks["other"] = request(engine, "other", 10, 12)
        run(engine)
        assert_all_given_back(engine)
        return sinks

    sinks = every_way(scenario)[REFERENCE]
    assert [len(o.token_ids) for o in sinks["other"].outs] == [1] * 4 + [0]
    assert isinstance(sinks["other"].outs[-1].error, WorkerFault)


def test_a_draw_that_fails_to_launch_is_read_back_at_once(model, monkeypatch):
    """The third draw fails to launch: its rows are sampled one by one from its logits (the
    same tokens), so no step may take its tokens from the device; overlap resumes after."""
    real_launch, calls = sampling._launch_batch, []

    def flaky(*args: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("no memory for the sort")
        return real_launch(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(sampling, "_launch_batch", flaky)

    def scenario(mode: Mode) -> dict[str, Sink]:
        calls.clear()
        engine = engine_for(model, mode)
        sinks = {"greedy": request(engine, "greedy", 10, 6)}
        sinks["seeded"] = request(engine, "seeded", 14, 6, temperature=0.9, seed=5)
        run(engine)
        assert_all_given_back(engine)
        return sinks

    sinks = every_way(scenario)[REFERENCE]
    assert all(
        s.outs[-1].completion_tokens == 6 and s.outs[-1].error is None for s in sinks.values()
    )


def test_a_read_back_failing_under_a_later_step_fails_that_steps_requests(model, monkeypatch):
    """The third read-back fails. Without overlap each row is sampled again from its logits
    (the same tokens); with it a later step has taken the tokens on the device and may have
    overwritten the logits, so the step's requests fail instead, alone: a request admitted
    after them runs on, and nothing is streamed after a failure."""
    real_collect, calls = sampling._collect, []

    def flaky(launched: object) -> object:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("device fault")
        return real_collect(launched)  # type: ignore[arg-type]

    monkeypatch.setattr(sampling, "_collect", flaky)

    def scenario(mode: Mode) -> dict[str, Sink]:
        calls.clear()
        engine = engine_for(model, mode)
        sinks = {rid: request(engine, rid, 10, 6) for rid in ("a", "b")}
        for _ in range(4):
            engine.step()
        sinks["c"] = request(engine, "c", 10, 6)
        run(engine)
        assert_all_given_back(engine)
        return sinks

    runs = {mode: scenario(mode) for mode in MODES}
    assert all(s.outs[-1].completion_tokens == 6 for s in runs[REFERENCE].values())
    for mode in MODES[1:]:
        assert runs[mode]["c"].record() == runs[REFERENCE]["c"].record()
        for rid in ("a", "b"):
            outs = runs[mode][rid].outs
            assert runs[mode][rid].tokens == runs[REFERENCE][rid].tokens[:2]
            assert isinstance(outs[-1].error, Internal) and outs[-1].finish_reason is not None
            assert all(o.finish_reason is None for o in outs[:-1])


def test_the_worker_flag_and_its_variable_reach_the_engine():
    """`--overlap-schedule` / `MANYLORA_OVERLAP_SCHEDULE`, on by default."""
    assert load_config(WorkerConfig, [], env={}).engine_config().overlap_schedule
    off_by_env = load_config(WorkerConfig, [], env={"MANYLORA_OVERLAP_SCHEDULE": "false"})
    assert not off_by_env.engine_config().overlap_schedule
    off = load_config(
        WorkerConfig, ["--no-overlap-schedule"], env={"MANYLORA_OVERLAP_SCHEDULE": "1"}
    )
    assert not off.engine_config().overlap_schedule
    assert load_config(WorkerConfig, ["--overlap-schedule"], env={}).overlap_schedule
