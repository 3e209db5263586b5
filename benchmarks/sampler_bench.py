"""The batched sampler against the per-row one it replaced (`benchmarks/baselines/
per_row_sampler.py`): milliseconds per call over a batch of float32 logits, as the engine
calls it once a step (the call ends with the host reading the tokens back).

Mixes: every row sampled as in issue #14's run (temperature 0.8, top-p 0.9, top-k 50,
seeded); half of them greedy; top-p 0.9 without top-k; temperature 1 without filters; all
greedy (what the sampled mixes are held against). Logits are bf16 values in float32, as the
model's lm_head gives them. On CUDA it also counts the kernels one call of the new sampler
launches, which must not grow with the batch.

    python -m benchmarks.sampler_bench [--device cuda|cpu] [--batches 32,128,256]
        [--vocab 32000] [--iters 50] [--out DIR] [--threads N]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.baselines import per_row_sampler
from services.gpu_worker.engine.sampling import SamplingOptions, request_seed, sample

ISSUE = SamplingOptions(max_new_tokens=1, temperature=0.8, top_p=0.9, top_k=50)
GREEDY = SamplingOptions(max_new_tokens=1)
MIXES: dict[str, Callable[[int], SamplingOptions]] = {
    "all sampled (T 0.8, p 0.9, k 50)": lambda row: ISSUE,
    "half greedy": lambda row: ISSUE if row % 2 else GREEDY,
    "top-p 0.9 only": lambda row: SamplingOptions(max_new_tokens=1, temperature=1.0, top_p=0.9),
    "temperature 1 only": lambda row: SamplingOptions(max_new_tokens=1, temperature=1.0),
    "all greedy": lambda row: GREEDY,
}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fn: Callable[[int], object], device: torch.device, iters: int) -> float:
    """Median wall time of fn(step) over iters calls after a warm-up (each call ends with a
    device-to-host read, so it is complete when it returns)."""
    for step in range(3):
        fn(step)
    times = []
    for step in range(iters):
        _sync(device)
        start = time.perf_counter()
        fn(step)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def _kernels_per_call(fn: Callable[[], object], device: torch.device) -> int | None:
    """Kernels (and copies) one call launches on the device; None off CUDA or if the
    profiler cannot say."""
    if device.type != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            _sync(device)
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    except Exception:  # a count is a nicety; the timings are the benchmark
        return None


def _samplers(
    logits: torch.Tensor, options: list[SamplingOptions], device: torch.device
) -> tuple[Callable[[int], object], Callable[[int], object]]:
    """The new and the old sampler over these rows, as the engine calls them at step n:
    the new one with each request's seed and token index n, the old one with each
    request's generator, made once and advanced by every call."""
    seeds = [request_seed(o) for o in options]
    generators = [per_row_sampler.make_generator(o, device) for o in options]

    def new(step: int) -> object:
        return sample(logits, options, seeds, [step] * len(options))

    def old(step: int) -> object:
        return per_row_sampler.sample(logits, options, generators)

    return new, old


def run(device: torch.device, batches: list[int], vocab: int, iters: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    gen = torch.Generator().manual_seed(0)
    for batch in batches:
        logits = (torch.randn(batch, vocab, generator=gen) * 2.5).bfloat16().float().to(device)
        for mix, pick in MIXES.items():
            options = [
                SamplingOptions(
                    max_new_tokens=1,
                    temperature=o.temperature,
                    top_p=o.top_p,
                    top_k=o.top_k,
                    seed=1000 + row,
                )
                for row, o in enumerate(pick(row) for row in range(batch))
            ]
            new, old = _samplers(logits, options, device)
            new_ms = _median_ms(new, device, iters)
            old_ms = _median_ms(old, device, max(3, iters // 5))
            rows.append(
                {
                    "mix": mix,
                    "batch": batch,
                    "vocab": vocab,
                    "old_ms": round(old_ms, 4),
                    "new_ms": round(new_ms, 4),
                    "speedup": round(old_ms / new_ms, 2),
                    "new_kernels": _kernels_per_call(functools.partial(new, 0), device),
                }
            )
            print(_line(rows[-1]), flush=True)
    return rows


def _line(row: dict[str, Any]) -> str:
    kernels = "-" if row["new_kernels"] is None else str(row["new_kernels"])
    return (
        f"| {row['mix']} | {row['batch']} | {row['old_ms']:.3f} | {row['new_ms']:.3f} | "
        f"{row['speedup']:.1f}x | {kernels} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--batches", default="32,128,256", help="comma-separated batch sizes")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--iters", type=int, default=50, help="timed calls of the new sampler")
    parser.add_argument("--out", default=None, help="folder for sampler_bench.json")
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: torch's default)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    batches = [int(b) for b in args.batches.split(",")]
    print("| mix | batch | per-row ms | batched ms | speedup | kernels/call |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = run(device, batches, args.vocab, args.iters)
    if args.out:
        result = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "torch": torch.__version__,
            "command": "python -m benchmarks.sampler_bench "
            f"--device {args.device} --batches {args.batches} --vocab {args.vocab} "
            f"--iters {args.iters}",
            "rows": rows,
        }
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "sampler_bench.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
