"""Sampling options (from a validated proto) and the sampler over a batch of logits.

The sampler fails rows, not batches: a row whose logits are not finite, or whose sampling
raises, is reported as that row's error and the other rows get their tokens as if it had
not been there (each request samples with its own generator).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from manylora.v1 import common_pb2
from services.common.errors import Internal

# Colder than this is greedy up to exact ties; clamping keeps (logit - max) / temperature
# finite whatever the caller sends (1e-45 would overflow float32 to -inf - -inf = NaN).
MIN_TEMPERATURE = 1e-4


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


def make_generator(options: SamplingOptions, device: torch.device) -> torch.Generator | None:
    """A request's own generator, so its samples do not depend on what shares the batch."""
    if options.greedy:
        return None
    seed = options.seed if options.seed is not None else secrets.randbits(63)
    return torch.Generator(device=device).manual_seed(seed)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] with everything outside top-k and the top-p nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens before it already reach top_p; the first always stays.
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


@dataclass
class Sampled:
    """The sampler's answer for each row: a token (and its logprob when asked), or an error
    that belongs to that row's request alone."""

    token_ids: list[int]
    logprobs: list[float | None]
    errors: list[Exception | None]


def sample(
    logits: torch.Tensor,
    options: list[SamplingOptions],
    generators: list[torch.Generator | None],
) -> Sampled:
    """Next token of each row of logits [B, V] (float32), and its logprob when asked."""
    # max propagates NaN, so one reduction finds rows with a NaN, a +inf or no finite logit.
    row_max = logits.amax(dim=-1)
    finite = torch.isfinite(row_max)
    chosen = torch.argmax(logits, dim=-1)
    errors: list[Exception | None] = [None] * len(options)
    for row, (opts, gen) in enumerate(zip(options, generators, strict=True)):
        if opts.greedy:
            continue
        try:
            chosen[row] = _sample_row(logits[row], row_max[row], finite[row], opts, gen)
        except Exception as exc:  # whatever it is, it is this row's alone
            errors[row] = Internal(f"sampling failed: {type(exc).__name__}")
    # One transfer for the tokens and the finiteness flags.
    token_ids, finite_flags = torch.stack((chosen, finite.to(chosen.dtype))).tolist()
    for row, ok in enumerate(finite_flags):
        if not ok and errors[row] is None:
            errors[row] = Internal("the model produced non-finite logits for this request")
    logprobs: list[float | None] = [None] * len(options)
    if any(o.logprobs for o in options):
        picked = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None])[:, 0].tolist()
        logprobs = [lp if o.logprobs else None for lp, o in zip(picked, options, strict=True)]
    return Sampled(token_ids, logprobs, errors)


def _sample_row(
    logits: torch.Tensor,
    row_max: torch.Tensor,
    finite: torch.Tensor,
    opts: SamplingOptions,
    gen: torch.Generator | None,
) -> torch.Tensor:
    """One request's token. Shifted by the row's max first, the scaled logits are <= 0 with
    a 0 at the max, so for finite input the softmax has no inf and no NaN at any
    temperature. A non-finite row samples zeros instead (its result is discarded): on CUDA,
    multinomial of NaN probabilities is a device-side assert that would end the worker."""
    # Clamped here too: options built without from_proto must not divide by a subnormal,
    # which a device that flushes denormals reads as 0 (0 / 0 = NaN at the max).
    scaled = (logits - row_max) / max(opts.temperature, MIN_TEMPERATURE)
    scaled = torch.where(finite, scaled, torch.zeros_like(scaled))
    probs = torch.softmax(filter_logits(scaled, opts.top_k, opts.top_p), dim=-1)
    return torch.multinomial(probs, 1, generator=gen)[0]
