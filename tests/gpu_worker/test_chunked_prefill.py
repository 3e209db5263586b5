"""Chunked prefill in the engine: prompts longer than the per-step budget run over several
steps, beside decodes, and give the same greedy tokens as HF transformers + PEFT (the oracle)
and as an engine that prefills each prompt at once; non-final chunks produce no token and no
output; aborting a request part-way through its prompt gives the pool back."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from services.common.lora_format import CanonicalAdapter
from services.common.peft_adapter import load_peft_folder
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import FinishReason, Sequence, StepOutput
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.model.model import LlamaForCausalLM
from tests.gpu_worker.step_log import record_steps
from tests.gpu_worker.test_engine_oracle import (
    _mixed_requests,
    check_engine_against_oracle,
    greedy_completions,
)
from tests.oracle import MIXED_ADAPTERS, TINY_GQA, TINY_MHA, build_pair, make_peft_adapters

NEW_TOKENS = 8


def _setup(
    hf_config: dict[str, Any], folder: Path
) -> tuple[LlamaForCausalLM, Any, dict[str, CanonicalAdapter]]:
    ours, hf = build_pair(hf_config)
    peft_model, paths = make_peft_adapters(hf, MIXED_ADAPTERS, folder)
    shape = ours.config.shape
    adapters = {name: load_peft_folder(path, shape, max_rank=64) for name, path in paths.items()}
    return ours, peft_model, adapters


def _engine(
    model: LlamaForCausalLM, budget: int, max_num_seqs: int = 64, overlap: bool = True
) -> Engine:
    config = EngineConfig(
        pool_slots=8192,
        max_num_seqs=max_num_seqs,
        max_prefill_tokens=budget,
        overlap_schedule=overlap,
    )
    return Engine(model, config)


# Budgets far below the prompts (3..40 tokens), so nearly every prompt runs in chunks, most
# of them beside other requests' decodes; max_num_seqs 4 makes requests join while others
# decode or are part-way through their prompt.
CASES = [
    pytest.param(TINY_MHA, 3, 4, id="mha-budget3-4seqs"),
    pytest.param(TINY_GQA, 7, 64, id="gqa-budget7"),
]


@pytest.mark.parametrize(("hf_config", "budget", "max_num_seqs"), CASES)
def test_chunked_prefill_matches_hf_peft_and_the_unchunked_engine(
    hf_config: dict[str, Any], budget: int, max_num_seqs: int, tmp_path: Path
):
    ours, peft_model, adapters = _setup(hf_config, tmp_path)
    requests = _mixed_requests(list(adapters), seed=2)
    assert max(len(p) for p, _ in requests) > 5 * budget
    chunked = _engine(ours, budget, max_num_seqs)
    check_engine_against_oracle(chunked, peft_model, requests, adapters, NEW_TOKENS)
    assert chunked.steps > len(requests)

    def run(engine: Engine) -> list[Any]:
        return greedy_completions(engine, requests, adapters, NEW_TOKENS)

    whole, parts = run(_engine(ours, 4096)), run(_engine(ours, budget, max_num_seqs))
    for a, b in zip(whole, parts, strict=True):
        assert a.token_ids == b.token_ids
        torch.testing.assert_close(torch.tensor(a.logprobs), torch.tensor(b.logprobs))


class Outputs:
    def __init__(self) -> None:
        self.outputs: list[StepOutput] = []

    def __call__(self, out: StepOutput) -> None:
        self.outputs.append(out)


def _request(prompt_len: int, sink: Outputs, new_tokens: int = 3) -> Sequence:
    prompt = [3 + (i * 37) % 250 for i in range(prompt_len)]
    options = SamplingOptions(max_new_tokens=new_tokens, ignore_eos=True)
    return Sequence(f"p{prompt_len}", prompt, options, ByteTokenizer(), sink)


def test_only_the_chunk_that_ends_a_prompt_gives_a_token(tmp_path: Path):
    ours, _ = build_pair(TINY_MHA)
    engine = _engine(ours, budget=4)
    sink = Outputs()
    seq = _request(10, sink)
    engine.add(seq)
    infos = []
    while seq.prefilling:
        cached = seq.num_cached
        info = engine.step()
        assert info is not None
        infos.append(info)
        if seq.prefilling:  # a chunk short of the prompt's end: no token, nothing streamed
            assert seq.num_cached == cached + 4 and seq.output_ids == []
            assert sink.outputs == [] and seq.first_token_at is None
    assert [(i.prefill_seqs, i.decode_seqs, i.tokens) for i in infos] == [(1, 0, 4)] * 2 + [
        (1, 0, 2)
    ]
    # The last chunk sampled the first token, timed at that step; its output waits for the
    # next step (async output processing) or a flush.
    assert sink.outputs == []
    engine.flush()
    assert len(sink.outputs) == 1 and len(seq.output_ids) == 1
    assert seq.first_token_at is not None and seq.num_cached == 10
    while engine.has_work():
        engine.step()
    assert [len(o.token_ids) for o in sink.outputs] == [1, 1, 1]
    assert sink.outputs[-1].finish_reason is FinishReason.LENGTH
    assert sink.outputs[-1].time_to_first_token_ms > 0 and engine.pool.kv_used == 0


def test_a_chunk_rides_beside_running_decodes_within_the_budget():
    ours, _ = build_pair(TINY_MHA)
    engine = _engine(ours, budget=5)
    first, second = Outputs(), Outputs()
    short, long = _request(3, first, new_tokens=8), _request(9, second)
    engine.add(short)
    engine.add(long)
    shapes = []
    while long.prefilling:
        info = engine.step()
        assert info is not None
        shapes.append((info.prefill_seqs, info.decode_seqs, info.tokens))
    # 3 + 2 prompt tokens, then `short` decodes beside `long`'s next chunks (5, then 2).
    assert shapes == [(2, 0, 5), (1, 1, 6), (1, 1, 3)]
    engine.flush()  # the last step's outputs
    assert len(first.outputs) == 3 and len(second.outputs) == 1


def test_aborting_part_way_through_a_prompt_frees_everything():
    ours, _ = build_pair(TINY_GQA)
    engine = _engine(ours, budget=4)
    sink, other = Outputs(), Outputs()
    seq, bystander = _request(11, sink), _request(2, other)
    engine.add(bystander)
    engine.add(seq)
    engine.step()
    engine.step()  # `bystander` decodes beside `seq`'s second chunk
    engine.flush()  # the last step's outputs
    assert seq.prefilling and seq.num_cached == 6 and len(other.outputs) == 2
    assert engine.abort(seq.seq_id)
    assert [o.finish_reason for o in sink.outputs] == [FinishReason.ABORTED]
    while engine.has_work():
        engine.step()
    assert other.outputs[-1].finish_reason is FinishReason.LENGTH
    assert (engine.pool.kv_used, engine.pool.promised, engine.kv_tables.free_rows) == (0, 0, 64)


def _check_batch(engine: Engine, batch: Any, seqs: list[Sequence], q_lens: list[int]) -> None:
    """The batch against a token-by-token listing of what each request brings."""
    ids: list[int] = []
    positions, k_slots, v_slots, logits_rows, starts = [], [], [], [], []
    k_table, v_table = engine.kv_tables.k_table, engine.kv_tables.v_table
    for seq, n in zip(seqs, q_lens, strict=True):
        ctx = seq.num_cached
        starts.append(len(ids))
        if ctx < len(seq.prompt_ids):
            ids += seq.prompt_ids[ctx : ctx + n]
        else:
            assert n == 1
            ids.append(seq.output_ids[-1])
        for pos in range(ctx, ctx + n):
            positions.append(pos)
            k_slots.append(int(k_table[seq.table_row, pos]))
            v_slots.append(int(v_table[seq.table_row, pos]))
        if ctx + n >= len(seq.prompt_ids):
            logits_rows.append(len(ids) - 1)
    assert batch.input_ids.tolist() == ids
    assert batch.positions.tolist() == positions
    assert batch.new_k_slots.tolist() == k_slots and batch.new_v_slots.tolist() == v_slots
    assert batch.logits_rows.tolist() == logits_rows
    assert batch.q_starts.tolist() == starts and batch.q_lens.tolist() == q_lens
    ctx_lens = [s.num_cached for s in seqs]
    assert batch.ctx_lens.tolist() == ctx_lens == batch.host_ctx_lens
    assert batch.seq_lens.tolist() == [c + n for c, n in zip(ctx_lens, q_lens, strict=True)]
    assert batch.req_rows.tolist() == [s.table_row for s in seqs]
    assert batch.req_lora.tolist() == [s.resident.row if s.resident else -1 for s in seqs]
    assert batch.max_q_len == max(q_lens, default=1)
    for name in ("req_rows", "q_starts", "q_lens", "ctx_lens", "seq_lens", "req_lora"):
        tensor = getattr(batch, name)
        assert tensor.dtype == torch.int32 and tensor.is_contiguous(), name


def test_every_batch_lists_each_tokens_id_position_and_slots(tmp_path: Path):
    """Every step of a run with chunks, decodes and adapters, checked token by token (each
    step's tokens read back before the next is built: with overlap scheduling a decode's
    input id comes from the device, see test_overlap_schedule.py)."""
    ours, _, adapters = _setup(TINY_MHA, tmp_path)
    engine = _engine(ours, budget=9, max_num_seqs=8, overlap=False)
    build = engine.build_batch
    shapes = set()

    def checked(
        seqs: list[Sequence], q_lens: list[int] | None = None, in_flight: Any = None
    ) -> Any:
        batch = build(seqs, q_lens, in_flight)
        assert q_lens is not None
        _check_batch(engine, batch, seqs, q_lens)
        kinds = {(s.num_cached > 0, n > 1) for s, n in zip(seqs, q_lens, strict=True)}
        shapes.add(tuple(sorted(kinds)))
        return batch

    engine.build_batch = checked  # type: ignore[method-assign]
    choices: list[CanonicalAdapter | None] = [None, *adapters.values()]
    for length, adapter in zip((4, 12, 3, 10, 15), choices, strict=True):
        seq = _request(length, Outputs(), new_tokens=6)
        seq.adapter = adapter
        engine.add(seq)
    while engine.has_work():
        engine.step()
    # Chunks after earlier chunks (ctx > 0, several tokens) ran beside decodes.
    assert any((True, True) in s and (True, False) in s for s in shapes)
    assert engine.pool.kv_used == 0


class GraphLike:
    """Stands in for DecodeGraphs on the CPU: like a captured graph, it returns the logits of
    every row of the batch, whatever the batch's logits_rows."""

    def __init__(self, model: LlamaForCausalLM) -> None:
        self.model, self.runs = model, 0

    def fits(self, batch_size: int) -> bool:
        return True

    def run(self, batch: Any) -> torch.Tensor:
        self.runs += 1
        batch.logits_rows = torch.arange(batch.input_ids.shape[0])
        return self.model(batch)


def test_decode_graphs_never_run_a_one_token_chunk_that_does_not_end_its_prompt():
    """With a budget of 1, every prompt runs one token a step: those batches have one token
    per request, like decode, but a chunk short of its prompt's end must not be sampled."""
    ours, _ = build_pair(TINY_MHA)

    def run(graphs: bool) -> tuple[list[list[int]], int]:
        engine = _engine(ours, budget=1)
        stub = GraphLike(ours)
        if graphs:
            engine.graphs = stub  # type: ignore[assignment]
        sinks = [Outputs(), Outputs()]
        for length, sink in zip((4, 6), sinks, strict=True):
            engine.add(_request(length, sink, new_tokens=5))
        while engine.has_work():
            engine.step()
        return [[t for o in s.outputs for t in o.token_ids] for s in sinks], stub.runs

    (with_graphs, runs), (without, _) = run(True), run(False)
    assert with_graphs == without and all(len(t) == 5 for t in without)
    assert runs > 0


@pytest.mark.parametrize("hf_config", [TINY_MHA, TINY_GQA], ids=["mha", "gqa"])
def test_mixed_steps_split_into_a_graphed_decode_pass_match_hf_peft(
    hf_config: dict[str, Any], tmp_path: Path
):
    """With decode graphs, a mixed step runs its decodes through the graph and its prompt
    chunks in a second, eager pass (engine._forward); the logits must come back in batch
    order, so every request still gets the oracle's tokens, adapters mixed in both passes."""
    ours, peft_model, adapters = _setup(hf_config, tmp_path)
    requests = _mixed_requests(list(adapters), seed=3)
    engine = _engine(ours, budget=5, max_num_seqs=6)
    engine.graphs = GraphLike(ours)  # type: ignore[assignment]
    results = record_steps(engine)
    check_engine_against_oracle(engine, peft_model, requests, adapters, NEW_TOKENS)
    split = [r for r in results if r is not None and r.prefill_seqs and r.decode_seqs]
    assert split and all(r.graph for r in split)
