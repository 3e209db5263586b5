"""Sampling: seeds, filters, stop strings, stop ids, EOS, logprobs — through the engine."""

from __future__ import annotations

import math

import pytest
import torch

from manylora.v1 import common_pb2
from services.common.errors import InvalidArgument
from services.common.sampling_params import check_sampling_params
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.offline import Completion, generate_offline
from services.gpu_worker.engine.sampling import SamplingOptions, filter_logits, sample
from services.gpu_worker.engine.sequence import FinishReason
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from tests.oracle import TINY_MHA, build_pair

PROMPT = list(range(40, 60))


@pytest.fixture(scope="module")
def model():
    ours, _ = build_pair(TINY_MHA)
    return ours


def _run(model, options: list[SamplingOptions], prompt: list[int] = PROMPT) -> list[Completion]:
    engine = Engine(model, EngineConfig(pool_slots=16384))
    return generate_offline(
        engine, ByteTokenizer(), [prompt] * len(options), options, [None] * len(options)
    )


def test_same_seed_gives_same_tokens_whatever_shares_the_batch(model):
    seeded = SamplingOptions(max_new_tokens=24, temperature=1.0, seed=1234, ignore_eos=True)
    alone = _run(model, [seeded])[0].token_ids
    others = [SamplingOptions(max_new_tokens=24, temperature=1.0, seed=s) for s in range(5)]
    batched = _run(model, [*others[:2], seeded, *others[2:]])[2].token_ids
    assert alone == batched


def test_different_seeds_give_different_tokens(model):
    runs = _run(
        model,
        [
            SamplingOptions(max_new_tokens=24, temperature=1.0, seed=s, ignore_eos=True)
            for s in range(4)
        ],
    )
    assert len({tuple(r.token_ids) for r in runs}) == 4


def test_top_k_one_is_greedy(model):
    greedy, top1 = _run(
        model,
        [
            SamplingOptions(max_new_tokens=16, ignore_eos=True),
            SamplingOptions(max_new_tokens=16, temperature=5.0, top_k=1, seed=3, ignore_eos=True),
        ],
    )
    assert greedy.token_ids == top1.token_ids


def _chi_square_p_value_4_dof(counts: list[int], probs: list[float]) -> float:
    """Pearson's chi-square test of counts against probs, for 5 categories (4 degrees of
    freedom), whose survival function has the closed form exp(-x/2) * (1 + x/2)."""
    assert len(counts) == len(probs) == 5
    n = sum(counts)
    x = sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs, strict=True))
    return math.exp(-x / 2) * (1 + x / 2)


@pytest.mark.parametrize("temperature", [0.5, 2.5])
def test_samples_follow_the_softmax_of_the_logits_over_the_temperature(temperature):
    logits = [2.0, 1.0, 0.5, 0.0, -1.0]
    draws = 6000
    opts = SamplingOptions(max_new_tokens=1, temperature=temperature)
    batch = torch.tensor(logits).expand(draws, -1).contiguous()
    # One request's first `draws` tokens: one seed, token indices 0, 1, ...
    tokens = sample(batch, [opts] * draws, [20260] * draws, list(range(draws))).token_ids
    counts = [tokens.count(v) for v in range(len(logits))]

    def softmax(t: float) -> list[float]:
        weights = [math.exp(x / t) for x in logits]
        return [w / sum(weights) for w in weights]

    # Fixed seed, so this is one deterministic draw; the bound would pass a true sampler
    # with probability 1 - 1e-4.
    assert _chi_square_p_value_4_dof(counts, softmax(temperature)) > 1e-4
    # At these sizes temperature 1 is far outside (chi-square in the hundreds at least).
    assert _chi_square_p_value_4_dof(counts, softmax(1.0)) < 1e-12


def test_filter_logits_keeps_top_k_and_nucleus():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.0, -1.0])
    kept = filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(kept).tolist() == [False, True, False, True, False]
    probs = torch.softmax(logits, -1)  # sorted: 1 (.64), 3 (.24), 2 (.09), ...
    nucleus = filter_logits(logits, top_k=0, top_p=float(probs[1] + 0.01))
    assert torch.isfinite(nucleus).tolist() == [False, True, False, True, False]
    assert torch.isfinite(filter_logits(logits, 0, 0.1)).sum() == 1  # the top token always stays


def test_stop_string_ends_stream_with_stop_and_is_not_returned(model):
    full = _run(model, [SamplingOptions(max_new_tokens=40, ignore_eos=True)])[0]
    assert len(full.text) > 6
    stop = full.text[3:6]
    cut = _run(model, [SamplingOptions(max_new_tokens=40, ignore_eos=True, stop=(stop,))])[0]
    assert cut.finish_reason == FinishReason.STOP
    assert cut.text == full.text[: full.text.index(stop)]


def test_stop_token_id_ends_stream_with_stop_and_is_returned(model):
    full = _run(model, [SamplingOptions(max_new_tokens=20, ignore_eos=True)])[0]
    stop_id = full.token_ids[5]
    first = full.token_ids.index(stop_id)
    opts = SamplingOptions(max_new_tokens=20, ignore_eos=True, stop_token_ids=frozenset({stop_id}))
    cut = _run(model, [opts])[0]
    assert cut.finish_reason == FinishReason.STOP
    assert cut.token_ids == full.token_ids[: first + 1]


def _eos_engine(model, eos: int) -> Engine:
    """An engine whose model config counts `eos` as its end-of-sequence token."""
    engine = Engine(model, EngineConfig(pool_slots=2048))
    engine.model_config = type(engine.model_config)(
        **{**engine.model_config.__dict__, "eos_token_ids": (eos,)}
    )
    return engine


def test_eos_ends_stream_unless_ignored(model):
    # Make a token the greedy continuation is known to produce the model's EOS.
    full = _run(model, [SamplingOptions(max_new_tokens=12, ignore_eos=True)])[0]
    eos = full.token_ids[4]
    first = full.token_ids.index(eos)
    done = generate_offline(
        _eos_engine(model, eos),
        ByteTokenizer(),
        [PROMPT],
        [SamplingOptions(max_new_tokens=12)],
        [None],
    )[0]
    assert done.finish_reason == FinishReason.EOS
    assert done.token_ids == full.token_ids[: first + 1]
    # Ignored, the same EOS is just another token: the stream runs to max_new_tokens.
    ignored = generate_offline(
        _eos_engine(model, eos),
        ByteTokenizer(),
        [PROMPT],
        [SamplingOptions(max_new_tokens=12, ignore_eos=True)],
        [None],
    )[0]
    assert ignored.finish_reason == FinishReason.LENGTH
    assert ignored.token_ids == full.token_ids


def _never_matching_stop(text: str) -> str:
    """A stop string whose beginning is the end of `text` but that `text` never contains:
    the stream holds the end of `text` back as a possible stop until the stream ends."""
    stop = text[-2:] + "\uffff\uffff"
    assert len(text) >= 2 and stop not in text
    return stop


def test_text_held_back_as_a_possible_stop_is_released_at_a_length_end(model):
    plain = _run(model, [SamplingOptions(max_new_tokens=9, ignore_eos=True)])[0]
    expected = ByteTokenizer().decode(plain.token_ids)  # the oracle: decoding every token
    assert plain.text == expected
    stop = _never_matching_stop(expected)
    held = _run(model, [SamplingOptions(max_new_tokens=9, ignore_eos=True, stop=(stop,))])[0]
    assert held.finish_reason == FinishReason.LENGTH
    assert held.token_ids == plain.token_ids
    assert held.text == expected


def test_text_held_back_as_a_possible_stop_is_released_at_an_eos_end(model):
    full = _run(model, [SamplingOptions(max_new_tokens=12, ignore_eos=True)])[0]
    # The EOS here is an ordinary byte of ByteTokenizer, so its text is part of the output.
    # The latest token of the stream as EOS (first seen where the stream then ends) that
    # leaves text for a stop string to begin with.
    ends = [full.token_ids[: full.token_ids.index(t) + 1] for t in reversed(full.token_ids)]
    ids = next(ids for ids in ends if len(ByteTokenizer().decode(ids)) >= 2)
    eos = ids[-1]
    expected = ByteTokenizer().decode(ids)
    stop = _never_matching_stop(expected)
    done = generate_offline(
        _eos_engine(model, eos),
        ByteTokenizer(),
        [PROMPT],
        [SamplingOptions(max_new_tokens=12, stop=(stop,))],
        [None],
    )[0]
    assert done.finish_reason == FinishReason.EOS
    assert done.token_ids == ids
    assert done.text == expected


def test_max_new_tokens_ends_with_length_and_logprobs_are_log_probabilities(model):
    done = _run(model, [SamplingOptions(max_new_tokens=7, ignore_eos=True, logprobs=True)])[0]
    assert done.finish_reason == FinishReason.LENGTH
    assert len(done.token_ids) == len(done.logprobs) == 7
    assert all(lp <= 0.0 for lp in done.logprobs)
    assert done.outputs[-1].completion_tokens == 7


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (common_pb2.SamplingParams(max_new_tokens=0), "max_new_tokens"),
        (common_pb2.SamplingParams(max_new_tokens=1, temperature=-0.5), "temperature"),
        (common_pb2.SamplingParams(max_new_tokens=1, temperature=float("nan")), "temperature"),
        (common_pb2.SamplingParams(max_new_tokens=1, top_p=-0.1), "top_p"),
        (common_pb2.SamplingParams(max_new_tokens=1, stop_token_ids=[300]), "stop_token_ids"),
        (common_pb2.SamplingParams(max_new_tokens=1, stop=["x"] * 17), "stop"),
    ],
)
def test_bad_sampling_params_are_refused_by_name(params, field):
    with pytest.raises(InvalidArgument, match=field):
        check_sampling_params(params, vocab_size=259)
