"""Sampling options (validated from the proto) and the sampler over a batch of logits."""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field

import torch

from manylora.v1 import common_pb2
from services.common.sampling_params import check_sampling_params


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
    def from_proto(cls, params: common_pb2.SamplingParams, vocab_size: int) -> SamplingOptions:
        """Validate; raise InvalidArgument naming the bad field."""
        check_sampling_params(params, vocab_size)
        return cls(
            max_new_tokens=params.max_new_tokens,
            temperature=params.temperature,
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


def sample(
    logits: torch.Tensor,
    options: list[SamplingOptions],
    generators: list[torch.Generator | None],
) -> tuple[list[int], list[float | None]]:
    """Next token of each row of logits [B, V] (float32), and its logprob when asked."""
    chosen = torch.argmax(logits, dim=-1)
    for row, (opts, gen) in enumerate(zip(options, generators, strict=True)):
        if opts.greedy:
            continue
        filtered = filter_logits(logits[row] / opts.temperature, opts.top_k, opts.top_p)
        probs = torch.softmax(filtered, dim=-1)
        chosen[row] = torch.multinomial(probs, 1, generator=gen)[0]
    token_ids = chosen.tolist()
    logprobs: list[float | None] = [None] * len(options)
    if any(o.logprobs for o in options):
        picked = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None])[:, 0].tolist()
        logprobs = [lp if o.logprobs else None for lp, o in zip(picked, options, strict=True)]
    return token_ids, logprobs
