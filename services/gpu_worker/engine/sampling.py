"""Sampling options (from a validated proto) and the sampler over a batch of logits.

`sample` draws every row of a batch at once: a fixed number of tensor operations whatever
the batch size, and no loop over rows (greedy rows take the argmax; sampled rows go through
one pass for the rows with a top-k or top-p filter and one for the rows without).

Reproducibility. A request's draw for its n-th token comes from one uniform u in [0, 1), a
counter-based hash of (its seed, n) (`uniforms`), so it depends on its seed, n and its own
logits, never on its row or on what else is in the batch. Unseeded requests get 64 random
bits as their seed when they are queued (`request_seed`). To make "the same" exact rather
than close, everything after the temperature is integer arithmetic: a token's weight is
floor(exp((logit - max) / T) * 2**shift), an int64 (the argmax weighs 2**shift, and shift
is as large as keeps a row's total under 2**53, so u * total is exact in float64). Sums,
prefix sums and the nucleus's cut are then exact whatever the width or order a reduction
runs in; only exp itself may differ in its last bit between devices, so "the same" holds
on one device. A token whose weight rounds to 0 (below 2**-shift of the argmax's, under
1e-10 of it for vocabularies up to 2**18) is never drawn.

The filters keep a prefix of the row's canonical order: logits descending, ties by token id.
top-k keeps its first k tokens (0 = off); top-p then keeps the shortest prefix of those
whose weights reach top_p of their total (a token stays while the weights before it are
under top_p * total; the first always stays; 1 = off). Top-p sees the temperature, top-k
does not. A filtered row draws the token at the first position of that prefix whose running
sum of weights exceeds floor(u * sum); a row without filters does the same over token ids,
which needs no sort.

Logprobs are log_softmax of the raw logits (before temperature and filters), as
common.proto documents, at the chosen token.

The sampler fails rows, not batches: a row whose logits are not finite, or whose options are
outside the contract, is reported as that row's error and the other rows get their tokens as
if it had not been there. If the batched pass itself raises, each row is sampled alone, so
only the rows that still fail get an error (the same tokens either way, since no row's draw
depends on its neighbours).

`sample_async` only queues the draw on the device; its `result()` reads the tokens back, the
one wait for the device, so the engine can do other host work in between, launching the next
step included: `PendingSample.device_tokens` are the tokens on the device, which that step
takes its inputs from (engine.py, overlap scheduling). The read-back goes through pinned
memory behind an event, so it waits for this draw only, never for work queued after it.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from manylora.v1 import common_pb2
from services.common.errors import Internal
from services.gpu_worker.engine.sampling_draw import (
    MIN_TEMPERATURE,
    RowPlan,
    device_rows,
    draw_filtered,
    draw_unfiltered,
    filter_shape,
    kept_prefix,
    plan_rows,
    weight_shift,
)

logger = logging.getLogger(__name__)


_U64 = (1 << 64) - 1
# SplitMix64's increment and mixer constants (Steele, Lea and Flood, 2014).
_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


@dataclass(frozen=True)
class SamplingOptions:
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: frozenset[int] = field(default_factory=frozenset)
    ignore_eos: bool = False
    logprobs: bool = False

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_proto(cls, params: common_pb2.SamplingParams) -> SamplingOptions:
        """Options of params that passed `check_sampling_params` (at the worker's boundary)."""
        temperature = float(params.temperature)
        return cls(
            max_new_tokens=params.max_new_tokens,
            temperature=max(temperature, MIN_TEMPERATURE) if temperature > 0 else 0.0,
            top_p=params.top_p if params.top_p > 0 else 1.0,
            top_k=params.top_k,
            seed=params.seed if params.HasField("seed") else None,
            stop=tuple(s for s in params.stop if s),
            stop_token_ids=frozenset(params.stop_token_ids),
            ignore_eos=params.ignore_eos,
            logprobs=params.logprobs,
        )


def request_seed(options: SamplingOptions) -> int:
    """The seed a request samples with, fixed when it is queued: its own (as a uint64), or
    64 random bits."""
    if options.seed is not None:
        return options.seed & _U64
    return secrets.randbits(64)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output mixer, a bijection of uint64 (numpy's uint64 arrays wrap)."""
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    return z ^ (z >> np.uint64(31))


def _uint64s(values: Sequence[int]) -> np.ndarray:
    """values as uint64s, modulo 2**64 (the slow way only when some are outside)."""
    try:
        return np.array(values, dtype=np.uint64)
    except OverflowError:
        return np.array([v & _U64 for v in values], dtype=np.uint64)


def uniforms(seeds: Sequence[int], token_indices: Sequence[int]) -> np.ndarray:
    """u in [0, 1) with 53 random bits for each (seed, token index): output number
    index + 1 of a SplitMix64 stream whose state starts at mix64(seed). Counter-based, so a
    draw is a function of its own seed and index alone."""
    state = _mix64(_uint64s(seeds))
    steps = _uint64s(token_indices) + np.uint64(1)
    bits = _mix64(state + steps * _GAMMA)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


@dataclass
class Sampled:
    """The sampler's answer for each row: a token (and its logprob when asked), or an error
    that belongs to that row's request alone."""

    token_ids: list[int]
    logprobs: list[float | None]
    errors: list[Exception | None]


def sample(
    logits: torch.Tensor,
    options: Sequence[SamplingOptions],
    seeds: Sequence[int],
    token_indices: Sequence[int],
) -> Sampled:
    """Next token of each row of logits [B, V] (float32), and its logprob when asked.

    Row i samples with options[i] and the uniform of (seeds[i], token_indices[i]), where
    token_indices[i] is the number of tokens its request has generated so far."""
    return sample_async(logits, options, seeds, token_indices).result()


def sample_async(
    logits: torch.Tensor,
    options: Sequence[SamplingOptions],
    seeds: Sequence[int],
    token_indices: Sequence[int],
) -> PendingSample:
    """`sample`, queued on the device: the host is free until `result()`, which waits for
    the draw (on CUDA, the step's one sync). The same tokens as `sample`."""
    if not len(options) == len(seeds) == len(token_indices) == logits.shape[0]:
        raise ValueError(
            f"{logits.shape[0]} rows of logits need as many options, seeds and token indices "
            f"(got {len(options)}, {len(seeds)}, {len(token_indices)})"
        )
    pending = PendingSample(logits, options, seeds, token_indices)
    try:
        pending.launched = _launch_batch(logits, options, seeds, token_indices)
    except Exception as exc:
        pending.failure = exc
    return pending


@dataclass
class PendingSample:
    """A batch's draw on its way: `launched` when its kernels are queued, else `failure`."""

    logits: torch.Tensor
    options: Sequence[SamplingOptions]
    seeds: Sequence[int]
    token_indices: Sequence[int]
    launched: _Launched | None = None
    failure: Exception | None = None

    @property
    def device_tokens(self) -> torch.Tensor | None:
        """Each row's token on the device (int64 [B]), queued, for a later step's inputs;
        None when the batched draw failed to launch (only `result` has tokens then)."""
        return self.launched.tokens if self.launched is not None else None

    def result(self, per_row_fallback: bool = True) -> Sampled:
        """The tokens (waiting for the device). If the batched pass failed, launching or
        here, each row is sampled alone, so only the rows that still fail get an error.
        Without `per_row_fallback` (work queued after the draw may have overwritten the
        logits, and a later step took `device_tokens` that the host would not get), a failed
        read-back fails every row instead."""
        if self.launched is not None:
            try:
                return _collect(self.launched)
            except Exception as exc:
                self.failure = exc
                if not per_row_fallback:
                    logger.error("reading the sampled tokens back failed", exc_info=exc)
                    count = self.logits.shape[0]
                    error = Internal(f"sampling failed: {type(exc).__name__}")
                    return Sampled([0] * count, [None] * count, [error] * count)
        if self.logits.shape[0] == 1:
            why = type(self.failure).__name__
            return Sampled([0], [None], [Internal(f"sampling failed: {why}")])
        logger.error("batched sampling failed; sampling each row alone", exc_info=self.failure)
        rows = [
            sample(
                self.logits[i : i + 1],
                self.options[i : i + 1],
                self.seeds[i : i + 1],
                self.token_indices[i : i + 1],
            )
            for i in range(self.logits.shape[0])
        ]
        return Sampled(
            [r.token_ids[0] for r in rows],
            [r.logprobs[0] for r in rows],
            [r.errors[0] for r in rows],
        )


@dataclass
class _Launched:
    """A batch's draw queued on the device: what `_collect` needs to read it back."""

    # [2 or 3, B] float64: tokens, finite, logprobs; on CUDA a pinned host copy on its way.
    host: torch.Tensor | None
    plan: RowPlan | None
    want_logprobs: list[bool]
    tokens: torch.Tensor | None = None  # [B] int64 on the logits' device
    # On CUDA, recorded after the copy to `host`: waiting on it releases the GIL, so the
    # worker's event loop streams outputs while the engine thread waits, and it waits for
    # this draw alone (a blocking copy would wait for everything queued after it too).
    done: torch.cuda.Event | None = None


def _launch_batch(
    logits: torch.Tensor,
    options: Sequence[SamplingOptions],
    seeds: Sequence[int],
    token_indices: Sequence[int],
) -> _Launched:
    """Queue the draw of every row. Nothing here waits for the device (the options reach it
    through pinned memory, see `sampling_draw.device_rows`), but for a top-p row without
    top-k whose nucleus may be wider than NUCLEUS_WIDTH (`sampling_draw.kept_prefix` asks the
    device whether to sort it whole)."""
    batch, vocab = logits.shape
    if batch == 0:
        return _Launched(None, None, [])
    logits = logits.float()
    # max propagates NaN, so one reduction finds rows with a NaN, a +inf or no finite logit.
    row_max = logits.amax(dim=-1)
    finite = torch.isfinite(row_max)
    chosen = torch.argmax(logits, dim=-1)  # the greedy rows' tokens; sampled rows overwrite
    plan = plan_rows(options, vocab)
    for group in (plan.filtered, plan.unfiltered):
        if not group.size:
            continue
        picked = group.tolist()
        u = uniforms([seeds[i] for i in picked], [token_indices[i] for i in picked])
        rows, index = device_rows(logits, row_max, finite, plan, group, u)
        if group is plan.filtered:
            tokens = draw_filtered(rows, filter_shape(plan, group, vocab))
        else:
            tokens = draw_unfiltered(rows, weight_shift(vocab))
        chosen.index_copy_(0, index, tokens)
    # One transfer for the tokens, the finiteness flags and the logprobs (float64 holds
    # every token id exactly).
    columns = [chosen.to(torch.float64), finite.to(torch.float64)]
    want_logprobs = [o.logprobs for o in options]
    if any(want_logprobs):
        picked_lp = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None])[:, 0]
        columns.append(picked_lp.to(torch.float64))
    host = torch.stack(columns)
    done = None
    if host.device.type == "cuda":
        pinned = torch.empty(host.shape, dtype=host.dtype, pin_memory=True)
        host = pinned.copy_(host, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
    return _Launched(host, plan, want_logprobs, chosen, done)


def _collect(launched: _Launched) -> Sampled:
    """Read a launched draw back: the one wait for the device."""
    if launched.host is None or launched.plan is None:
        return Sampled([], [], [])
    if launched.done is not None:
        launched.done.synchronize()
    host = launched.host.tolist()
    batch = len(host[0])
    errors: list[Exception | None] = [None] * batch
    for row, why in launched.plan.invalid.items():
        errors[row] = Internal(f"sampling failed: {why}")
    for row, ok in enumerate(host[1]):
        if not ok and errors[row] is None:
            errors[row] = Internal("the model produced non-finite logits for this request")
    want = launched.want_logprobs
    logprobs: list[float | None] = [None] * batch
    if any(want):
        logprobs = [lp if w else None for lp, w in zip(host[2], want, strict=True)]
    return Sampled([int(t) for t in host[0]], logprobs, errors)


def keep_mask(
    logits: torch.Tensor,
    temperature: Sequence[float],
    top_k: Sequence[int],
    top_p: Sequence[float],
) -> torch.Tensor:
    """[B, V] bool: the tokens each row of finite logits [B, V] may draw at its positive
    temperature, top-k and top-p — the set `sample` draws from."""
    batch, vocab = logits.shape
    options = [
        SamplingOptions(max_new_tokens=1, temperature=t, top_k=k, top_p=p)
        for t, k, p in zip(temperature, top_k, top_p, strict=True)
    ]
    plan = plan_rows(options, vocab)
    if plan.invalid or plan.filtered.size + plan.unfiltered.size != batch:
        raise ValueError("keep_mask takes positive temperatures, top_k >= 0 and top_p > 0")
    logits = logits.float()
    mask = torch.ones(batch, vocab, dtype=torch.bool, device=logits.device)
    group = plan.filtered
    if group.size:
        finite = torch.ones(batch, dtype=torch.bool, device=logits.device)
        rows, index = device_rows(
            logits, logits.amax(dim=-1), finite, plan, group, np.zeros(group.size)
        )
        prefix = kept_prefix(rows, filter_shape(plan, group, vocab))
        last = prefix.values.gather(1, (prefix.kept - 1)[:, None])  # the last kept logit
        above = rows.logits > last
        ties = rows.logits == last
        room = prefix.kept[:, None] - above.sum(dim=-1, keepdim=True)  # ties that stay
        keep = above | (ties & (torch.cumsum(ties, dim=-1) <= room))
        mask.index_copy_(0, index, keep)
    return mask


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [..., V] with everything outside top-k and the top-p nucleus (at temperature
    1) set to -inf."""
    rows = logits.reshape(-1, logits.shape[-1])
    n = rows.shape[0]
    keep = keep_mask(rows, [1.0] * n, [top_k] * n, [top_p] * n)
    return rows.masked_fill(~keep, float("-inf")).reshape(logits.shape)
