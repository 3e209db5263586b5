"""The serving benchmark's command line: what to sweep, how to serve it, where results go."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable, Sequence
from typing import TypeVar

from benchmarks import workload
from benchmarks.serving.engine_setup import EngineVariant
from benchmarks.serving.inprocess import SAMPLINGS
from benchmarks.serving.runs import RunOptions
from benchmarks.synthetic_adapters import parse_targets
from services.common.config import flag_name
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.setup import resolve_device

ENGINE_VARIANTS = {
    "manylora": EngineVariant(),
    "no-unified-pool": EngineVariant(unified_pool=False),
    "bmm": EngineVariant(lora_backend="bmm"),
}
MODES = ("inprocess", "grpc")
# The worker's engine settings a run may change, with the worker's defaults and help.
ENGINE_SETTINGS = (
    "max_num_seqs",
    "max_prefill_tokens",
    "admission_batch",
    "max_loras",
    "pool_slots",
    "gpu_memory_fraction",
    "adapter_region_fraction",
)
T = TypeVar("T")


def _list_of(kind: Callable[[str], T]) -> Callable[[str], list[T]]:
    return lambda text: [kind(x) for x in text.split(",") if x]


def _targets(text: str) -> tuple[str, ...]:
    try:
        return parse_targets(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _workload_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload (lists are swept: one trace per combination)")
    g.add_argument("--preset", choices=sorted(workload.PRESETS), default="S1")
    g.add_argument("--model", help="dummy model preset (default: the workload preset's)")
    g.add_argument("--trace", help="a saved trace (JSON lines) instead of generated ones")
    g.add_argument("--num-adapters", type=_list_of(int), help="list, e.g. 5,100,1000,2000")
    g.add_argument("--rate", type=_list_of(float), help="requests/s, list")
    g.add_argument("--alpha", type=_list_of(float), help="popularity exponent, list")
    g.add_argument("--cv", type=_list_of(float), help="arrival coefficient of variation, list")
    g.add_argument("--duration", type=float, help="seconds of arrivals per trace")
    g.add_argument("--prompt-range", type=workload.int_pair, help="LOW,HIGH")
    g.add_argument("--output-range", type=workload.int_pair, help="LOW,HIGH")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument(
        "--target-modules",
        type=_targets,
        default=parse_targets("attention"),
        help="what every adapter targets: attention (q/k/v/o), all-linear (and gate/up/down), "
        "or a comma list of projection names",
    )


def _serving_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what serves the trace")
    g.add_argument("--mode", type=_list_of(str), default=["inprocess"], help="inprocess,grpc")
    g.add_argument(
        "--variant",
        type=_list_of(str),
        default=["manylora"],
        help="manylora,no-unified-pool,bmm,hf-peft",
    )
    g.add_argument("--no-unified-pool", action="store_true", help="every engine variant split")
    g.add_argument("--lora-backend", choices=("kernels", "bmm"), help="every engine variant's")
    g.add_argument("--target", help="host:port of a running router to drive (mode grpc-remote)")
    g.add_argument("--store-target", help="with --target: upload the adapters to this store")
    g.add_argument(
        "--worker-stats",
        help="with --target: host:port of a worker whose GetStats counts its engine's steps "
        "over each run (reported as the in-process runs report theirs)",
    )
    g.add_argument("--device", default="auto", help="cuda, cpu or auto")
    g.add_argument(
        "--max-upload-gb",
        type=float,
        default=20.0,
        help="refuse gRPC runs whose adapter files would be larger",
    )
    g.add_argument(
        "--distinct-weights",
        type=int,
        default=8,
        help="random weight sets per rank that adapters share",
    )
    g.add_argument("--peft-batch", type=int, default=8, help="HF PEFT's static batch size")


def _engine_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine settings (as the worker's flags)")
    fields = {f.name: f for f in dataclasses.fields(EngineConfig)}
    for name in ENGINE_SETTINGS:
        default = fields[name].default
        help_text = f"{fields[name].metadata['help']} (default: {default})".replace("%", "%%")
        g.add_argument(flag_name(name), type=type(default), default=default, help=help_text)
    g.add_argument("--max-rank", type=int, default=0, help="0: the trace's largest rank")
    g.add_argument("--no-cuda-graphs", action="store_true")
    g.add_argument("--no-prefill-graphs", action="store_true", help="prompt-only steps run eagerly")
    g.add_argument(
        "--no-async-output",
        action="store_true",
        help="build each step's outputs before the next step starts, not while it runs",
    )
    g.add_argument(
        "--sampling",
        choices=list(SAMPLINGS),
        default="greedy",
        help="how every request samples (in-process runs; seeded by its index): greedy, issue "
        "#14's mix, or top-p without top-k as OpenAI-style clients send it",
    )
    g.add_argument(
        "--sampled",
        dest="sampling",
        action="store_const",
        const="T 0.8, p 0.9, k 50",
        help="the same as --sampling 'T 0.8, p 0.9, k 50'",
    )
    g.add_argument(
        "--whole-sort",
        action="store_true",
        help="experiment: top-p rows without top-k sort their whole row at once, with no "
        "read-back inside the step (in-process runs)",
    )


def _run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("runs and results")
    g.add_argument("--slo", type=float, default=6.0, help="time-to-first-token bound, seconds")
    g.add_argument("--timeout", type=float, help="cut each run off after this many seconds")
    g.add_argument("--out", required=True, help="JSON-lines file the results are appended to")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument(
        "--warm-adapters",
        action="store_true",
        help="through a stack: one untimed request on each of the trace's adapters first, so "
        "the worker holds them in host memory, as the in-process engine does from its start "
        "(such runs are labelled 'adapters warm')",
    )


def parse_args(argv: Sequence[str] | None, description: str = "") -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serving_bench",
        description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    for add in (_workload_args, _serving_args, _engine_args, _run_args):
        add(p)
    args = p.parse_args(argv)
    for mode in args.mode:
        if mode not in MODES:
            p.error(f"--mode {mode!r}: not one of {', '.join(MODES)}")
    for name in args.variant:
        if name not in (*ENGINE_VARIANTS, "hf-peft"):
            p.error(f"--variant {name!r}: not one of {', '.join(ENGINE_VARIANTS)}, hf-peft")
    return args


def engine_variants(args: argparse.Namespace) -> list[EngineVariant]:
    """The engine variants asked for, with --no-unified-pool and --lora-backend applied."""
    chosen: list[EngineVariant] = []
    for name in args.variant:
        if name in ENGINE_VARIANTS:
            v = ENGINE_VARIANTS[name]
            if args.no_unified_pool:
                v = dataclasses.replace(v, unified_pool=False)
            if args.lora_backend:
                v = dataclasses.replace(v, lora_backend=args.lora_backend)
            if v not in chosen:
                chosen.append(v)
    return chosen


def run_options(args: argparse.Namespace) -> RunOptions:
    given = {name: getattr(args, name) for name in ENGINE_SETTINGS}
    settings = EngineConfig(
        device=args.device,
        cuda_graphs=not args.no_cuda_graphs,
        prefill_graphs=not args.no_prefill_graphs,
        async_output=not args.no_async_output,
        **given,
    )
    device, _ = resolve_device(settings)
    return RunOptions(
        device,
        settings,
        args.slo,
        args.timeout,
        not args.no_progress,
        args.distinct_weights,
        args.peft_batch,
        args.target_modules,
        max_rank=args.max_rank,
        sampling=args.sampling,
        whole_sort=args.whole_sort,
        warm_adapters=args.warm_adapters,
    )
