"""A model of the GPU worker's two threads on the CPU (issue #20): how much the event loop's
work on streamed tokens stretches the engine's steps, for several GIL switch intervals.

The worker runs the engine on its own thread and gRPC on an asyncio loop, in one process: the
two share the GIL. With overlap scheduling the engine thread launches a step, then waits for
the previous step's tokens without the GIL (a CUDA event), then does its host work with it;
the device idles only when that host work, plus every wait for the GIL, outlasts a step. When
the engine thread wants the GIL back while the loop thread runs Python, CPython lets it wait
up to the switch interval (`sys.setswitchinterval`, 5 ms by default) before the loop thread
must yield: at steps of 10-20 ms that alone could cost a third of the device.

Here the device is a clock (a step is done `--gpu-ms` after it starts, steps back to back;
`--no-overlap` launches a step only once the previous one's tokens are back),
the engine thread's host work is Python for `--host-ms` a step, and each step's outputs (one
per running request) go through the worker's own `OutputRelay` to one asyncio consumer per
request, which builds its message (`servicer.to_proto`) and serializes it. gRPC's own send is
not modelled: `--loop-us` adds that much Python per message, to find where the loop's share
starts to cost the device. Reported: the device's busy
share (1.0: the engine thread never made it wait) per switch interval, the intervals run
alternately in one process.

    python -m benchmarks.gil_handoff_bench [--gpu-ms 15] [--host-ms 3] [--batch 150]
        [--steps 200] [--intervals-ms 5,1,0.5,0.1] [--rounds 2] [--loop-us 0]
        [--no-overlap] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

from services.gpu_worker.engine.sequence import StepOutput
from services.gpu_worker.serving.output_relay import OutputRelay
from services.gpu_worker.serving.servicer import to_proto


def _python_work(seconds: float) -> None:
    """`seconds` of this thread's CPU time in Python, holding the GIL as Python code does
    (yielding when another thread asks; time spent waiting for the GIL does not count)."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


class Device:
    """Steps run back to back, each `gpu_s` long; `launch` returns when one will be done."""

    def __init__(self, gpu_s: float) -> None:
        self.gpu_s = gpu_s
        self.busy_until = 0.0

    def launch(self) -> float:
        start = max(time.perf_counter(), self.busy_until)
        self.busy_until = start + self.gpu_s
        return self.busy_until


def _engine(
    device: Device,
    relay: OutputRelay,
    queues: list[asyncio.Queue[StepOutput]],
    host_s: float,
    steps: int,
    overlap: bool,
) -> float:
    """The engine thread: launch step n+1 (before waiting for step n, with `overlap`), wait
    for step n without the GIL, take its tokens and hand one output a request to the loop.
    Returns the run's seconds."""
    start = time.perf_counter()
    pending = device.launch()
    for n in range(steps):
        if not overlap:
            time.sleep(max(0.0, pending - time.perf_counter()))
        _python_work(host_s / 2)  # schedule, build and launch the next step
        following = device.launch()
        time.sleep(max(0.0, pending - time.perf_counter()))  # the event wait, GIL released
        _python_work(host_s / 2)  # take the tokens, detokenize
        for i, queue in enumerate(queues):
            relay.deliver(queue, StepOutput(f"r{i}", [1000 + n], f"t{n}", [], None))
        pending = following
    time.sleep(max(0.0, pending - time.perf_counter()))
    return time.perf_counter() - start


async def _consume(queue: asyncio.Queue[StepOutput], steps: int, extra_s: float) -> int:
    """One stream's handler: each output becomes a serialized message, plus `extra_s` of
    Python (what gRPC's send and the rest of the real handler would add)."""
    size = 0
    for _ in range(steps):
        out = await queue.get()
        size += len(to_proto(out).SerializeToString())
        _python_work(extra_s)
    return size


def run_once(
    gpu_s: float,
    host_s: float,
    batch: int,
    steps: int,
    interval_s: float,
    extra_s: float,
    overlap: bool = True,
) -> float:
    """The device's busy share over one run at one switch interval."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(interval_s)
    loop = asyncio.new_event_loop()
    result: dict[str, float] = {}

    async def serve() -> None:
        queues: list[asyncio.Queue[StepOutput]] = [asyncio.Queue() for _ in range(batch)]
        relay = OutputRelay(loop)

        def engine_thread() -> None:
            result["seconds"] = _engine(Device(gpu_s), relay, queues, host_s, steps, overlap)

        thread = threading.Thread(target=engine_thread)
        thread.start()
        await asyncio.gather(*(_consume(q, steps, extra_s) for q in queues))
        await asyncio.to_thread(thread.join)

    try:
        loop.run_until_complete(serve())
    finally:
        loop.close()
        sys.setswitchinterval(previous)
    return (steps + 1) * gpu_s / result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gil_handoff_bench")
    parser.add_argument("--gpu-ms", type=float, default=15.0)
    parser.add_argument("--host-ms", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=150, help="running requests")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--intervals-ms", default="5,1,0.5,0.1")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument(
        "--loop-us", type=float, default=0.0, help="more Python per message on the loop"
    )
    parser.add_argument(
        "--no-overlap",
        action="store_true",
        help="launch each step only after the previous one's tokens are back",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    intervals = [float(v) for v in args.intervals_ms.split(",")]
    shares: dict[float, list[float]] = {v: [] for v in intervals}
    for _ in range(args.rounds):
        for interval in intervals:
            share = run_once(
                args.gpu_ms / 1e3,
                args.host_ms / 1e3,
                args.batch,
                args.steps,
                interval / 1e3,
                args.loop_us / 1e6,
                not args.no_overlap,
            )
            shares[interval].append(share)
            print(f"switch interval {interval:>5} ms: device busy {share:.3f}", flush=True)
    rows: list[dict[str, Any]] = [
        {
            "switch_interval_ms": v,
            "device_busy_median": statistics.median(s),
            "runs": s,
            "gpu_ms": args.gpu_ms,
            "host_ms": args.host_ms,
            "batch": args.batch,
            "steps": args.steps,
            "loop_us": args.loop_us,
            "overlap": not args.no_overlap,
        }
        for v, s in shares.items()
    ]
    print("switch interval ms | device busy (median)")
    for row in rows:
        print(f"{row['switch_interval_ms']:>18} | {row['device_busy_median']:.3f}")
    if args.out is not None:
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
