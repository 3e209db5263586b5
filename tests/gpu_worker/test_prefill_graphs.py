"""The prefill graphs: bucket choice, the static inputs a replay reads, and the replay's logits
against the unpadded pass and HF transformers + PEFT (CPU, no capture).

A captured graph cannot run on the CPU, so `EagerReplay` stands in for one: its replay runs
the bucket's static view eagerly into the output buffer `run` slices, on the Triton kernels
under TRITON_INTERPRET=1 (a static view has no host lengths, which the torch reference
attention needs). Everything but the capture itself is the code that runs on CUDA."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from services.common.config import load_config
from services.common.lora_format import CanonicalAdapter
from services.common.peft_adapter import load_peft_folder
from services.gpu_worker.engine import setup
from services.gpu_worker.engine.batch_builder import completes_prompt
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.decode_graphs import LORA_KINDS
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.forward_batch import ForwardBatch
from services.gpu_worker.engine.prefill_graphs import (
    EXIT_ROW,
    PrefillGraphs,
    bucket_pairs,
    token_buckets,
)
from services.gpu_worker.engine.sampling import SamplingOptions
from services.gpu_worker.engine.sequence import Sequence
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.model.attention import TritonPagedAttention
from services.gpu_worker.model.backends import ModelBackends
from services.gpu_worker.model.fused_ops import ElementwiseOps
from services.gpu_worker.model.lora_backend import TritonLoraBackend
from services.gpu_worker.model.model import LlamaForCausalLM
from services.gpu_worker.serving.config import WorkerConfig
from tests.gpu_worker.step_log import record_steps
from tests.gpu_worker.test_chunked_prefill import GraphLike
from tests.gpu_worker.test_engine_oracle import check_engine_against_oracle
from tests.gpu_worker.test_triton_path_oracle import ADAPTERS
from tests.oracle import TINY_MHA, build_pair, greedy_oracle, make_peft_adapters

# Rows of no request are left unwritten by attention (the interpreter's empty memory), and the
# numpy under the interpreter warns when their garbage overflows; no real row reads them.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")


class EagerReplay:
    """Stands in for a captured graph: `replay` runs the static view into the output that
    `PrefillGraphs.run` slices, as a replay writes into the captured output."""

    def __init__(self, model: LlamaForCausalLM, view: ForwardBatch, out: torch.Tensor) -> None:
        self.model, self.view, self.out = model, view, out

    def replay(self) -> None:
        self.out.copy_(self.model(self.view))


def eager_graphs(engine: Engine, max_requests: int | None = None) -> PrefillGraphs:
    """The engine's prefill graphs, each bucket's capture replaced by an EagerReplay."""
    graphs = PrefillGraphs(
        engine.model,
        engine.build_batch([]),
        engine.config.max_prefill_tokens,
        max_requests or engine.config.max_num_seqs,
        engine._scratch_slots(),
        engine.max_rank,
    )
    vocab = engine.model_config.vocab_size
    for tokens, requests in graphs.pairs:
        for lora in LORA_KINDS:
            key = (tokens, requests, lora)
            out = torch.empty(requests, vocab)
            graphs._logits[key] = out
            view = graphs._view(tokens, requests, lora)
            graphs._graphs[key] = EagerReplay(engine.model, view, out)  # type: ignore[assignment]
    return graphs


def _triton_model(tmp_path: Path) -> tuple[LlamaForCausalLM, Any, dict[str, CanonicalAdapter]]:
    backends = ModelBackends(TritonPagedAttention(), ElementwiseOps.kernels())
    ours, hf = build_pair(TINY_MHA, backends=backends)
    peft_model, paths = make_peft_adapters(hf, ADAPTERS, tmp_path)
    adapters = {n: load_peft_folder(p, ours.config.shape, max_rank=32) for n, p in paths.items()}
    return ours, peft_model, adapters


def _engine(model: LlamaForCausalLM, budget: int, max_num_seqs: int = 8) -> Engine:
    config = EngineConfig(
        pool_slots=4096, max_num_seqs=max_num_seqs, max_prefill_tokens=budget, max_rank=32
    )
    return Engine(model, config, TritonLoraBackend())


def _add(engine: Engine, length: int, adapter: CanonicalAdapter | None, seed: int) -> Sequence:
    gen = torch.Generator().manual_seed(seed)
    prompt = torch.randint(3, 259, (length,), generator=gen).tolist()
    options = SamplingOptions(max_new_tokens=4, ignore_eos=True)
    seq = Sequence(f"r{seed}", prompt, options, ByteTokenizer(), lambda _: None, adapter)
    engine.add(seq)
    return seq


def _changed_slots(before: torch.Tensor, after: torch.Tensor) -> set[int]:
    return set((before != after).any(dim=2).any(dim=0).nonzero().flatten().tolist())


def _check_replay(
    graphs: PrefillGraphs,
    model: LlamaForCausalLM,
    batch: ForwardBatch,
    seqs: list[Sequence],
    chunks: list[int],
    peft_model: Any,
    scratch: tuple[int, int],
) -> None:
    """The replay's logits equal the unpadded pass's and HF + PEFT's for each prompt the
    batch completes, and the replay writes no pool slot but the batch's own and scratch."""
    eager = model(batch)
    before = batch.pool.clone()
    got = graphs.run(batch)
    assert got.shape == eager.shape
    torch.testing.assert_close(got, eager, atol=1e-5, rtol=1e-5)
    done = [s for s, n in zip(seqs, chunks, strict=True) if completes_prompt(s, n)]
    assert len(done) == got.shape[0]
    for row, seq in zip(got, done, strict=True):
        name = seq.adapter.adapter_id if seq.adapter else None
        expected = greedy_oracle(peft_model, seq.prompt_ids, name, 1)[1][0]
        torch.testing.assert_close(
            torch.log_softmax(row, -1), torch.log_softmax(expected, -1), atol=1e-4, rtol=1e-4
        )
    own = set(batch.new_k_slots.tolist()) | set(batch.new_v_slots.tolist()) | set(scratch)
    assert _changed_slots(before, batch.pool) <= own


def _check_padding(
    graphs: PrefillGraphs, batch: ForwardBatch, lora: str, scratch: tuple[int, int]
) -> ForwardBatch:
    """After `fill`: padding tokens at position 0 writing to scratch slots, padding requests
    empty, padding logits rows 0 and padding tiles exiting; the bucket's view."""
    n, m = batch.input_ids.shape[0], batch.q_lens.shape[0]
    tokens, requests = graphs.fill(batch)
    view = graphs._view(tokens, requests, lora)
    assert view.positions[n:].eq(0).all()
    assert view.new_k_slots[n:].eq(scratch[0]).all() and view.new_v_slots[n:].eq(scratch[1]).all()
    for name, value in (("q_lens", 0), ("ctx_lens", 0), ("seq_lens", 0), ("req_lora", -1)):
        assert getattr(view, name)[m:].eq(value).all(), name
    assert view.q_starts[m:].eq(n).all()
    assert view.logits_rows[batch.logits_rows.shape[0] :].eq(0).all()
    tiles, used = view.lora_plan, batch.lora_plan
    assert isinstance(tiles, torch.Tensor) and isinstance(used, torch.Tensor)
    assert tiles.shape == (-(-tokens // 16) + requests, 2)
    assert torch.equal(tiles[: used.shape[0]], used)
    assert tiles[used.shape[0] :].tolist() == [[0, EXIT_ROW]] * (tiles.shape[0] - used.shape[0])
    assert view.max_q_len == tokens and view.decode_tail == 0
    return view


def _take_step(seqs: list[Sequence], chunks: list[int]) -> None:
    """What the engine's step does to its prompt requests: a token for each finished prompt,
    the next chunk's start for the others."""
    for seq, n in zip(seqs, chunks, strict=True):
        if completes_prompt(seq, n):
            seq.output_ids.append(5)
            seq.num_cached = len(seq.prompt_ids)
        else:
            seq.num_cached += n


def test_a_padded_replay_gives_the_unpadded_logits_and_resets_its_padding(tmp_path: Path):
    ours, peft_model, adapters = _triton_model(tmp_path)
    engine = _engine(ours, budget=100)
    graphs = eager_graphs(engine)
    scratch = engine._scratch_slots()
    assert graphs.pairs == [(64, 4), (64, 8), (100, 4), (100, 8)]
    # Mixed ranks, all-linear, MLP-only and attention-only adapters and base requests; the
    # last prompt does not fit the budget: its first chunk gets no logits row.
    plan = [("all-mixed", 30), ("qvo-r32", 9), (None, 3), ("mlp-rslora", 25), (None, 40)]
    seqs = [_add(engine, n, adapters[a] if a else None, i) for i, (a, n) in enumerate(plan)]
    big = engine.scheduler.schedule()
    assert big.chunks == [30, 9, 3, 25, 33] and graphs.bucket(100, 5) == (100, 8)
    batch = engine.build_batch(big.prefill, big.chunks)
    _check_padding(graphs, batch, "all", scratch)  # every row a request's: q_starts 100
    _check_replay(graphs, ours, batch, big.prefill, big.chunks, peft_model, scratch)

    # A smaller batch after it: the rest of the chunked prompt (base, over its first chunk's
    # K/V) and a new attention-only request, beside the other four's decodes. Rows 19..63 and
    # request 2..3 of the static buffers held the big batch's; so did LoRA tiles 1..7, two of
    # them the big batch's tiles of request 1, which now has an adapter of its own.
    _take_step(big.prefill, big.chunks)
    seqs.append(_add(engine, 12, adapters["qvo-r32"], 9))
    small = engine.scheduler.schedule()
    assert small.chunks == [7, 12] and len(small.decode) == 4
    assert graphs.bucket(19, 2) == (64, 4)
    batch = engine.build_batch(small.prefill, small.chunks)
    _check_replay(graphs, ours, batch, small.prefill, small.chunks, peft_model, scratch)
    view = _check_padding(graphs, batch, "attention", scratch)
    assert view.logits_rows.tolist() == [6, 18, 0, 0] and view.q_starts.tolist()[2:] == [19, 19]
    assert isinstance(view.lora_plan, torch.Tensor) and view.lora_plan[0].tolist() == [1, 0]
    assert view.max_rank == 32 and not view.mlp_lora


def test_the_engine_with_prefill_graphs_serves_chunks_beside_decodes_as_hf_peft(tmp_path: Path):
    """Prompts in chunks of at most 8 tokens, beside decodes (decode graphs stood in for by
    GraphLike): every prompt-only pass that a bucket holds replays a prefill graph, the
    others (more than two prompts, or beside decodes) run eagerly; greedy tokens and
    logprobs as HF + PEFT's and as the engine's without graphs."""
    ours, peft_model, adapters = _triton_model(tmp_path)
    plan = [("all-mixed", 5), (None, 9), ("mlp-rslora", 3), ("qvo-r32", 12), (None, 7)]
    gen = torch.Generator().manual_seed(3)
    requests = [(torch.randint(3, 259, (n,), generator=gen).tolist(), a) for a, n in plan]
    engine = _engine(ours, budget=8)
    engine.graphs = GraphLike(ours)  # type: ignore[assignment]
    graphs = engine.prefill_graphs = eager_graphs(engine, max_requests=2)
    assert graphs.pairs == [(8, 2)]
    results = record_steps(engine)
    check_engine_against_oracle(engine, peft_model, requests, adapters, new_tokens=3)
    ran = [r for r in results if r is not None and r.prefill_seqs]
    assert any(r.decode_seqs for r in ran) and any(not r.decode_seqs for r in ran)
    # Prompt-only steps replay; a mixed step's prompt pass runs eagerly behind its decodes.
    assert all(r.prompt_graph == (not r.decode_seqs and r.prefill_seqs <= 2) for r in ran)
    assert any(r.prompt_graph for r in ran)
    assert graphs.replays == sum(r.prompt_graph for r in ran)


def test_buckets_are_the_smallest_that_hold_a_pass_and_a_few_per_kind():
    assert token_buckets(4096) == [
        64, 128, 256, 320, 384, 448, 512, 640, 768, 896, 1024, 1280, 1536, 1792, 2048
    ]  # fmt: skip
    assert token_buckets(100) == [64, 100] and token_buckets(7) == [7]
    pairs = bucket_pairs(4096, 256)
    assert len(pairs) <= 40 and {b for _, b in pairs} == {4, 16}
    assert bucket_pairs(3, 8) == [(3, 3)]  # no more requests than tokens
    assert bucket_pairs(64, 2) == [(64, 2)]  # nor than may run
    model, _ = build_pair(TINY_MHA)
    engine = Engine(
        model,
        EngineConfig(pool_slots=2048, max_num_seqs=8, max_prefill_tokens=4096),
        TritonLoraBackend(),
    )
    graphs = PrefillGraphs(model, engine.build_batch([]), 4096, 8, (1000, 1001), max_rank=64)
    assert graphs.static.input_ids.shape == (2048,) and graphs.static.q_lens.shape == (8,)
    assert graphs.bucket(540, 2) == (640, 4)
    assert graphs.bucket(64, 4) == (64, 4) and graphs.bucket(65, 5) == (128, 8)
    assert graphs.bucket(2048, 8) == (2048, 8)
    assert graphs.bucket(2049, 1) is None and graphs.bucket(100, 9) is None  # run eagerly


def test_a_backend_that_plans_per_batch_is_refused():
    model, _ = build_pair(TINY_MHA)
    engine = Engine(model, EngineConfig(pool_slots=2048, max_num_seqs=8))
    with pytest.raises(ValueError, match="TorchLoraBackend cannot run inside CUDA graphs"):
        PrefillGraphs(model, engine.build_batch([]), 256, 8, (1000, 1001), max_rank=64)


def test_the_flag_and_env_var_turn_prefill_graphs_off(monkeypatch: pytest.MonkeyPatch):
    assert load_config(WorkerConfig, [], env={}).engine_config().prefill_graphs
    off = load_config(WorkerConfig, ["--no-prefill-graphs"], env={})
    assert off.engine_config() == EngineConfig(prefill_graphs=False)
    env = {"MANYLORA_PREFILL_GRAPHS": "false"}
    assert not load_config(WorkerConfig, [], env=env).prefill_graphs
    assert load_config(WorkerConfig, ["--prefill-graphs"], env=env).prefill_graphs

    captured: list[str] = []

    class CudaEngine:  # what build_engine sees of an engine on CUDA
        def __init__(self, model: Any, config: EngineConfig, lora_backend: Any) -> None:
            self.device = torch.device("cuda")
            self.pool = type("Pool", (), {"num_slots": 1})()

        def capture_decode_graphs(self) -> None:
            captured.append("decode")

        def capture_prefill_graphs(self) -> None:
            captured.append("prefill")

    monkeypatch.setattr(setup, "Engine", CudaEngine)
    for config in (
        EngineConfig(),
        EngineConfig(prefill_graphs=False),
        EngineConfig(cuda_graphs=False),
    ):
        setup.build_engine(None, config)  # type: ignore[arg-type]
    assert captured == ["decode", "prefill", "decode"]


@pytest.mark.parametrize(("budget", "pairs"), [(1, [(1, 1)]), (2, [(2, 2)])])
def test_one_token_chunks_replay_with_a_tile_per_request(
    budget: int, pairs: list[tuple[int, int]], tmp_path: Path
):
    """Prompt passes whose chunks are all one token, for which the Triton backend plans no
    tiles (each request gets one): two one-token prompts with adapters in one pass (budget
    2), and the bucket of one token, which runs the decode attention kernel (budget 1).
    Tokens and logprobs as HF + PEFT's."""
    ours, peft_model, adapters = _triton_model(tmp_path)
    gen = torch.Generator().manual_seed(4)
    plan = [("all-mixed", 1), ("qvo-r32", 1), (None, 3)]
    requests = [(torch.randint(3, 259, (n,), generator=gen).tolist(), a) for a, n in plan]
    engine = _engine(ours, budget=budget)
    graphs = engine.prefill_graphs = eager_graphs(engine)
    assert graphs.pairs == pairs
    check_engine_against_oracle(engine, peft_model, requests, adapters, new_tokens=3)
    assert graphs.replays > 0
