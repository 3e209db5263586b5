"""One benchmark run per function: a trace served one way, summarized as one result dict."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from benchmarks.serving import grpc_replay, grpc_stack, hf_peft, inprocess
from benchmarks.serving.engine_setup import (
    EngineVariant,
    build_engine,
    build_model,
    free_device_memory,
)
from benchmarks.serving.metrics import PoolTimeline, RequestRecord, StepLog, summarize
from benchmarks.serving.worker_steps import poll_worker, steps_between, worker_stats
from benchmarks.synthetic_adapters import AdapterBank, targets_label
from benchmarks.workload import Trace, TraceRequest
from kernels.compile_watch import Compiles, compile_watch
from services.common.base_model import TARGET_MODULES
from services.common.lora_format import CanonicalAdapter
from services.common.tasks import cancel_task
from services.gpu_worker.engine.config import EngineConfig
from services.gpu_worker.engine.setup import auto_dtype
from services.gpu_worker.model.model import LlamaForCausalLM
from services.gpu_worker.serving.server import Worker


@dataclass
class RunOptions:
    device: torch.device
    settings: EngineConfig = field(default_factory=EngineConfig)
    slo_s: float = 6.0
    timeout_s: float | None = None
    progress: bool = True
    distinct_weights: int = 8
    peft_batch: int = 8
    targets: tuple[str, ...] = TARGET_MODULES  # the projections every adapter targets
    max_rank: int = 0  # the engine's; 0: each trace's largest
    sampling: str = "greedy"  # how every request samples: a name of inprocess.SAMPLINGS
    # The top-p experiment: sort whole rows for top-p without top-k at once, instead of asking
    # the device inside the step whether the 1,024 best tokens hold the nucleus.
    whole_sort: bool = False
    # Through a stack: the trace's adapters fetched by its worker before the timed run.
    warm_adapters: bool = False


def settings_for(options: RunOptions, trace: Trace) -> EngineConfig:
    """The engine's max rank is the trace's largest unless given: the bmm baseline pads to it
    inside CUDA graphs, so a larger one would tax it for ranks nobody uses."""
    max_rank = options.max_rank or max(trace.params.ranks)
    return dataclasses.replace(options.settings, max_rank=max_rank)


def describe(mode: str, variant: str, trace: Trace, options: RunOptions) -> dict[str, Any]:
    p = trace.params
    return {
        "date": time.strftime("%F %T"),
        "device": device_name(options.device),
        "mode": mode,
        "variant": variant,
        "preset": p.preset,
        "model": p.model,
        "num_adapters": p.num_adapters,
        "ranks": list(p.ranks),
        "alpha": p.alpha,
        "rate": p.rate,
        "cv": p.cv,
        "trace_duration_s": p.duration_s,
        "prompt_range": list(p.prompt_range),
        "output_range": list(p.output_range),
        "seed": p.seed,
        "max_num_seqs": options.settings.max_num_seqs,  # 0: auto (the worker sizes it)
        "max_prefill_tokens": options.settings.max_prefill_tokens,
        "async_output": options.settings.async_output,
        "prefill_graphs": options.settings.prefill_graphs,
        "target_modules": targets_label(options.targets),
        "sampling": options.sampling + (", whole-row sort" if options.whole_sort else ""),
    }


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def result(
    info: dict[str, Any],
    records: list[RequestRecord],
    duration: float,
    options: RunOptions,
    hits: int | None = None,
    misses: int | None = None,
    pool: PoolTimeline | None = None,
    steps: StepLog | None = None,
    compiles: Compiles | None = None,
) -> dict[str, Any]:
    summary = summarize(records, duration, options.slo_s, hits, misses)
    return {
        **info,
        **summary,
        "pool": pool.summary() if pool else {},
        "steps": steps.summary() if steps else {},
        **({"kernel_compiles": asdict(compiles)} if compiles else {}),
    }


class InProcess:
    """In-process runs; keeps the model and the adapters between runs of one process."""

    def __init__(self, options: RunOptions):
        self.options = options
        self._models: dict[str, LlamaForCausalLM] = {}
        self._banks: dict[tuple[str, tuple[int, ...]], AdapterBank] = {}

    def model(self, preset: str) -> LlamaForCausalLM:
        if preset not in self._models:
            self._models.clear()
            free_device_memory()
            self._models[preset] = build_model(preset, self.options.device)
        return self._models[preset]

    def adapters(self, trace: Trace) -> AdapterBank:
        p = trace.params
        key = (p.model, p.ranks)
        if key not in self._banks:
            self._banks.clear()
            model = self.model(p.model)
            self._banks[key] = AdapterBank(
                model.config.shape,
                p.rank_of,
                auto_dtype(self.options.device),
                self.options.device,
                self.options.distinct_weights,
                targets=self.options.targets,
            )
        return self._banks[key]

    def run(self, trace: Trace, variant: EngineVariant) -> dict[str, Any]:
        bank = self.adapters(trace)

        def adapter_for(req: TraceRequest) -> CanonicalAdapter:
            return bank.adapter(req.adapter, req.adapter_id)

        engine = build_engine(
            self.model(trace.params.model), variant, settings_for(self.options, trace)
        )
        p = trace.params
        # Adapters past the trace's indices: one of each rank, never requested by the trace.
        extra = [bank.adapter(p.num_adapters + k, f"warmup-{k}") for k in range(len(p.ranks))]
        steps = StepLog()
        max_num_seqs = engine.config.max_num_seqs  # resolved when the setting is 0 (auto)
        try:
            inprocess.warm_up(engine, extra, p.prompt_range)
            hits0, misses0 = engine.adapters.hits, engine.adapters.misses  # the warm-up's
            compiled = compile_watch().total
            with inprocess.whole_row_sort(self.options.whole_sort):
                records, duration, pool = inprocess.replay(
                    engine,
                    trace,
                    adapter_for,
                    self.options.timeout_s,
                    self.options.progress,
                    steps,
                    sampling=self.options.sampling,
                )
            hits, misses = engine.adapters.hits - hits0, engine.adapters.misses - misses0
            compiles = compile_watch().total - compiled
        finally:
            del engine
            free_device_memory()
        info = {
            **describe("inprocess", variant.label, trace, self.options),
            "max_num_seqs": max_num_seqs,
        }
        return result(info, records, duration, self.options, hits, misses, pool, steps, compiles)

    def release(self) -> None:
        self._models.clear()
        self._banks.clear()
        free_device_memory()


def run_hf_peft(trace: Trace, options: RunOptions) -> dict[str, Any]:
    """HF PEFT with every adapter the trace uses loaded (static batching, see hf_peft)."""
    ranks = {r.adapter: r.rank for r in trace.requests}
    model = hf_peft.build_peft_model(trace.params.model, ranks, options.device, options.targets)
    try:
        hf_peft.warm_up(model, sorted(ranks)[:2])
        records, duration = hf_peft.replay(
            model, trace, options.peft_batch, options.timeout_s, options.progress
        )
    finally:
        del model
        free_device_memory()
    return result(describe("inprocess", "hf-peft", trace, options), records, duration, options)


async def run_grpc(
    trace: Trace, variant: EngineVariant, store_target: str, options: RunOptions
) -> dict[str, Any]:
    """A fresh worker and router on the store; the trace through the router."""
    settings = dataclasses.replace(settings_for(options, trace), device=options.device.type)
    model = trace.params.model
    async with grpc_stack.worker_and_router(store_target, model, variant, settings) as stack:
        warmup = [name for name, _ in grpc_stack.warmup_adapters(trace.params)]
        await grpc_replay.warm_up(stack.router_target, warmup, trace.params.prompt_range)
        if options.warm_adapters:
            await grpc_replay.fetch_adapters(stack.router_target, trace)
        engine = stack.worker.engine
        start = engine.stats  # the warm-up's counts, left out
        pool = PoolTimeline()
        probe = _pool_probe(stack.worker, pool)
        records, duration = await grpc_replay.replay(
            stack.router_target, trace, options.timeout_s, options.progress, probe
        )
        end = engine.stats
        hits = end.adapter_cache_hits - start.adapter_cache_hits
        misses = end.adapter_cache_misses - start.adapter_cache_misses
    free_device_memory()
    info = describe("grpc", _stack_label(variant.label, options), trace, options)
    return result(info, records, duration, options, hits, misses, pool)


def _stack_label(variant: str, options: RunOptions) -> str:
    return f"{variant}, adapters warm" if options.warm_adapters else variant


def _pool_probe(worker: Worker, pool: PoolTimeline) -> Any:
    # The engine's last snapshot: a sample may be a step stale, which a timeline does not mind.
    def probe(now: float) -> None:
        stats = worker.engine.stats
        pool.add(now, stats.pool, stats.running_requests, stats.waiting_requests)

    return probe


async def run_remote(
    trace: Trace,
    target: str,
    options: RunOptions,
    warm_up: bool = False,
    worker: str | None = None,
) -> dict[str, Any]:
    """The trace through an already-running router; `warm_up` when its store holds the
    warm-up adapters (uploaded by this benchmark); `worker` (host:port): a worker whose
    GetStats counts its engine's steps over the run."""
    if warm_up:
        warmup = [name for name, _ in grpc_stack.warmup_adapters(trace.params)]
        await grpc_replay.warm_up(target, warmup, trace.params.prompt_range)
    if options.warm_adapters:
        await grpc_replay.fetch_adapters(target, trace)
    start = await worker_stats(worker) if worker else None
    pool = PoolTimeline()
    polling = asyncio.create_task(poll_worker(worker, pool)) if worker else None
    try:
        records, duration = await grpc_replay.replay(
            target, trace, options.timeout_s, options.progress
        )
    finally:
        if polling is not None:
            await cancel_task(polling)
    info = describe("grpc-remote", _stack_label("remote", options), trace, options)
    if worker is None or start is None:
        return result(info, records, duration, options)
    end = await worker_stats(worker)
    hits = end.adapter_cache_hits - start.adapter_cache_hits
    misses = end.adapter_cache_misses - start.adapter_cache_misses
    compiles = Compiles(
        end.kernel_compiles - start.kernel_compiles,
        end.kernel_compile_seconds - start.kernel_compile_seconds,
    )
    out = result(info, records, duration, options, hits, misses, pool, compiles=compiles)
    out["steps"] = steps_between(start, end)
    return out
