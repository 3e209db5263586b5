"""Host time of the LoRA kernels' Python wrappers: what an eager pass (a mixed step's prompt
chunks) pays on the CPU for each `lora_apply` before Triton's own launcher, four calls a
layer. `lora_apply` runs for prompt chunks (the tiled kernels) and for a decode batch (the
row kernels) on CPU tensors, with every Triton launch stubbed out and the split sum (a
device launch on a GPU) replaced by a view. No GPU needed.

    python -m benchmarks.kernel_host_bench [--baseline DIR] [--calls N] [--repeats N] [--out F]

`--baseline DIR`: the wrappers of another checkout's kernels beside these (a `git archive`
of an older commit), imported as `lora_tune --baseline` does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import kernels.lora
from benchmarks.lora_tune import load_baseline

_KERNELS = ("_shrink_kernel", "_expand_kernel", "_row_shrink_kernel", "_row_expand_kernel")


class _NoLaunch:
    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def _stubbed(lora: Any) -> Iterator[None]:
    """`lora`'s module and its row kernels' module with no launches and no split sum."""
    modules = [lora.__dict__, lora.lora_apply_rows.__globals__]
    saved = [(g, name, g[name]) for g in modules for name in _KERNELS if name in g]
    real_sum = torch.Tensor.sum
    try:
        for g, name, _ in saved:
            g[name] = _NoLaunch()
        torch.Tensor.sum = lambda self, *a, **k: self[0]  # type: ignore[method-assign]
        yield
    finally:
        torch.Tensor.sum = real_sum  # type: ignore[method-assign]
        for g, name, value in saved:
            g[name] = value


def _cases() -> dict[str, tuple[tuple[Any, ...], dict[str, Any]]]:
    """(args, kwargs) of lora_apply: q|k|v of Llama-7B (W 4096), rank bound 64."""
    i32 = torch.int32
    x, out = torch.zeros(8, 4096), torch.zeros(8, 3 * 4096)
    pool = torch.zeros(16, 4096)
    slots, meta = torch.zeros(8, 64, dtype=i32), torch.zeros(8, 7, 3, dtype=i32)
    req, q_starts, q_lens = (
        torch.zeros(4, dtype=i32),
        torch.arange(4, dtype=i32),
        torch.ones(4, dtype=i32),
    )
    args = (x, out, pool, slots, meta, req, q_starts, q_lens, (0, 1, 2), (4096,) * 3, 64)
    tiles = torch.zeros(6, 2, dtype=i32)
    return {
        "prompt chunks (tiled)": (args, {"max_q_len": 270, "tiles": tiles}),
        "decode batch (rows)": (args, {"max_q_len": 1}),
    }


def time_calls(lora: Any, calls: int, repeats: int) -> dict[str, float]:
    """{case: µs a call, the median of `repeats` runs of `calls` calls}."""
    result = {}
    with _stubbed(lora):
        for name, (args, kwargs) in _cases().items():
            runs = []
            for _ in range(repeats):
                start = time.perf_counter()
                for _ in range(calls):
                    lora.lora_apply(*args, **kwargs)
                runs.append((time.perf_counter() - start) / calls * 1e6)
            result[name] = statistics.median(runs)
    return result


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_host_bench")
    parser.add_argument("--baseline", type=Path, help="a checkout whose wrappers to time beside")
    parser.add_argument("--calls", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, help="write the rows here as JSON")
    args = parser.parse_args(argv)
    trees = {"this tree": kernels.lora}
    if args.baseline is not None:
        trees["baseline"] = load_baseline(args.baseline)
    rows = []
    for _ in range(2):  # the trees alternate: A B A B, the second round reported
        rows = [
            {"tree": tree, "case": case, "us_per_call": us}
            for tree, lora in trees.items()
            for case, us in time_calls(lora, args.calls, args.repeats).items()
        ]
    if args.out is not None:
        args.out.write_text(json.dumps(rows, indent=1))
    for row in rows:
        print(f"{row['tree']:<10} {row['case']:<22} {row['us_per_call']:7.1f} µs a call")
    return rows


if __name__ == "__main__":
    main()
