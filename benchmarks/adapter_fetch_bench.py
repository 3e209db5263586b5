"""A cold worker's adapter downloads (issue #20): how long a burst of first requests waits
for its adapters to come from the store, and how long the worker's event loop, which streams
every other request's tokens, is held up meanwhile. Runs on the CPU.

The store runs as its own process, as deployed; the worker's side (`StoreAdapterSource`,
converting to bf16 as the GPU worker does) runs here, beside a ticker that measures how late
the event loop runs a task that asks for it every millisecond.

    python -m benchmarks.adapter_fetch_bench --model llama-7b --num-adapters 20 \
        --concurrency 64,2,1 --store-dtype as-uploaded,bfloat16 --out r.jsonl
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.serving.grpc_stack import upload_adapters
from benchmarks.stack_processes import spawn, stop_processes, wait_healthy
from services.common.grpc_server import free_port
from services.gpu_worker.adapters.host_adapter_cache import adapter_nbytes
from services.gpu_worker.adapters.store_adapter_source import StoreAdapterSource

TICK_S = 0.001


class LoopLag:
    """How late the event loop wakes a task that sleeps `TICK_S` at a time."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        while True:
            asked = time.perf_counter()
            await asyncio.sleep(TICK_S)
            self.lags.append(time.perf_counter() - asked - TICK_S)

    def __enter__(self) -> LoopLag:
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()

    def summary(self) -> dict[str, float]:
        lags = sorted(self.lags) or [0.0]
        return {
            "loop_lag_p99_ms": lags[int(0.99 * (len(lags) - 1))] * 1000,
            "loop_lag_max_ms": lags[-1] * 1000,
            "loop_stalled_s": sum(lag for lag in lags if lag > 0.005),
        }


async def fetch_all(
    store: str, ids: list[str], dtype: torch.dtype | None, concurrency: int
) -> dict[str, Any]:
    """Every adapter in `ids` asked for at once by a worker that holds none of them and
    downloads `concurrency` at a time."""
    source = StoreAdapterSource(
        store, cache_max_bytes=1 << 40, dtype=dtype, max_concurrent_fetches=concurrency
    )
    done: list[float] = []
    start = time.perf_counter()

    async def one(adapter_id: str) -> int:
        adapter = await source.get(adapter_id)
        done.append(time.perf_counter() - start)
        return adapter_nbytes(adapter)

    try:
        with LoopLag() as lag:
            sizes = await asyncio.gather(*(one(i) for i in ids))
        seconds = time.perf_counter() - start
    finally:
        await source.close()
    return {
        "seconds": seconds,
        "first_s": min(done),
        "median_s": statistics.median(done),
        "held_mb": sum(sizes) / 1e6,
        **lag.summary(),
    }


def start_store(model: str, folder: Path, port: int, dtype: str) -> subprocess.Popen[bytes]:
    return spawn(
        "services.adapter_store",
        *("--port", str(port), "--data-dir", str(folder), "--base-model", model),
        *("--store-dtype", dtype),
    )


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="manylora-fetch-") as tmp:
        stores = {}
        try:
            for dtype in args.store_dtype:  # one store process each, side by side
                port = free_port()
                stores[dtype] = (
                    f"127.0.0.1:{port}",
                    start_store(args.model, Path(tmp) / dtype, port, dtype),
                )
            for target, _ in stores.values():
                await asyncio.to_thread(wait_healthy, target, "manylora.v1.AdapterStore")
            for repeat in range(args.repeats):  # fresh ids each run: nothing cached anywhere
                for dtype, (target, _) in stores.items():
                    for concurrency in args.concurrency:
                        rows.append(
                            await _one_run(args, target, dtype, concurrency, repeat, Path(tmp))
                        )
        finally:
            stop_processes([process for _, process in stores.values()])
    return rows


async def _one_run(
    args: argparse.Namespace, target: str, dtype: str, concurrency: int, repeat: int, tmp: Path
) -> dict[str, Any]:
    ids = [f"fetch-{repeat}-{concurrency}-{i}" for i in range(args.num_adapters)]
    peft = tmp / f"peft-{dtype}-{repeat}-{concurrency}"
    await upload_adapters(target, args.model, [(i, args.rank) for i in ids], peft, 4, False)
    row = {
        "model": args.model,
        "rank": args.rank,
        "adapters": len(ids),
        "store_dtype": dtype,
        "concurrency": concurrency,
        **await fetch_all(target, ids, torch.bfloat16, concurrency),
    }
    print(_line(row), flush=True)
    if args.out:  # row by row: a run cut off keeps what it measured
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
    return row


def _line(r: dict[str, Any]) -> str:
    return (
        f"{r['adapters']} adapters of {r['model']} rank {r['rank']} stored "
        f"{r['store_dtype']}, {r['concurrency']} at a time: all in {r['seconds']:.2f} s "
        f"(first {r['first_s']:.2f} s, median {r['median_s']:.2f} s), "
        f"{r['held_mb'] / r['seconds']:.0f} MB/s held (bf16); event loop lag p99 "
        f"{r['loop_lag_p99_ms']:.1f} ms, max {r['loop_lag_max_ms']:.1f} ms, stalled "
        f"{r['loop_stalled_s']:.2f} s"
    )


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.adapter_fetch_bench", description=__doc__
    )
    p.add_argument("--model", default="llama-7b", help="dummy preset the adapters are shaped for")
    p.add_argument("--num-adapters", type=int, default=20)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--store-dtype",
        type=lambda text: text.split(","),
        default=["as-uploaded"],
        help="comma-separated store --store-dtype values to compare, a store process each; "
        "uploads are fp32",
    )
    p.add_argument(
        "--concurrency",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[64, 2],
        help="comma-separated downloads at a time to compare, each run in turn (64: about "
        "all at once, as before the bound)",
    )
    p.add_argument("--out", help="JSON-lines file the results are appended to")
    return asyncio.run(run(p.parse_args(argv)))


if __name__ == "__main__":
    main()
