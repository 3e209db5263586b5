"""S-LoRA's synthetic serving workload: a seeded trace of requests for many adapters.

A trace has `num_adapters` adapters and requests that arrive over `duration_s` seconds:

- **Popularity.** Each request picks adapter i (0-based) with probability
  p_i = (i + 1)^-alpha / sum_j (j + 1)^-alpha, a truncated power law (Zipf) over the adapter
  indices: adapter 0 is the most popular, alpha = 0 makes every adapter equally likely.
- **Arrivals.** A Gamma renewal process: inter-arrival times are i.i.d.
  Gamma(shape = 1/cv², scale = cv²/rate), so their mean is 1/rate and their coefficient of
  variation is cv (cv = 1 is a Poisson process; cv = 0 arrives every 1/rate seconds).
- **Lengths.** Prompt and output lengths are uniform integers over inclusive ranges.
- **Ranks.** Adapter i has rank `ranks[i % len(ranks)]` (S2 assigns {64, 32, 16, 8}
  round-robin).

The trace is drawn from one numpy Generator seeded with `seed`, in a fixed order (arrivals,
then adapters, prompt lengths, output lengths), so the same parameters give the same trace.
It is saved as JSON lines: a header line with every parameter, then one line per request.

    python -m benchmarks.workload --preset S2 --num-adapters 1000 --rate 2 --cv 1 --alpha 1 \
        --duration 60 --out trace.jsonl
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np


@dataclass(frozen=True)
class WorkloadParams:
    model: str = "llama-7b"
    num_adapters: int = 100
    ranks: tuple[int, ...] = (8,)
    alpha: float = 1.0
    rate: float = 2.0
    cv: float = 1.0
    duration_s: float = 60.0
    prompt_range: tuple[int, int] = (8, 512)
    output_range: tuple[int, int] = (8, 512)
    seed: int = 0
    preset: str = ""

    def rank_of(self, adapter: int) -> int:
        return self.ranks[adapter % len(self.ranks)]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> WorkloadParams:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        for key in ("ranks", "prompt_range", "output_range"):
            values[key] = tuple(values[key])
        return cls(**values)


# S-LoRA's settings (Llama-7B shapes, alpha 1, rate 2, cv 1, lengths in [8, 512]) and a
# CPU-sized one for tests and smoke runs with the `tiny` dummy model.
PRESETS: dict[str, WorkloadParams] = {
    "S1": WorkloadParams(model="llama-7b", ranks=(8,), preset="S1"),
    "S2": WorkloadParams(model="llama-7b", ranks=(64, 32, 16, 8), preset="S2"),
    "tiny": WorkloadParams(
        model="tiny",
        num_adapters=10,
        ranks=(8, 16),
        rate=10.0,
        duration_s=2.0,
        prompt_range=(4, 32),
        output_range=(4, 16),
        preset="tiny",
    ),
}


@dataclass(frozen=True)
class TraceRequest:
    index: int
    arrival_s: float
    adapter: int
    rank: int
    prompt_len: int
    output_len: int

    @property
    def adapter_id(self) -> str:
        return adapter_id(self.adapter)


def adapter_id(index: int) -> str:
    """The id adapter `index` is served under (in the store and in results)."""
    return f"bench-{index}"


@dataclass(frozen=True)
class Trace:
    params: WorkloadParams
    requests: list[TraceRequest]


def popularity(num_adapters: int, alpha: float) -> np.ndarray:
    """p_i ∝ (i + 1)^-alpha over i = 0..num_adapters-1 (see module docstring)."""
    weights = np.arange(1, num_adapters + 1, dtype=np.float64) ** -alpha
    return weights / weights.sum()


def arrival_times(
    rng: np.random.Generator, rate: float, cv: float, duration_s: float
) -> np.ndarray:
    """Arrival times in [0, duration_s) of a Gamma renewal process (mean gap 1/rate, CV cv)."""
    if rate <= 0 or duration_s <= 0:
        return np.zeros(0)
    # Draw in blocks until the running sum passes the duration; the expected count plus a
    # margin is almost always enough in one block.
    expected = int(rate * duration_s)
    times: list[np.ndarray] = []
    start = 0.0
    while start < duration_s:
        block = max(16, expected + 6 * int(np.sqrt(expected + 1)) + 16)
        if cv == 0:
            gaps = np.full(block, 1.0 / rate)
        else:
            gaps = rng.gamma(shape=1.0 / cv**2, scale=cv**2 / rate, size=block)
        sums = start + np.cumsum(gaps)
        times.append(sums)
        start = float(sums[-1])
    all_times = np.concatenate(times)
    return all_times[all_times < duration_s]


def generate(params: WorkloadParams) -> Trace:
    rng = np.random.default_rng(params.seed)
    arrivals = arrival_times(rng, params.rate, params.cv, params.duration_s)
    n = len(arrivals)
    adapters = rng.choice(
        params.num_adapters, size=n, p=popularity(params.num_adapters, params.alpha)
    )
    prompt_lo, prompt_hi = params.prompt_range
    output_lo, output_hi = params.output_range
    prompts = rng.integers(prompt_lo, prompt_hi + 1, size=n)
    outputs = rng.integers(output_lo, output_hi + 1, size=n)
    requests = [
        TraceRequest(
            i,
            float(arrivals[i]),
            int(adapters[i]),
            params.rank_of(int(adapters[i])),
            int(prompts[i]),
            int(outputs[i]),
        )
        for i in range(n)
    ]
    return Trace(params, requests)


def save(trace: Trace, path: str | Path) -> None:
    lines = [json.dumps({"type": "header", **trace.params.to_json()})]
    for r in trace.requests:
        row = {
            "arrival_s": r.arrival_s,
            "adapter": r.adapter,
            "adapter_id": r.adapter_id,
            "rank": r.rank,
            "prompt_len": r.prompt_len,
            "output_len": r.output_len,
        }
        lines.append(json.dumps(row))
    Path(path).write_text("\n".join(lines) + "\n")


def load(path: str | Path) -> Trace:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if not rows or rows[0].get("type") != "header":
        raise ValueError(f"{path}: the first line is not a trace header")
    params = WorkloadParams.from_json(rows[0])
    requests = [
        TraceRequest(
            i,
            float(r["arrival_s"]),
            int(r["adapter"]),
            int(r["rank"]),
            int(r["prompt_len"]),
            int(r["output_len"]),
        )
        for i, r in enumerate(rows[1:])
    ]
    return Trace(params, requests)


def prompt_tokens(trace: Trace, low: int = 3, high: int = 259) -> list[list[int]]:
    """Each request's prompt: `prompt_len` token ids uniform in [low, high) (byte tokens of the
    dummy tokenizer by default), seeded by the trace so every run sends the same prompts."""
    rng = np.random.default_rng([trace.params.seed, 1])
    return [rng.integers(low, high, size=r.prompt_len).tolist() for r in trace.requests]


A = TypeVar("A")  # an adapter as a warm-up names it: an id, or the adapter itself


def warm_up_prompts(adapters: list[A], prompt_lens: tuple[int, ...]) -> list[tuple[list[int], A]]:
    """The warm-ups' requests before a timed run (in-process and through the stack alike):
    each adapter with a prompt of each length, of byte tokens."""
    return [([3 + i % 256 for i in range(n)], a) for a in adapters for n in prompt_lens]


def int_pair(text: str) -> tuple[int, int]:
    lo, hi = (int(x) for x in text.split(","))
    if not 0 < lo <= hi:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 < low <= high")
    return lo, hi


def params_from_args(args: argparse.Namespace) -> WorkloadParams:
    """The preset with every option the command line gave replacing its value."""
    base = PRESETS[args.preset]
    given = {
        "num_adapters": args.num_adapters,
        "alpha": args.alpha,
        "rate": args.rate,
        "cv": args.cv,
        "duration_s": args.duration,
        "prompt_range": args.prompt_range,
        "output_range": args.output_range,
        "seed": args.seed,
    }
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.workload",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="S1")
    parser.add_argument("--num-adapters", type=int)
    parser.add_argument("--alpha", type=float, help="power-law exponent of popularity")
    parser.add_argument("--rate", type=float, help="mean arrival rate, requests/s")
    parser.add_argument("--cv", type=float, help="coefficient of variation of inter-arrivals")
    parser.add_argument("--duration", type=float, help="seconds of arrivals")
    parser.add_argument("--prompt-range", type=int_pair, help="LOW,HIGH prompt tokens")
    parser.add_argument("--output-range", type=int_pair, help="LOW,HIGH output tokens")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--out", required=True, help="JSON-lines file to write")
    args = parser.parse_args(argv)
    trace = generate(params_from_args(args))
    save(trace, args.out)
    used = len({r.adapter for r in trace.requests})
    print(
        f"{len(trace.requests)} requests over {trace.params.duration_s:g} s for {used} of "
        f"{trace.params.num_adapters} adapters -> {args.out}"
    )


if __name__ == "__main__":
    main()
