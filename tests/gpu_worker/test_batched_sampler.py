"""The batched sampler against independent references: a plain per-row torch filter (stable
sort, float64 softmax, top-k then top-p), the exact filtered softmax (chi-square tests at
fixed seeds), SplitMix64's published output and a pure-Python hash; and its promise that a
request's token depends on its seed, token index and logits only, whatever shares the batch,
in whatever order (on the CPU and, marked gpu, on CUDA)."""

from __future__ import annotations

import random

import pytest
import torch

from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.engine import Engine
from services.gpu_worker.engine.sampling import (
    PendingSample,
    SamplingOptions,
    keep_mask,
    sample,
    uniforms,
)
from services.gpu_worker.engine.sampling_draw import NUCLEUS_WIDTH
from services.gpu_worker.engine.sequence import Sequence, StepOutput
from services.gpu_worker.engine.tokenizer import ByteTokenizer
from tests.oracle import TINY_MHA, build_pair

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]
U64 = (1 << 64) - 1


# ---- references, written apart from the sampler ----------------------------------------------


def reference_keep(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """[V] bool: top-k keeps the k best tokens, ties going to the lower token id; top-p then
    keeps the shortest run of those (renormalized, at the temperature) whose probability
    reaches top_p: a token stays while the probability before it is under top_p."""
    vocab = row.shape[0]
    order = torch.sort(row.double(), descending=True, stable=True).indices
    k = vocab if top_k <= 0 or top_k >= vocab else top_k
    kept_sorted = torch.zeros(vocab, dtype=torch.bool)
    kept_sorted[:k] = True
    if top_p < 1.0:
        probs = torch.softmax(row.double()[order[:k]] / temperature, dim=0)
        before = torch.cumsum(probs, dim=0) - probs
        kept_sorted[:k] = before < top_p
        kept_sorted[0] = True
    keep = torch.zeros(vocab, dtype=torch.bool)
    keep[order] = kept_sorted
    return keep


def reference_probs(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> list[float]:
    """The exact distribution a sampled row draws from: the softmax at the temperature over
    the kept tokens, 0 elsewhere (float64)."""
    keep = reference_keep(row, temperature, top_k, top_p)
    scaled = (row.double() / temperature).masked_fill(~keep, float("-inf"))
    return torch.softmax(scaled, dim=0).tolist()


def chi_square_p_value(counts: list[int], probs: list[float]) -> float:
    """Pearson's chi-square test of counts against probs (categories of probability 0 must
    have no counts); survival function from torch's regularized incomplete gamma."""
    assert all(c == 0 for c, p in zip(counts, probs, strict=True) if p == 0.0)
    cells = [(c, p) for c, p in zip(counts, probs, strict=True) if p > 0.0]
    n = sum(counts)
    x = sum((c - n * p) ** 2 / (n * p) for c, p in cells)
    dof = len(cells) - 1
    if dof == 0:
        return 1.0
    a, half_x = torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(x / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(a, half_x))


def splitmix64_uniform(seed: int, index: int) -> float:
    """The documented hash in plain Python integers: output number index + 1 of SplitMix64
    started at mix64(seed), its top 53 bits over 2**53."""

    def mix(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & U64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & U64
        return z ^ (z >> 31)

    bits = mix((mix(seed & U64) + (index + 1) * 0x9E3779B97F4A7C15) & U64)
    return (bits >> 11) / 2.0**53


def hot(
    temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, logprobs: bool = False
) -> SamplingOptions:
    return SamplingOptions(
        max_new_tokens=1, temperature=temperature, top_k=top_k, top_p=top_p, logprobs=logprobs
    )


GREEDY = SamplingOptions(max_new_tokens=1)


def _rows(count: int, vocab: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    """Logits as the model gives them: bf16 (so with ties) turned into float32."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(count, vocab, generator=gen) * scale).bfloat16().float()


# ---- the hash ------------------------------------------------------------------------------


def test_seed_zero_index_zero_is_splitmix64s_first_output():
    # mix64(0) = 0, so this is SplitMix64's first output from state 0: 0xE220A8397B1DCDAF.
    assert uniforms([0], [0])[0] == (0xE220A8397B1DCDAF >> 11) / 2.0**53


def test_uniforms_follow_the_documented_hash():
    rng = random.Random(5)
    seeds = [0, 1, 2**63, U64, *(rng.getrandbits(64) for _ in range(50))]
    indices = [0, 7, 2**40, 3, *(rng.randrange(1 << 20) for _ in range(50))]
    got = uniforms(seeds, indices).tolist()
    assert got == [splitmix64_uniform(s, i) for s, i in zip(seeds, indices, strict=True)]


@pytest.mark.parametrize("walk", ["seeds", "indices"])
def test_uniforms_are_uniform_along_seeds_and_along_token_indices(walk: str):
    n = 64_000
    steps = list(range(n))
    u = uniforms(steps, [3] * n) if walk == "seeds" else uniforms([99] * n, steps)
    assert ((u >= 0) & (u < 1)).all()
    counts = torch.histc(torch.from_numpy(u), bins=64, min=0.0, max=1.0).long().tolist()
    assert chi_square_p_value(counts, [1 / 64] * 64) > 1e-4


# ---- the filter against the per-row reference ----------------------------------------------


def _filter_cases(vocab: int) -> list[tuple[float, int, float]]:
    cases = []
    for temperature in (0.3, 0.8, 1.7):
        for top_k in (0, 1, 2, 5, 40, vocab - 1, vocab, vocab + 7):
            for top_p in (1.0, 0.95, 0.9, 0.5, 0.1, 1e-9):
                cases.append((temperature, top_k, top_p))
    return cases


@pytest.mark.parametrize("kind", ["bf16", "integers", "flat"])
def test_keep_mask_matches_the_per_row_reference(kind: str):
    vocab = 300
    cases = _filter_cases(vocab)
    if kind == "bf16":
        logits = _rows(len(cases), vocab, seed=1)
    elif kind == "integers":  # ties everywhere
        gen = torch.Generator().manual_seed(2)
        logits = torch.randint(-4, 5, (len(cases), vocab), generator=gen).float()
    else:  # nuclei wider than most k
        logits = _rows(len(cases), vocab, seed=3, scale=0.2)
    mask = keep_mask(logits, *map(list, zip(*cases, strict=True)))
    for row, (temperature, top_k, top_p) in enumerate(cases):
        expected = reference_keep(logits[row], temperature, top_k, top_p)
        assert torch.equal(mask[row], expected), (temperature, top_k, top_p)


def test_a_nucleus_wider_than_the_first_cut_is_found_over_the_whole_row():
    vocab = 4 * NUCLEUS_WIDTH
    logits = _rows(4, vocab, seed=4, scale=0.3)  # flat: p 0.9 needs most of the row
    top_p = [0.9, 0.99, 0.2, 0.9]
    top_k = [0, 0, 0, 3000]
    mask = keep_mask(logits, [1.0] * 4, top_k, top_p)
    for row in range(4):
        expected = reference_keep(logits[row], 1.0, top_k[row], top_p[row])
        assert torch.equal(mask[row], expected)
    assert int(mask[0].sum()) > NUCLEUS_WIDTH  # the case this test is for


# ---- draws against the exact filtered softmax ----------------------------------------------

DRAW_CASES = [
    # (logits, temperature, top_k, top_p)
    ([2.0, 1.0, 0.5, 0.0, -1.0, -1.0, 0.5, 1.5], 0.7, 0, 1.0),
    ([2.0, 1.0, 0.5, 0.0, -1.0, -1.0, 0.5, 1.5], 1.3, 4, 1.0),
    ([2.0, 1.0, 0.5, 0.0, -1.0, -1.0, 0.5, 1.5], 1.3, 0, 0.8),
    ([2.0, 1.0, 0.5, 0.0, -1.0, -1.0, 0.5, 1.5], 2.0, 5, 0.9),
    ([1.0, 1.0, 1.0, 0.0, 0.0, 2.0, 2.0, -3.0], 1.0, 0, 1.0),  # ties
    ([1.0, 1.0, 1.0, 0.0, 0.0, 2.0, 2.0, -3.0], 1.0, 4, 1.0),  # top-k cuts a tie
    ([1.0, 1.0, 1.0, 0.0, 0.0, 2.0, 2.0, -3.0], 0.5, 0, 0.95),
]


def _draw_many(logits: list[float], options: SamplingOptions, n: int, device: str) -> list[int]:
    """n tokens of one row: 50 requests' seeds times their first n / 50 token indices."""
    batch = torch.tensor(logits, device=device).expand(n, -1).contiguous()
    seeds = [1000 + i // 50 for i in range(n)]
    indices = [i % 50 for i in range(n)]
    return sample(batch, [options] * n, seeds, indices).token_ids


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(("logits", "temperature", "top_k", "top_p"), DRAW_CASES)
def test_draws_follow_the_filtered_softmax(logits, temperature, top_k, top_p, device):
    n = 20_000
    tokens = _draw_many(logits, hot(temperature, top_k, top_p), n, device)
    counts = [tokens.count(t) for t in range(len(logits))]
    probs = reference_probs(torch.tensor(logits), temperature, top_k, top_p)
    # Fixed seeds, so one deterministic draw; a true sampler passes with probability 1 - 1e-4.
    assert chi_square_p_value(counts, probs) > 1e-4


def test_the_chi_square_test_has_the_power_to_see_a_wrong_temperature():
    logits, temperature, top_k, top_p = DRAW_CASES[1]  # top-k only: the same kept set
    tokens = _draw_many(logits, hot(temperature, top_k, top_p), 20_000, "cpu")
    counts = [tokens.count(t) for t in range(len(logits))]
    wrong = reference_probs(torch.tensor(logits), temperature / 1.5, top_k, top_p)
    assert chi_square_p_value(counts, wrong) < 1e-12


@pytest.mark.parametrize("device", DEVICES)
def test_draws_over_a_nucleus_longer_than_the_first_cut(device: str):
    vocab = 2 * NUCLEUS_WIDTH
    row = _rows(1, vocab, seed=6, scale=0.5)[0]
    options = hot(0.9, 0, 0.9)
    tokens = _draw_many(row.tolist(), options, 4000, device)
    probs = reference_probs(row, 0.9, 0, 0.9)
    keep = [p > 0 for p in probs]
    assert sum(keep) > NUCLEUS_WIDTH
    assert all(keep[t] for t in tokens)
    # Binned by rank (most likely first): 8 cells of 256 tokens, so a draw cut short at
    # the first NUCLEUS_WIDTH tokens leaves the last cells empty.
    bins = 8
    width = vocab // bins
    rank = {t: r for r, t in enumerate(sorted(range(vocab), key=lambda t: -probs[t]))}
    counts = [0] * bins
    for t in tokens:
        counts[rank[t] // width] += 1
    by_rank = sorted(probs, reverse=True)
    binned = [sum(by_rank[b * width : (b + 1) * width]) for b in range(bins)]
    assert chi_square_p_value(counts, binned) > 1e-4


# ---- edge cases ------------------------------------------------------------------------------


def test_top_k_beyond_the_vocabulary_is_no_top_k():
    logits = _rows(40, 50, seed=7)
    for top_p in (1.0, 0.7):
        wide = sample(logits, [hot(1.0, 57, top_p)] * 40, list(range(40)), [3] * 40)
        off = sample(logits, [hot(1.0, 0, top_p)] * 40, list(range(40)), [3] * 40)
        assert wide.token_ids == off.token_ids


@pytest.mark.parametrize("top_p", [1e-9, 1e-45])
def test_a_tiny_top_p_keeps_only_the_argmax_ties_to_the_lower_id(top_p: float):
    rows = torch.tensor([[1.0, 3.0, 3.0, 0.0], [0.5, -1.0, 0.2, 0.4]]).repeat(100, 1)
    tokens = sample(rows, [hot(2.0, 0, top_p)] * 200, list(range(200)), [0] * 200).token_ids
    assert tokens == [1, 0] * 100


def test_a_tiny_temperature_draws_among_the_tied_maxima_only():
    rows = torch.tensor([[1.0, 3.0, 2.99, 3.0, 0.0]]).expand(400, -1).contiguous()
    for temperature in (1e-4, 1e-30):
        tokens = sample(rows, [hot(temperature)] * 400, list(range(400)), [0] * 400).token_ids
        assert set(tokens) == {1, 3}  # each has odds 1/2: missing one has odds 2^-399


def test_top_k_cuts_ties_by_token_id():
    rows = torch.full((300, 6), 2.0)
    one = sample(rows, [hot(1.0, 1)] * 300, list(range(300)), [0] * 300).token_ids
    assert set(one) == {0}  # as greedy's argmax
    two = sample(rows, [hot(1.0, 2)] * 300, list(range(300)), [0] * 300).token_ids
    assert set(two) == {0, 1}


def test_greedy_filtered_and_unfiltered_rows_share_a_batch():
    logits = _rows(6, 40, seed=8)
    options = [GREEDY, hot(0.8, 5, 0.9), hot(1.2), GREEDY, hot(0.5, 0, 0.6), hot(1.0, 3)]
    out = sample(logits, options, [11] * 6, [2] * 6)
    assert out.errors == [None] * 6
    argmax = torch.argmax(logits, dim=-1).tolist()
    assert [out.token_ids[i] for i in (0, 3)] == [argmax[0], argmax[3]]
    for row, opts in enumerate(options):
        if not opts.greedy:
            keep = reference_keep(logits[row], opts.temperature, opts.top_k, opts.top_p)
            assert keep[out.token_ids[row]]


# ---- a request's draw depends on nothing else ------------------------------------------------


def _pool(vocab: int) -> tuple[torch.Tensor, list[SamplingOptions], list[int], list[int]]:
    """Rows of every kind: greedy, unfiltered, top-k, top-p, both, a nucleus past the first
    cut, k past the vocabulary, tiny top-p and temperature, ties, and non-finite rows."""
    options = [
        GREEDY,
        hot(0.8, 50, 0.9),
        hot(1.0),
        hot(0.8, 50, 0.9, logprobs=True),
        hot(1.3, 0, 0.95),
        hot(0.7, 3),
        hot(1.0, vocab + 9, 0.8),
        hot(2.0, 0, 1e-9),
        hot(1e-4),
        hot(0.9, 200),
        hot(1.0, 0, 0.999),
        GREEDY,
        hot(0.8, 50, 0.9),
        hot(1.1, 7, 0.5),
    ]
    logits = _rows(len(options), vocab, seed=9)
    logits[10] = _rows(1, vocab, seed=10, scale=0.05)[0]  # a nucleus of most of the row
    logits[5] = torch.randint(0, 3, (vocab,), generator=torch.Generator().manual_seed(3)).float()
    logits[12, 17] = float("nan")
    logits[13, :] = float("-inf")
    seeds = [random.Random(i).getrandbits(64) for i in range(len(options))]
    seeds[12] = seeds[1]  # the same request twice: only the logits differ
    indices = [0, 5, 9, 1, 2, 3, 4, 70, 6, 7, 0, 8, 5, 9]
    return logits, options, seeds, indices


def _alone(
    logits: torch.Tensor,
    options: list[SamplingOptions],
    seeds: list[int],
    indices: list[int],
    row: int,
) -> tuple[int, bool]:
    out = sample(
        logits[row : row + 1], options[row : row + 1], seeds[row : row + 1], indices[row : row + 1]
    )
    return out.token_ids[0], out.errors[0] is None


@pytest.mark.parametrize("device", DEVICES)
def test_a_rows_token_is_the_same_in_any_batch_in_any_order(device: str):
    vocab = 2 * NUCLEUS_WIDTH + 100
    logits, options, seeds, indices = _pool(vocab)
    logits = logits.to(device)
    alone = [_alone(logits, options, seeds, indices, row) for row in range(len(options))]
    assert [ok for _, ok in alone] == [True] * 12 + [False, False]
    healthy = range(12)
    rng = random.Random(0)
    orders = [list(range(len(options))), list(reversed(range(len(options))))]
    orders += [rng.sample(range(len(options)), len(options)) for _ in range(3)]
    orders += [rng.sample(range(len(options)), rng.randint(2, 8)) for _ in range(6)]
    orders += [[1, 1, 12, 1, 3]]  # duplicates and a NaN neighbour
    for order in orders:
        out = sample(
            logits[order],
            [options[i] for i in order],
            [seeds[i] for i in order],
            [indices[i] for i in order],
        )
        for pos, row in enumerate(order):
            if row in healthy:
                assert (out.token_ids[pos], out.errors[pos] is None) == alone[row], (order, row)
            else:
                assert out.errors[pos] is not None


@pytest.mark.parametrize("device", DEVICES)
def test_a_seeded_stream_is_the_same_alone_and_in_a_crowd(device: str):
    """One request's 64 tokens, drawn alone step by step and then among 31 others whose
    options and logits change every step: the same tokens."""
    vocab = 500
    target = hot(0.8, 50, 0.9)
    own = _rows(64, vocab, seed=11).to(device)
    alone = [sample(own[t : t + 1], [target], [7], [t]).token_ids[0] for t in range(64)]
    kinds = [GREEDY, hot(1.0), hot(0.5, 10), hot(1.2, 0, 0.9), hot(0.8, 50, 0.9)]
    crowd = []
    for t in range(64):
        rng = random.Random(t)
        others = _rows(31, vocab, seed=100 + t).to(device)
        pos = rng.randrange(32)
        batch = torch.cat([others[:pos], own[t : t + 1], others[pos:]])
        options = [rng.choice(kinds) for _ in range(32)]
        options[pos] = target
        seeds = [rng.getrandbits(64) for _ in range(32)]
        seeds[pos] = 7
        indices = [rng.randrange(100) for _ in range(32)]
        indices[pos] = t
        crowd.append(sample(batch, options, seeds, indices).token_ids[pos])
    assert crowd == alone
    assert len(set(alone)) > 5  # a stream, not one token


# ---- through the engine ----------------------------------------------------------------------


class _Collect:
    def __init__(self) -> None:
        self.tokens: list[int] = []

    def __call__(self, out: StepOutput) -> None:
        assert out.error is None
        self.tokens.extend(out.token_ids)


def test_the_issues_setting_gives_the_same_text_whatever_shares_the_batch_and_when_it_joins():
    """temperature 0.8, top-p 0.9, top-k 50, seeded: alone, and joining a running batch of
    other sampled and greedy requests a few steps late, the same tokens."""
    model = build_pair(TINY_MHA)[0]
    prompt = list(range(40, 60))
    target = SamplingOptions(
        max_new_tokens=20, temperature=0.8, top_p=0.9, top_k=50, seed=42, ignore_eos=True
    )

    def run(crowd: int, late_steps: int) -> list[int]:
        engine = Engine(model, EngineConfig(pool_slots=16384))
        for i in range(crowd):
            opts = SamplingOptions(
                max_new_tokens=30,
                temperature=[0.0, 1.0, 0.7][i % 3],
                top_k=[0, 0, 20][i % 3],
                seed=i,
                ignore_eos=True,
            )
            engine.add(Sequence(f"o{i}", prompt[i:], opts, ByteTokenizer(), _Collect()))
        for _ in range(late_steps):
            engine.step()
        mine = _Collect()
        engine.add(Sequence("me", prompt, target, ByteTokenizer(), mine))
        while engine.has_work():
            engine.step()
        return mine.tokens

    alone = run(0, 0)
    assert len(alone) == 20
    assert run(5, 3) == alone
    assert run(3, 0) == alone


@pytest.mark.gpu
def test_cuda_draws_what_the_cpu_draws():
    """The same algorithm on both: exp may differ in its last bit between the two, which
    moves a draw only when u lands within that bit of a boundary, so nearly all agree."""
    vocab = 2 * NUCLEUS_WIDTH + 100
    kinds = [hot(0.8, 50, 0.9), hot(1.0), hot(1.3, 0, 0.95), hot(0.7, 3), GREEDY, hot(0.5, 0, 0.5)]
    options = [kinds[i % len(kinds)] for i in range(300)]
    logits = _rows(300, vocab, seed=12)
    seeds = list(range(300))
    indices = [i % 17 for i in range(300)]
    cpu = sample(logits, options, seeds, indices).token_ids
    cuda = sample(logits.cuda(), options, seeds, indices).token_ids
    agree = sum(a == b for a, b in zip(cpu, cuda, strict=True))
    assert agree >= 297


def test_the_engine_draws_each_token_with_its_requests_seed_and_index(monkeypatch):
    """The engine hands the sampler, for each row, the request's seed and the number of
    tokens it has generated so far: 0, 1, 2, ... for each request, whatever the step."""
    from services.gpu_worker.engine import engine as engine_module

    seen: dict[int, list[int]] = {}
    real_sample = engine_module.sample_async

    def spy(
        logits: torch.Tensor,
        options: list[SamplingOptions],
        seeds: list[int],
        token_indices: list[int],
    ) -> PendingSample:
        for seed, index in zip(seeds, token_indices, strict=True):
            seen.setdefault(seed, []).append(index)
        return real_sample(logits, options, seeds, token_indices)

    monkeypatch.setattr(engine_module, "sample_async", spy)
    model = build_pair(TINY_MHA)[0]
    engine = Engine(model, EngineConfig(pool_slots=16384))
    prompt = list(range(40, 50))
    for i, new in enumerate((6, 9)):
        opts = SamplingOptions(max_new_tokens=new, temperature=1.0, seed=500 + i, ignore_eos=True)
        engine.add(Sequence(f"r{i}", prompt, opts, ByteTokenizer(), _Collect()))
        engine.step()  # the second joins one step late
    while engine.has_work():
        engine.step()
    assert seen == {500: list(range(6)), 501: list(range(9))}
