"""The sampler the engine had before the batched one (commit 604859a's
`services/gpu_worker/engine/sampling.py`), kept as `benchmarks/sampler_bench.py`'s baseline:
each sampled row runs its own filter and `torch.multinomial` with its request's own
`torch.Generator`, a Python loop of several kernels per row."""

from __future__ import annotations

import torch

from services.gpu_worker.engine.sampling import MIN_TEMPERATURE, SamplingOptions


def make_generator(options: SamplingOptions, device: torch.device) -> torch.Generator | None:
    """A request's own generator (seeded requests only here: the benchmark seeds all)."""
    if options.greedy:
        return None
    return torch.Generator(device=device).manual_seed(options.seed or 0)


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """logits [V] with everything outside top-k and the top-p nucleus set to -inf."""
    if 0 < top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(
    logits: torch.Tensor,
    options: list[SamplingOptions],
    generators: list[torch.Generator | None],
) -> tuple[list[int], list[float | None]]:
    """Tokens and logprobs of logits [B, V] (float32); rows' errors are left out here."""
    row_max = logits.amax(dim=-1)
    finite = torch.isfinite(row_max)
    chosen = torch.argmax(logits, dim=-1)
    for row, (opts, gen) in enumerate(zip(options, generators, strict=True)):
        if opts.greedy:
            continue
        scaled = (logits[row] - row_max[row]) / max(opts.temperature, MIN_TEMPERATURE)
        scaled = torch.where(finite[row], scaled, torch.zeros_like(scaled))
        probs = torch.softmax(filter_logits(scaled, opts.top_k, opts.top_p), dim=-1)
        chosen[row] = torch.multinomial(probs, 1, generator=gen)[0]
    token_ids, _ = torch.stack((chosen, finite.to(chosen.dtype))).tolist()
    logprobs: list[float | None] = [None] * len(options)
    if any(o.logprobs for o in options):
        picked = torch.log_softmax(logits, dim=-1).gather(1, chosen[:, None])[:, 0].tolist()
        logprobs = [lp if o.logprobs else None for lp, o in zip(picked, options, strict=True)]
    return token_ids, logprobs
