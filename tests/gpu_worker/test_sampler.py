"""The sampler on its own: options from the proto, seeds, filters, and `sample` over a
batch of logits. Expected values come from the proto's documented contract and from plain
arithmetic on the logits, never from the sampler itself. (tests/gpu_worker/test_sampling.py
runs the sampler through the engine.)"""

from __future__ import annotations

import math

import pytest
import torch

from manylora.v1 import common_pb2
from services.gpu_worker.engine.sampling import (
    SamplingOptions,
    filter_logits,
    request_seed,
    sample,
)

CPU = torch.device("cpu")


def _log_softmax(row: list[float]) -> list[float]:
    top = max(row)
    log_total = top + math.log(sum(math.exp(x - top) for x in row))
    return [x - log_total for x in row]


def _argmax(row: list[float]) -> int:
    return max(range(len(row)), key=row.__getitem__)


def _kept(logits: list[float], top_k: int, top_p: float) -> list[bool]:
    return torch.isfinite(filter_logits(torch.tensor(logits), top_k, top_p)).tolist()


# ---- SamplingOptions.from_proto -----------------------------------------------------------


def test_options_from_a_proto_with_every_field_set():
    params = common_pb2.SamplingParams(
        max_new_tokens=5,
        temperature=0.5,  # 0.5 and 0.25 are exact in the proto's float32
        top_p=0.25,
        top_k=7,
        seed=0,  # set to 0 is a seed, not "unset"
        stop=["", "ab", ""],  # empty stop strings would match everywhere: dropped
        stop_token_ids=[3, 9, 3],
        ignore_eos=True,
        logprobs=True,
    )
    assert SamplingOptions.from_proto(params) == SamplingOptions(
        max_new_tokens=5,
        temperature=0.5,
        top_p=0.25,
        top_k=7,
        seed=0,
        stop=("ab",),
        stop_token_ids=frozenset({3, 9}),
        ignore_eos=True,
        logprobs=True,
    )


def test_options_from_a_proto_with_defaults_are_greedy_and_unfiltered():
    options = SamplingOptions.from_proto(common_pb2.SamplingParams(max_new_tokens=1))
    assert options == SamplingOptions(
        max_new_tokens=1, temperature=0.0, top_p=1.0, top_k=0, seed=None, stop=()
    )
    assert options.greedy


@pytest.mark.parametrize(
    ("temperature", "expected"),
    # common.proto: "positive values under 1e-4 sample as 1e-4"; 0 is greedy.
    [(0.0, 0.0), (1e-6, 1e-4), (1e-4, 1e-4), (2.0, 2.0)],
)
def test_proto_temperature_is_clamped_to_the_documented_minimum(temperature, expected):
    params = common_pb2.SamplingParams(max_new_tokens=1, temperature=temperature)
    got = SamplingOptions.from_proto(params).temperature
    assert got == pytest.approx(expected, rel=1e-6)  # float32 in the proto


@pytest.mark.parametrize(("top_p", "expected"), [(0.0, 1.0), (1.0, 1.0), (0.75, 0.75)])
def test_proto_top_p_zero_means_no_nucleus(top_p, expected):
    params = common_pb2.SamplingParams(max_new_tokens=1, top_p=top_p)
    assert SamplingOptions.from_proto(params).top_p == expected


def test_any_positive_temperature_samples():
    assert SamplingOptions(max_new_tokens=1).greedy
    assert not SamplingOptions(max_new_tokens=1, temperature=1e-4).greedy


# ---- request_seed ---------------------------------------------------------------------------


def test_a_seeded_request_samples_with_its_seed_as_a_uint64():
    seed = 2**64 - 1  # the proto's seed is a uint64
    assert request_seed(SamplingOptions(max_new_tokens=1, temperature=1.0, seed=seed)) == seed
    assert request_seed(SamplingOptions(max_new_tokens=1, seed=0)) == 0
    assert request_seed(SamplingOptions(max_new_tokens=1, seed=-1)) == 2**64 - 1


def test_unseeded_requests_get_different_seeds():
    options = SamplingOptions(max_new_tokens=1, temperature=1.0)
    seeds = {request_seed(options) for _ in range(4)}
    assert len(seeds) == 4  # 64 random bits each: a collision has odds about 2^-60
    assert all(0 <= s < 2**64 for s in seeds)


# ---- filter_logits ------------------------------------------------------------------------


def test_top_k_keeps_exactly_the_k_largest():
    logits = [0.5, -1.0, 2.0, 0.0, 1.5]  # ranked: 2, 4, 0, 3, 1
    assert _kept(logits, 1, 1.0) == [False, False, True, False, False]
    assert _kept(logits, 3, 1.0) == [True, False, True, False, True]


def test_no_filter_when_top_k_is_off_or_covers_the_vocabulary():
    logits = [0.5, -1.0, 2.0, 0.0]
    for top_k in (0, 4, 7):
        assert _kept(logits, top_k, 1.0) == [True] * 4


def test_top_p_one_keeps_even_tokens_of_vanishing_probability():
    # e^-200 rounds to 0 in float32: a cumulative sum that "reaches" 1 must not drop them.
    assert _kept([0.0, -200.0, -300.0], 0, 1.0) == [True] * 3


def test_a_token_goes_once_the_tokens_before_it_reach_top_p_exactly():
    # Two equal logits: probabilities exactly 1/2. The first alone reaches 0.5, so the
    # nucleus is one token; a hair above 0.5 it needs both.
    assert sum(_kept([0.0, 0.0], 0, 0.5)) == 1
    assert _kept([0.0, 0.0], 0, 0.5001) == [True, True]


def test_nucleus_is_taken_over_the_top_k_renormalized():
    # top-k 2 of [3, 2, 1, 0] leaves probabilities e^3 / (e^3 + e^2) = 0.731 and 0.269; the
    # first alone reaches 0.7. Over the whole vocabulary it would be 0.644 and need two.
    first = math.exp(3) / (math.exp(3) + math.exp(2))
    assert first > 0.7 > math.exp(3) / sum(math.exp(x) for x in (3, 2, 1, 0))
    assert _kept([3.0, 2.0, 1.0, 0.0], 2, 0.7) == [True, False, False, False]


# ---- sample -------------------------------------------------------------------------------


def test_greedy_rows_take_the_argmax_and_need_no_generator():
    rows = [[0.1, 2.0, -1.0, 1.9], [5.0, 4.0, 3.0, 6.0], [-3.0, -2.0, -2.5, -4.0]]
    options = [SamplingOptions(max_new_tokens=1)] * 3
    sampled = sample(torch.tensor(rows), options, [0] * 3, [0] * 3)
    assert sampled.token_ids == [_argmax(r) for r in rows]
    assert sampled.errors == [None] * 3
    assert sampled.logprobs == [None] * 3


def test_each_row_samples_with_its_own_seed_and_token_index():
    rows = torch.tensor([[0.0, 0.3, 0.1, 0.2, 0.4]] * 2)
    opts = SamplingOptions(max_new_tokens=1, temperature=1.0)

    def draws(seed_a: int, seed_b: int) -> list[tuple[int, int]]:
        out = []
        for index in range(40):
            a, b = sample(rows, [opts, opts], [seed_a, seed_b], [index, index]).token_ids
            out.append((a, b))
        return out

    together = draws(1, 2)
    # Row 0 draws the same whatever row 1's seed is, and the two rows differ.
    assert [a for a, _ in together] == [a for a, _ in draws(1, 99)]
    assert [a for a, _ in together] != [b for _, b in together]
    # The token index moves the draw: one seed's 40 tokens are not all the same.
    assert len({a for a, _ in together}) > 1


def test_top_k_limits_samples_to_the_k_best_tokens():
    logits = torch.tensor([[1.0, 0.0, 3.0, 2.9, -1.0]]).expand(2000, -1).contiguous()
    opts = SamplingOptions(max_new_tokens=1, temperature=5.0, top_k=2)
    tokens = sample(logits, [opts] * 2000, list(range(2000)), [0] * 2000).token_ids
    # Both kept tokens have probability about 1/2: each appears (odds of missing 2^-2000).
    assert set(tokens) == {2, 3}


def test_a_tiny_temperature_is_greedy_without_nan():
    # Built without from_proto: the sampler clamps too, so 1e-30 cannot overflow the scale.
    rows = torch.tensor([[0.0, 50.0, 100.0, 99.9]])
    opts = SamplingOptions(max_new_tokens=1, temperature=1e-30)
    for seed in range(5):
        sampled = sample(rows, [opts], [seed], [0])
        assert (sampled.token_ids, sampled.errors) == ([2], [None])


def test_top_k_one_samples_the_argmax_at_any_temperature():
    rows = torch.tensor([[0.0, 1.0, 3.0, 2.5]])
    opts = SamplingOptions(max_new_tokens=1, temperature=10.0, top_k=1)
    for seed in range(5):
        sampled = sample(rows, [opts], [seed], [seed])
        assert (sampled.token_ids, sampled.errors) == ([2], [None])


def test_finite_logits_of_any_size_sample_without_overflow():
    # Shifted by the row's max, the scaled logits are <= 0: 3e38 - (-3e38) would overflow.
    rows = torch.tensor([[3e38, -3e38, 0.0], [-3e38, -3e38, 3e38]])
    opts = SamplingOptions(max_new_tokens=1, temperature=1.0)
    sampled = sample(rows, [opts, opts], [0, 1], [0, 0])
    assert (sampled.token_ids, sampled.errors) == ([0, 2], [None, None])


def test_one_option_one_seed_and_one_token_index_per_row():
    rows = torch.zeros(3, 4)
    opts = SamplingOptions(max_new_tokens=1, logprobs=True)
    with pytest.raises(ValueError):
        sample(rows, [opts] * 3, [0] * 2, [0] * 3)
    with pytest.raises(ValueError):
        sample(rows, [opts] * 3, [0] * 3, [0] * 2)
    with pytest.raises(ValueError):
        sample(rows, [opts] * 2, [0] * 2, [0] * 2)


@pytest.mark.gpu
def test_a_request_on_the_gpu_samples_there():
    cuda = torch.device("cuda")
    opts = SamplingOptions(max_new_tokens=1, temperature=1.0, seed=5)
    sampled = sample(torch.tensor([[0.0, 1.0, 0.5]], device=cuda), [opts], [5], [0])
    assert sampled.errors == [None] and sampled.token_ids[0] in (0, 1, 2)


def test_masked_tokens_are_never_sampled_and_are_no_error():
    # -inf marks tokens a caller masked out; a row with some finite logits is healthy.
    rows = torch.tensor([[float("-inf"), 0.0, float("-inf"), 0.0]]).expand(200, -1).contiguous()
    opts = SamplingOptions(max_new_tokens=1, temperature=1.0)
    sampled = sample(rows, [opts] * 200, [11] * 200, list(range(200)))
    assert set(sampled.token_ids) == {1, 3}
    assert sampled.errors == [None] * 200


def test_non_finite_rows_fail_alone():
    nan, inf = float("nan"), float("inf")
    rows = torch.tensor(
        [
            [0.0, 1.0, 0.5],  # greedy, healthy
            [0.0, nan, 0.5],  # sampled, NaN
            [0.0, inf, 0.5],  # greedy, +inf
            [-inf, -inf, -inf],  # sampled, nothing finite
            [0.0, inf, 0.5],  # sampled, +inf
            [0.0, 0.2, 3.0],  # sampled, healthy
        ]
    )
    greedy = SamplingOptions(max_new_tokens=1)
    hot = SamplingOptions(max_new_tokens=1, temperature=1.0)
    options = [greedy, hot, greedy, hot, hot, hot]
    sampled = sample(rows, options, [3] * 6, [0] * 6)
    failed = [i for i, e in enumerate(sampled.errors) if e is not None]
    assert failed == [1, 2, 3, 4]
    for i in failed:
        assert str(sampled.errors[i]) == "the model produced non-finite logits for this request"
    assert sampled.token_ids[0] == 1
    alone = sample(rows[5:], [hot], [3], [0])
    assert sampled.token_ids[5] == alone.token_ids[0]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        # None of these is reachable through from_proto: options built by hand.
        (SamplingOptions(max_new_tokens=1, temperature=1.0, top_p=-1.0), "top_p must be > 0"),
        (SamplingOptions(max_new_tokens=1, temperature=1.0, top_p=0.0), "top_p must be > 0"),
        (SamplingOptions(max_new_tokens=1, temperature=1.0, top_k=-3), "top_k must be >= 0"),
        (
            SamplingOptions(max_new_tokens=1, temperature=float("nan")),
            "temperature must be finite, >= 0",
        ),
        (SamplingOptions(max_new_tokens=1, temperature=-1.0), "temperature must be finite, >= 0"),
    ],
)
def test_a_row_whose_options_cannot_be_sampled_fails_alone(options, message):
    rows = torch.tensor([[0.0, 1.0, 0.5], [0.0, 1.0, 0.5], [0.3, 0.1, 0.2]])
    hot = SamplingOptions(max_new_tokens=1, temperature=1.0, top_k=2)
    batch = [options, SamplingOptions(max_new_tokens=1), hot]
    sampled = sample(rows, batch, [0, 0, 9], [0, 0, 4])
    assert str(sampled.errors[0]) == f"sampling failed: {message}"
    assert (sampled.errors[1], sampled.token_ids[1]) == (None, 1)
    assert (sampled.errors[2], sampled.token_ids[2]) == (
        None,
        *sample(rows[2:], [hot], [9], [4]).token_ids,
    )


def test_logprobs_are_of_the_raw_logits_and_only_where_asked():
    # common.proto: log-softmax of the raw logits, before temperature, top-k and top-p.
    rows = [[0.5, 2.0, -1.0, 1.0], [3.0, 0.0, 1.0, 2.5], [1.0, 1.5, 0.0, -2.0]]
    options = [
        SamplingOptions(max_new_tokens=1, logprobs=True),
        SamplingOptions(max_new_tokens=1, temperature=3.0, top_k=1, logprobs=True),
        SamplingOptions(max_new_tokens=1),
    ]
    sampled = sample(torch.tensor(rows), options, [0, 1, 0], [0, 0, 0])
    assert sampled.token_ids == [1, 0, 1]  # top_k 1 is the argmax at any temperature
    assert sampled.errors == [None] * 3
    expected = [_log_softmax(rows[0])[1], _log_softmax(rows[1])[0]]
    assert sampled.logprobs[:2] == pytest.approx(expected, abs=1e-6)
    assert sampled.logprobs[2] is None
