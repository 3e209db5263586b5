"""One request's failure is its own: non-finite logits, a sampler error, a failing stop-string
matcher or a hostile temperature fail that request alone, and the rest of the batch gets the
tokens it gets without it. Requests are found by internal ids, never by the caller's id."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from manylora.v1 import common_pb2
from services.common.errors import Internal, WorkerFault
from services.common.lora_format import CanonicalAdapter
from services.common.peft_adapter import load_peft_folder
from services.common.random_adapters import save_random_peft_adapter
from services.gpu_worker.engine import sampling
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.sampling import SamplingOptions, request_seed, sample
from services.gpu_worker.engine.sequence import FinishReason, Sequence, StepOutput
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from services.gpu_worker.model.model_config import ModelConfig
from services.gpu_worker.model.weights import build_dummy_model
from tests.oracle import TINY_GQA, TINY_MHA, build_pair

PROMPT = list(range(40, 52))
NEW = 10


@pytest.fixture(scope="module")
def model():
    return build_pair(TINY_MHA)[0]


def _greedy(**kw: object) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=NEW, ignore_eos=True, **kw)  # type: ignore[arg-type]


def _seeded(seed: int) -> SamplingOptions:
    return _greedy(temperature=0.9, top_p=0.9, top_k=50, seed=seed)


class Sink:
    """Collects one request's outputs."""

    def __init__(self) -> None:
        self.outs: list[StepOutput] = []

    def __call__(self, out: StepOutput) -> None:
        self.outs.append(out)

    @property
    def tokens(self) -> list[int]:
        return [t for o in self.outs for t in o.token_ids]

    @property
    def error(self) -> Exception | None:
        return self.outs[-1].error if self.outs else None

    @property
    def finish(self) -> FinishReason | None:
        return self.outs[-1].finish_reason if self.outs else None


Request = tuple[str, SamplingOptions, CanonicalAdapter | None]


def _run(engine: Engine, requests: list[Request]) -> list[Sink]:
    """Add every (request_id, options, adapter) and step until all end."""
    sinks = []
    for rid, opts, adapter in requests:
        sink = Sink()
        engine.add(Sequence(rid, PROMPT, opts, ByteTokenizer(), sink, adapter))
        sinks.append(sink)
    while engine.has_work():
        engine.step()
    return sinks


# --- the sampler alone -------------------------------------------------------------------


def _logits(rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed))


def test_non_finite_rows_fail_alone_and_the_others_sample_as_without_them():
    logits = _logits(6)
    bad = logits.clone()
    bad[1, 7] = float("nan")
    bad[3, 2] = float("inf")
    bad[4] = float("-inf")
    options = [_greedy(), _seeded(5), _seeded(6), _greedy(), _seeded(8), _seeded(9)]

    seeds = [request_seed(o) for o in options]
    clean = sample(logits, options, seeds, [0] * 6)
    attacked = sample(bad, options, seeds, [0] * 6)
    assert [e is None for e in attacked.errors] == [True, False, True, False, False, True]
    assert all(isinstance(attacked.errors[i], Internal) for i in (1, 3, 4))
    for row in (0, 2, 5):
        assert attacked.token_ids[row] == clean.token_ids[row]
    assert clean.token_ids[0] == int(torch.argmax(logits[0]))  # greedy is the argmax


def test_sampling_error_of_one_row_is_that_rows_alone(monkeypatch):
    logits = _logits(3)
    options = [_seeded(1), _seeded(2), _greedy()]
    seeds = [request_seed(o) for o in options]
    clean = sample(logits, options, seeds, [4] * 3)
    real_uniforms = sampling.uniforms

    def flaky(seeds: list[int], token_indices: list[int]) -> object:
        # Fails any pass that holds the first request: the batch, then that row alone.
        if 1 in seeds:
            raise RuntimeError("boom")
        return real_uniforms(seeds, token_indices)

    monkeypatch.setattr(sampling, "uniforms", flaky)
    out = sample(logits, options, seeds, [4] * 3)
    assert isinstance(out.errors[0], Internal) and out.errors[1] is None and out.errors[2] is None
    assert out.token_ids[1:] == clean.token_ids[1:]
    assert out.token_ids[2] == int(torch.argmax(logits[2]))


@pytest.mark.parametrize("temperature", [1e-45, 1e-30, 1e-8])
@pytest.mark.parametrize("scale", [1.0, 1e36])
def test_tiny_temperature_samples_the_argmax(temperature, scale):
    logits = _logits(4) * scale  # finite, but logits / temperature would overflow
    params = common_pb2.SamplingParams(max_new_tokens=1, temperature=temperature, seed=3)
    clamped = SamplingOptions.from_proto(params)
    raw = SamplingOptions(max_new_tokens=1, temperature=temperature, seed=3)  # not clamped
    for opts in (clamped, raw):
        out = sample(logits, [opts] * 4, [request_seed(opts)] * 4, [0, 1, 2, 3])
        assert out.errors == [None] * 4
        assert out.token_ids == torch.argmax(logits, dim=-1).tolist()


def test_huge_temperature_and_filters_stay_finite():
    logits = _logits(2, vocab=30)
    opts = SamplingOptions(
        max_new_tokens=1, temperature=3e38, top_p=1e-45, top_k=2**32 - 1, seed=2**64 - 1
    )
    out = sample(logits, [opts, opts], [request_seed(opts)] * 2, [0, 0])
    assert out.errors == [None, None]
    # top_p that small keeps only the most likely token.
    assert out.token_ids == torch.argmax(logits, dim=-1).tolist()


# --- through the engine --------------------------------------------------------------------


@pytest.mark.parametrize("overlap", [False, True], ids=["sequential", "overlap"])
def test_nan_adapter_fails_its_request_alone(model, tmp_path: Path, overlap: bool):
    """Its rows' logits are NaN from its first token; with overlap scheduling its wasted row
    of the next step (launched before the failure is known) breaks nothing either."""
    config = EngineConfig(pool_slots=8192, overlap_schedule=overlap)
    shape = model.config.shape
    folder = save_random_peft_adapter(tmp_path / "nan", shape, 4, seed=1)
    poisoned = load_peft_folder(folder, shape, 64, "nan")
    for b in poisoned.lora_b.values():
        b.fill_(float("nan"))
    bystanders: list[Request] = [
        ("a", _greedy(), None),
        ("b", _seeded(11), None),
        ("c", _greedy(), None),
    ]
    alone = _run(Engine(model, EngineConfig(pool_slots=8192)), bystanders)
    engine = Engine(model, config)
    mixed = _run(engine, [bystanders[0], ("victim", _seeded(4), poisoned), *bystanders[1:]])
    victim = mixed[1]
    assert isinstance(victim.error, Internal) and victim.tokens == [] and len(victim.outs) == 1
    assert "non-finite" in str(victim.error)
    for before, after in zip(alone, [mixed[0], *mixed[2:]], strict=True):
        assert after.error is None and after.finish == FinishReason.LENGTH
        assert after.tokens == before.tokens and len(after.tokens) == NEW
    assert (engine.pool.kv_used, engine.pool.promised) == (0, 0)


def test_a_failing_stop_matcher_fails_its_request_alone(model):
    engine = Engine(model, EngineConfig(pool_slots=8192))
    alone = _run(Engine(model, EngineConfig(pool_slots=8192)), [("a", _greedy(), None)])[0]
    sinks = [Sink(), Sink()]
    seqs = [
        Sequence(rid, PROMPT, _greedy(), ByteTokenizer(), sink)
        for rid, sink in zip(("victim", "a"), sinks, strict=True)
    ]

    def explode(delta: str) -> tuple[str, bool]:
        raise ValueError("hostile stop strings")

    seqs[0].stops.feed = explode  # type: ignore[method-assign]
    for seq in seqs:
        engine.add(seq)
    while engine.has_work():
        engine.step()
    assert isinstance(sinks[0].error, Internal)
    assert sinks[1].error is None and sinks[1].tokens == alone.tokens
    assert engine.pool.kv_used == 0  # the failed request's slots came back


def test_a_failing_forward_pass_is_a_worker_fault(model, monkeypatch):
    engine = Engine(model, EngineConfig(pool_slots=8192))

    def broken(batch: object) -> torch.Tensor:
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "model", broken)
    sinks = _run(engine, [("a", _greedy(), None), ("b", _seeded(1), None)])
    for sink in sinks:
        assert isinstance(sink.error, WorkerFault) and sink.error.worker_fault


def test_same_request_id_twice_abort_ends_only_the_one_aborted(model):
    engine = Engine(model, EngineConfig(pool_slots=8192))
    alone = _run(Engine(model, EngineConfig(pool_slots=8192)), [("dup", _greedy(), None)])[0]
    first, second = Sink(), Sink()
    seq1 = Sequence("dup", PROMPT, _greedy(), ByteTokenizer(), first)
    seq2 = Sequence("dup", PROMPT, _greedy(), ByteTokenizer(), second)
    engine.add(seq1)
    engine.add(seq2)
    engine.step()
    engine.step()
    assert engine.abort(seq2.seq_id)
    assert not engine.abort(seq2.seq_id)  # gone; the other one with its id is untouched
    while engine.has_work():
        engine.step()
    assert second.finish == FinishReason.ABORTED
    assert first.finish == FinishReason.LENGTH and first.tokens == alone.tokens
    assert [o.request_id for o in first.outs] == ["dup"] * len(first.outs)


@pytest.mark.gpu
def test_non_finite_rows_on_cuda_fail_alone_without_a_device_assert():
    """On CUDA, an out-of-range index (from a NaN turned into an integer weight, say) is a
    device-side assert that ends the process's CUDA context: a non-finite row must fail
    alone and leave the device working."""
    cuda = torch.device("cuda")
    logits = _logits(4).to(cuda)
    bad = logits.clone()
    bad[1] = float("nan")
    bad[2, 5] = float("inf")
    options = [_seeded(1), _seeded(2), _seeded(3), _greedy(temperature=1e-45)]

    seeds = [request_seed(o) for o in options]
    clean = sample(logits, options, seeds, [0] * 4)
    attacked = sample(bad, options, seeds, [0] * 4)
    torch.cuda.synchronize()
    assert [e is None for e in attacked.errors] == [True, False, False, True]
    assert attacked.token_ids[0] == clean.token_ids[0]
    assert attacked.token_ids[3] == int(torch.argmax(logits[3]))
    assert torch.ones(1, device=cuda).item() == 1.0  # the device still works


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)], ids=["cpu", "cuda"]
)
def test_a_nan_adapter_leaks_into_no_other_row(device: str, tmp_path: Path):
    """The same batch twice, once with the last request's adapter poisoned with NaN: every
    other row's logits are bit for bit the same, in the prefill pass and in a decode pass
    (on CUDA through the LoRA and attention kernels)."""
    config = ModelConfig.from_hf(TINY_GQA)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build_dummy_model(config, 0, dtype, torch.device(device))

    def adapter(name: str, seed: int) -> CanonicalAdapter:
        folder = save_random_peft_adapter(tmp_path / name, config.shape, 8, seed=seed, std=0.2)
        return load_peft_folder(folder, config.shape, 64, name)

    other, victim = adapter("other", 1), adapter("victim", 2)
    poisoned = adapter("victim", 2)
    for b in poisoned.lora_b.values():
        b.fill_(float("nan"))

    def pass_logits(victim_adapter: CanonicalAdapter) -> list[torch.Tensor]:
        engine = Engine(model, EngineConfig(pool_slots=20_000))
        adapters = [None, other, None, victim_adapter]
        seqs = [
            Sequence(f"r{i}", PROMPT[: 6 + i], _greedy(), ByteTokenizer(), Sink(), a)
            for i, a in enumerate(adapters)
        ]
        for seq in seqs:
            engine.add(seq)
        logits = []
        for _ in range(2):  # the prefill pass, then a decode pass
            scheduled = engine.scheduler.schedule()
            assert scheduled.prefill + scheduled.decode == seqs
            logits.append(engine.model(engine.build_batch(seqs)).float().cpu())
            for seq in seqs:
                engine._append(seq, 65, None)  # the same next token for every request
            engine.flush()  # their outputs, as the next step would
        return logits

    clean, attacked = pass_logits(victim), pass_logits(poisoned)
    for good, bad in zip(clean, attacked, strict=True):
        assert torch.isnan(bad[3]).any()
        assert torch.isfinite(good).all()
        assert torch.equal(bad[:3], good[:3])
